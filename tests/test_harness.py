"""lm-evaluation-harness: the `pope` model class against the model's own forward, tasks from local JSON files
(multiple choice, rolling perplexity, the project's CBT), and `pope eval harness` end to end on a tiny trained run.

Offline throughout: every task reads a JSON file written here (`dataset_path: json`), with its datasets cache in a
temporary folder, and TaskManager(include_defaults=False) skips indexing lm-eval's thousands of bundled tasks.
Most checks use a random-initialised model (init_std 0.5: varied logits, no ties) on the session's SentencePiece
dataset; the CLI test trains a run for 2 steps.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tomllib
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval", reason="lm-evaluation-harness is in the .[eval] extra")

from lm_eval import evaluator  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402
from lm_eval.tasks._yaml_loader import load_yaml  # noqa: E402

from conftest import ROOT, run_pope, synthetic_documents, tiny_train_args  # noqa: E402
from data_prep.contract import read_manifest  # noqa: E402
from data_prep.tokenizers import load_tokenizer  # noqa: E402
from pipeline.config import ModelConfig  # noqa: E402
from pipeline.generate import Source  # noqa: E402
from pipeline.harness import TASKS_DIR, PopeLM, task_manager  # noqa: E402
from pipeline.model import Transformer  # noqa: E402

EOS = 2  # SentencePiece's EOS id (data_prep/tokenizers/text.py)


@pytest.fixture(scope="module")
def source(text_dataset: Path) -> Source:
    """A random PoPE model (max_seq_len 32) with the session dataset's SentencePiece tokenizer (vocab 320)."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=read_manifest(text_dataset)["vocab_size"], d_model=32, n_heads=2, n_layers=2,
                      max_seq_len=32, position="pope", init_std=0.5)
    return Source(Transformer(cfg).eval(), load_tokenizer(text_dataset), read_manifest(text_dataset), text_dataset,
                  "random pope")


def direct_logprobs(model: Transformer, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(ids[i+1] | ids[:i+1]) for every i and the argmax there: one ordinary forward, log_softmax."""
    with torch.no_grad():
        logits, _ = model(torch.tensor([ids[:-1]]))
    logp = torch.log_softmax(logits[0].double(), dim=-1)
    targets = torch.tensor(ids[1:])
    return logp.gather(1, targets[:, None])[:, 0], logp.argmax(-1) == targets


def direct(model: Transformer, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    """Sum of log p over the continuation after the whole context, and whether greedy gives it."""
    logp, hit = direct_logprobs(model, context + continuation)
    return float(logp[-len(continuation):].sum()), bool(hit[-len(continuation):].all())


def requests(kind: str, args: list[tuple]) -> list[Instance]:
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def local_task(name: str, data: Path, cache: Path, **config) -> dict:
    """An inline task config reading a JSON-lines file as its test split, offline, cached under `cache`."""
    return {"task": name, "dataset_path": "json", "test_split": "test",
            "dataset_kwargs": {"data_files": {"test": str(data)}, "cache_dir": str(cache)}, **config}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


PAIRS = [("the music genome", " position phase"), ("", "the attention layer"), ("a query", " key value head"),
         ("the", " loss"), ("sample shard checkpoint resume preempt", " cluster node rank."), ("", "polar")]


# ----------------------------------------------------------------------------------------- the model class


def test_tokens_joint_split_and_prefix(source):
    lm = PopeLM(source)
    encode = lambda text: source.tokenizer.encode(text).tolist()
    assert lm.tok_encode("the music") == encode("the music") and EOS not in lm.tok_encode("the music")
    assert lm.prefix_token_id == lm.eot_token_id == EOS and lm.max_length == 32
    # jointly encoded, split at the context's own length; a trailing space moves to the continuation
    for context, continuation in [("the music", " genome"), ("the music ", "genome")]:
        ctx, cont = lm._encode_pair(context, continuation)
        assert ctx == encode("the music") and ctx + cont == encode("the music genome")
    # inside a word: the continuation is the joint encoding's tail after as many tokens as the context has
    # (the harness's rule), which is not the continuation encoded alone
    ctx, cont = lm._encode_pair("the mus", "ic genome")
    assert ctx == encode("the mus") and cont == encode("the music genome")[len(ctx):]
    assert cont != encode("ic genome")


def test_loglikelihood_equals_direct_forward(source):
    lm = PopeLM(source)
    got = lm.loglikelihood(requests("loglikelihood", PAIRS))
    for (context, continuation), (logprob, greedy) in zip(PAIRS, got):
        ctx = lm.tok_encode(context) if context else [EOS]  # an empty context is EOS, what documents follow
        cont = lm._encode_pair(context, continuation)[1] if context else lm.tok_encode(continuation)
        want, want_greedy = direct(source.model, ctx, cont)
        assert logprob == pytest.approx(want, abs=1e-4) and greedy == want_greedy
    assert len({round(g[0], 3) for g in got}) == len(PAIRS)  # distinct numbers: a mix-up of order would show


def test_batches_give_the_same_numbers_in_order(source):
    one = PopeLM(source, batch_size=1).loglikelihood(requests("loglikelihood", PAIRS))
    three = PopeLM(source, batch_size=3).loglikelihood(requests("loglikelihood", PAIRS))
    for (a, ga), (b, gb) in zip(one, three):
        assert a == pytest.approx(b, abs=1e-5) and ga == gb


def test_left_truncation_and_long_continuations(source):
    lm = PopeLM(source, max_length=8)
    text = " ".join(synthetic_documents(1, 3)[0].split()[:30])
    ids = lm.tok_encode(text)
    assert len(ids) > 20
    # a long context: the model reads only the 8 tokens before the last target
    ((logprob, _),) = lm.loglikelihood(requests("loglikelihood", [(text, " loss")]))
    whole = ids + lm._encode_pair(text, " loss")[1]
    cont = whole[len(ids):]
    assert logprob == pytest.approx(direct(source.model, whole[-9:-len(cont)], cont)[0], abs=1e-4)
    assert logprob != pytest.approx(direct(source.model, ids, cont)[0], abs=1e-2)  # the whole context differs
    # a continuation longer than max_length: scored in pieces, each token once, which is the harness's own
    # rolling-window split (lm_eval.utils.get_rolling_token_windows) of the same text
    ((long, _),) = lm.loglikelihood(requests("loglikelihood", [("", text)]))
    (rolling,) = lm.loglikelihood_rolling(requests("loglikelihood_rolling", [(text,)]))
    assert isinstance(rolling, float) and long == pytest.approx(rolling, abs=1e-4)
    first = direct(source.model, [EOS], ids[:8])[0]  # the first window: EOS + 7 tokens predict 8
    assert long < first - 1  # the other windows add their share
    # learned absolute positions cannot read past max_seq_len
    cfg = ModelConfig(vocab_size=320, d_model=32, n_heads=2, n_layers=1, max_seq_len=16, position="learned")
    learned = Source(Transformer(cfg), source.tokenizer, source.manifest, None, "learned")
    with pytest.raises(ValueError, match="learned positions"):
        PopeLM(learned, max_length=17)


def test_rolling_loglikelihood_equals_direct(source):
    lm = PopeLM(source, max_length=128)  # PoPE reads past its 32 training positions
    texts = [" ".join(d.split()[:25]) for d in synthetic_documents(3, 4)]
    got = lm.loglikelihood_rolling(requests("loglikelihood_rolling", [(t,) for t in texts]))
    for text, value in zip(texts, got):
        ids = lm.tok_encode(text)
        assert 32 < len(ids) < 128
        assert value == pytest.approx(float(direct_logprobs(source.model, [EOS] + ids)[0].sum()), abs=1e-4)


def test_generate_until_stops_at_the_stop_string(source):
    lm = PopeLM(source)
    PROMPT = "the attention layer head"  # the random model continues it for 20 tokens without EOS
    (full,) = lm.generate_until(requests("generate_until", [(PROMPT, {"until": [], "max_gen_toks": 20})]))
    assert len(full) > 6
    stop = full[4:6]
    calls = []
    hook = source.model.register_forward_hook(lambda *_: calls.append(1))
    try:
        (cut,) = lm.generate_until(requests("generate_until", [(PROMPT, {"until": [stop], "max_gen_toks": 20})]))
    finally:
        hook.remove()
    assert cut == full.split(stop)[0] and len(cut) < len(full)
    assert len(calls) < 20  # decoding stopped once the stop string appeared, not after max_gen_toks


def test_registered_as_pope_and_declared_as_entry_point():
    from lm_eval.api.registry import get_model

    assert get_model("pope") is PopeLM
    entry = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]["lm_eval.models"]
    module, _, name = entry["pope"].partition(":")
    assert getattr(__import__(module, fromlist=[name]), name) is PopeLM


# ------------------------------------------------------------------------------- tasks from local JSON files


def test_multiple_choice_task(source, tmp_path):
    docs = [{"q": "the music", "choices": [" genome", " position", " loss"], "gold": g} for g in (0, 1, 2)]
    docs.append({"q": "a query key", "choices": [" value", " head"], "gold": 0})
    task = local_task("local_mc", write_jsonl(tmp_path / "mc.jsonl", docs), tmp_path / "cache",
                      output_type="multiple_choice", doc_to_text="{{q}}", doc_to_choice="{{choices}}",
                      doc_to_target="{{gold}}", target_delimiter="",
                      metric_list=[{"metric": "acc"}, {"metric": "acc_norm"}])
    lm = PopeLM(source, batch_size=4)
    out = evaluator.simple_evaluate(model=lm, tasks=[task], task_manager=TaskManager(include_defaults=False),
                                    bootstrap_iters=0, log_samples=True)
    correct = 0
    for sample in sorted(out["samples"]["local_mc"], key=lambda s: s["doc_id"]):
        doc = docs[sample["doc_id"]]
        lls = [float(r[0][0]) for r in sample["resps"]]
        want = [direct(source.model, *lm._encode_pair(doc["q"], c))[0] for c in doc["choices"]]
        assert lls == pytest.approx(want, abs=1e-4)
        correct += max(range(len(want)), key=want.__getitem__) == doc["gold"]
    assert out["results"]["local_mc"]["acc,none"] == pytest.approx(correct / len(docs))
    assert "acc_norm,none" in out["results"]["local_mc"]


def test_rolling_perplexity_task(source, tmp_path):
    texts = [" ".join(d.split()[:40]) for d in synthetic_documents(3, 5)]
    task = local_task("local_ppl", write_jsonl(tmp_path / "ppl.jsonl", [{"text": t} for t in texts]),
                      tmp_path / "cache", output_type="loglikelihood_rolling", doc_to_text="", doc_to_target="{{text}}",
                      metric_list=[{"metric": "word_perplexity"}, {"metric": "bits_per_byte"}])
    lm = PopeLM(source, batch_size=2)  # max_length 32: several windows per text
    out = evaluator.simple_evaluate(model=lm, tasks=[task], task_manager=TaskManager(include_defaults=False),
                                    bootstrap_iters=0, log_samples=False)
    total = sum(lm.loglikelihood_rolling(requests("loglikelihood_rolling", [(t,) for t in texts])))
    words = sum(len(t.split()) for t in texts)  # the harness counts words as whitespace-separated pieces
    assert out["results"]["local_ppl"]["word_perplexity,none"] == pytest.approx(math.exp(-total / words), rel=1e-5)


CBT_DOC = {
    "sentences": [f"`` The {w} , '' said the {v} ." if i % 3 == 0 else f"The {w} rotates the {v} ."
                  for i, (w, v) in enumerate(zip(["query", "key", "value", "layer", "head"] * 4,
                                                 ["phase", "token", "shard", "node", "rank"] * 4))],
    "question": "The query rotates the XXXXX and the key .",
    "options": ["phase", "token", "shard", "node", "rank", "music", "genome", "loss", "cluster", "sample"],
}


def test_cbt_scores_every_candidate_in_the_whole_passage(source, tmp_path):
    docs = [dict(CBT_DOC, answer=a) for a in ("phase", "genome")]
    config = load_yaml(TASKS_DIR / "cbt" / "cbt_cn.yaml")  # the project's task, reading a local file instead
    config.pop("dataset_name")
    task = local_task("cbt_local", write_jsonl(tmp_path / "cbt.jsonl", docs), tmp_path / "cache",
                      **{k: v for k, v in config.items() if k not in ("task", "dataset_path", "test_split")})
    lm = PopeLM(source, max_length=1024)  # the whole passage in one window (PoPE extrapolates)
    out = evaluator.simple_evaluate(model=lm, tasks=[task], task_manager=TaskManager(include_defaults=False),
                                    bootstrap_iters=0, log_samples=True)
    samples = sorted(out["samples"]["cbt_local"], key=lambda s: s["doc_id"])
    arguments = [tuple(a) for a in samples[0]["arguments"]]  # (context, continuation) of each candidate
    assert len(arguments) == 10 and all(context == "" for context, _ in arguments)
    texts = [text for _, text in arguments]
    first = texts[0]
    assert first.startswith('Passage: "The query," said the phase. The key rotates the token.')
    assert first.endswith("\nQuestion: The query rotates the phase and the key.") and "XXXXX" not in first
    want = [direct(source.model, [EOS], lm.tok_encode(text))[0] for text in texts]
    assert len(lm.tok_encode(first)) > 100  # a passage, every token of it scored
    correct = 0
    for sample, doc in zip(samples, docs):
        lls = [float(r[0][0]) for r in sample["resps"]]
        assert lls == pytest.approx(want, abs=1e-3)
        correct += max(range(10), key=want.__getitem__) == doc["options"].index(doc["answer"])
    assert out["results"]["cbt_local"]["acc,none"] == pytest.approx(correct / 2)


def test_project_tasks_index_without_lm_evals_own():
    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
    assert {"cbt", "cbt_cn", "cbt_ne"} <= set(manager.all_tasks)
    assert task_manager(["cbt_*"]).match_tasks(["cbt_*"]) == ["cbt_cn", "cbt_ne"]


@pytest.mark.slow
def test_unknown_task_is_one_line():
    """An unknown name is looked for among lm-eval's bundled tasks too (indexing them takes ~30 s)."""
    with pytest.raises(ValueError, match="unknown task no_such_task: not one of lm-eval's tasks"):
        task_manager(["cbt_cn", "no_such_task"])


# ---------------------------------------------------------------------------------------- pope eval harness


@pytest.fixture(scope="module")
def run(text_dataset: Path, tmp_path_factory) -> Path:
    """A PoPE run trained for 2 steps (1 process)."""
    root = tmp_path_factory.mktemp("harness_runs")
    run_pope(*tiny_train_args(text_dataset, root, "pope", "launch.nproc=1", "schedule.max_steps=2",
                              "schedule.warmup_steps=1", "checkpoint.every=2", "eval.every=0"))
    return root / "pope"


def hf_env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "hf" / "datasets")}


@pytest.mark.slow
def test_cli_end_to_end(run, tmp_path):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    data = write_jsonl(tmp_path / "mc.jsonl", [{"q": "the music", "choices": [" genome", " loss"], "gold": 0},
                                              {"q": "a", "choices": [" query", " key", " head"], "gold": 2}])
    (tasks / "mine.yaml").write_text(json.dumps(local_task(
        "mine", data, tmp_path / "cache", output_type="multiple_choice", doc_to_text="{{q}}",
        doc_to_choice="{{choices}}", doc_to_target="{{gold}}", target_delimiter="",
        metric_list=[{"metric": "acc"}, {"metric": "acc_norm"}])))  # JSON is YAML
    out = tmp_path / "results.json"
    proc = run_pope("eval", "harness", str(run), "--tasks", "mine", "--include-path", str(tasks), "--out", str(out),
                    "--batch-size", "2", env=hf_env(tmp_path))
    assert "|mine" in proc.stdout and "acc_norm" in proc.stdout and f"wrote {out}" in proc.stdout
    written = json.loads(out.read_text())
    assert {"results", "configs", "versions", "n-samples", "n-shot"} <= set(written)
    assert written["n-samples"]["mine"]["effective"] == 2 and written["pope"]["processes"] == 1
    # the same numbers as the model class in this process, on the run and on its export
    export = tmp_path / "export"
    run_pope("export", str(run), "--out", str(export))
    pairs = [("the music", " genome"), ("the music", " loss"), ("a", " query"), ("a", " key"), ("a", " head")]
    from_run = PopeLM(str(run), device="cpu").loglikelihood(requests("loglikelihood", pairs))
    from_export = PopeLM(str(export), device="cpu").loglikelihood(requests("loglikelihood", pairs))
    assert [a for a, _ in from_run] == pytest.approx([b for b, _ in from_export], abs=1e-5)
    acc = ((from_run[0][0] > from_run[1][0]) + (from_run[4][0] > max(from_run[2][0], from_run[3][0]))) / 2
    assert written["results"]["mine"]["acc,none"] == pytest.approx(acc)


@pytest.mark.slow
def test_cli_errors_are_one_line(run, tmp_path, monkeypatch, capsys):
    from launch.cli import main

    no_checkpoint = tmp_path / "untrained"
    no_checkpoint.mkdir()
    (no_checkpoint / "config.yaml").write_text((run / "config.yaml").read_text())
    proc = run_pope("eval", "harness", str(no_checkpoint), "--tasks", "cbt_cn", check=False, env=hf_env(tmp_path))
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0
    assert "has no complete checkpoint" in proc.stderr
    proc = run_pope("eval", "harness", str(run), "--tasks", "cbt_cn", "--include-path", str(tmp_path / "nowhere"),
                    check=False, env=hf_env(tmp_path))
    assert proc.returncode == 2 and "is not a folder of task YAMLs" in proc.stderr
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if lm-eval were not installed
    assert main(["eval", "harness", str(run), "--tasks", "cbt_cn"]) == 2
    assert "pip install -e '.[eval]'" in capsys.readouterr().err


@pytest.mark.slow
def test_hflm_on_the_export_matches_the_pope_class(run, tmp_path):
    """lm-eval's own HFLM on `pope export`'s folder (transformers, trust_remote_code, the exported tokenizer.json)
    gives the numbers of the `pope` class: per-request log-likelihoods (empty context included), rolling
    log-likelihoods over several windows, and a multiple-choice task's acc, in a fresh interpreter."""
    import subprocess

    export = tmp_path / "export"
    run_pope("export", str(run), "--out", str(export))
    data = write_jsonl(tmp_path / "mc.jsonl", [{"q": "the music", "choices": [" genome", " loss"], "gold": 0},
                                              {"q": "a", "choices": [" query", " key", " head"], "gold": 2},
                                              {"q": "", "choices": ["polar", "phase shard"], "gold": 1}])
    task = local_task("mine", data, tmp_path / "cache", output_type="multiple_choice", doc_to_text="{{q}}",
                      doc_to_choice="{{choices}}", doc_to_target="{{gold}}", target_delimiter="",
                      metric_list=[{"metric": "acc"}, {"metric": "acc_norm"}])
    (tmp_path / "task.json").write_text(json.dumps(task))
    out = tmp_path / "out.json"
    subprocess.run([sys.executable, str(ROOT / "tests" / "hflm_child.py"), str(export), str(tmp_path / "task.json"),
                    str(out)], check=True, env=hf_env(tmp_path), cwd=tmp_path, timeout=600)
    got = json.loads(out.read_text())
    assert got["hf_class"] == "PopeForCausalLM"
    hf, pope = got["hflm"], got["pope"]
    assert [ll for ll, _ in hf["loglikelihood"]] == pytest.approx([ll for ll, _ in pope["loglikelihood"]], abs=1e-4)
    assert [g for _, g in hf["loglikelihood"]] == [g for _, g in pope["loglikelihood"]]
    assert hf["rolling"] == pytest.approx(pope["rolling"], abs=1e-4)
    assert hf["task"]["acc,none"] == pytest.approx(pope["task"]["acc,none"])
    assert hf["task"]["acc_norm,none"] == pytest.approx(pope["task"]["acc_norm,none"])
