"""CBT (Children's Book Test, Hill et al. 2016) scored as a language model, the CBT paper's §4.4 and GPT-2's way.

Each of the 10 candidate words replaces XXXXX in the question; the text scored is the whole 20-sentence passage
followed by that question, with no separate context (the harness scores it after the prefix token, EOS), and the
prediction is the candidate whose text is the most likely: p(q1 … qk−1, c, qk+1 … ql), not p(q1 … qk−1, c).
The text is laid out and detokenised as lm-evaluation-harness v0.3.0's CBT task did ("Passage: …\\nQuestion: …",
the dataset's Penn-Treebank-style spacing undone), so the numbers compare with results reported through it.

Pure functions of a dataset row (columns sentences, question, answer, options, as in `cam-cst/cbt`), loaded by
the task YAMLs beside this file through lm-eval's `!function`.
"""

from __future__ import annotations

BLANK = "XXXXX"
# Penn Treebank tokenisation undone, in this order (lm-evaluation-harness v0.3.0's CBT detokeniser).
DETOKENISE = ((" '", "'"), (" \n", "\n"), ("\n ", "\n"), (" n't", "n't"), ("`` ", '"'), ("''", '"'),
              (" :", ":"), (" ;", ";"), (" !", "!"), (" ?", "?"), (" ,", ","), (" .", "."))


def detokenise(text: str) -> str:
    for spaced, plain in DETOKENISE:
        text = text.replace(spaced, plain)
    return text


def passage(doc: dict) -> str:
    """The passage and the question, with XXXXX still in it."""
    return "Passage: " + " ".join(doc["sentences"]) + "\nQuestion: " + doc["question"]


def doc_to_choice(doc: dict) -> list[str]:
    """The text to score for each candidate, in the order of `options`."""
    if passage(doc).count(BLANK) != 1:
        raise ValueError(f"a CBT question must hold {BLANK} once: {doc['question']!r}")
    return [detokenise(passage(doc).replace(BLANK, option)) for option in doc["options"]]


def doc_to_target(doc: dict) -> int:
    """The index of the answer among the candidates."""
    return list(doc["options"]).index(doc["answer"])
