"""The lm-evaluation-harness model class `pope`, and `pope eval harness` (downstream tasks, zero- or few-shot).

`PopeLM` scores text with a trained run (its newest intact checkpoint) or a `pope export` folder, through the
data's own tokenizer (SentencePiece or GPT-2 BPE; only text corpora). It subclasses the harness's `TemplateLM`,
which does the request plumbing the harness expects of every causal LM:

- `loglikelihood(context, continuation)`: trailing spaces of the context move to the continuation; context and
  continuation are encoded JOINTLY and split at the length of the context's own encoding (so a merge across the
  boundary is scored as the model would see it); an empty context becomes EOS, the token every document follows in
  training (data_prep/text.py). This class scores the token ids (`_loglikelihood_tokens`): each input is the last
  `max_length` tokens of context+continuation (left-truncated), inputs are sorted by length, padded on the right
  and run `batch_size` at a time through one forward, results come back in the requests' order. A continuation
  longer than `max_length` is scored in consecutive pieces of at most `max_length` tokens, each with as much of
  what precedes it as fits, so every token is still scored once (CBT passages can be that long).
- `loglikelihood_rolling(text)`: perplexity tasks; disjoint windows of `max_length` (the harness's
  get_rolling_token_windows + make_disjoint_window), EOS before the first, a plain float per text.
- `generate_until(context, {until, max_gen_toks, ...})`: pipeline/generate.py's cached decoding, greedy unless the
  task asks to sample; stops at EOS, at any `until` string (cut off there) or after max_gen_toks tokens.

max_length is the model's model.max_seq_len unless given: PoPE and the relative encodings read longer inputs
(length extrapolation), learned absolute positions cannot and refuse a longer one.

One process, one device: lm-eval would shard requests by rank and gather them through all_gather/gather_object,
which this class does not implement (it reports rank 0 of 1). The paper's six tasks are a few hundred thousand
forward passes of a model of at most 774M parameters, minutes on one GPU; to use several GPUs run one task per
process (`--tasks` split across them).

Importing this module registers the class as "pope" in lm-eval's model registry (`lm_eval --model pope
--model_args pretrained=RUN` after `import pipeline.harness`, or through the `lm_eval.models` entry point that
pyproject.toml declares, which lm-eval releases with plugin discovery read; 0.4.13 does not).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F

from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import normalize_gen_kwargs

from pipeline.generate import Sampling, Source, banned_ids, generate, load_source, stop_ids

log = logging.getLogger(__name__)

DEFAULT_MAX_GEN_TOKS = 256  # the harness's default for generate_until
CHUNK_ROWS = 2048  # scored positions projected to logits at once: 2048 × 50,257 fp32 = 0.4 GB
Piece = tuple[int, list[int], list[int]]  # (request index, model input ids, target ids scored at its end)


@register_model("pope")
class PopeLM(TemplateLM):
    """A pope-pretrain text model as an lm-eval LM. `pretrained`: a run folder, a `pope export` folder, or a loaded
    `Source`; `overrides`: model.rope_scaling.* / model.position_base settings (as `pope generate` takes)."""

    def __init__(self, pretrained: str | Path | Source, batch_size: int | str = 1, max_length: int | None = None,
                 device: str | None = None, max_batch_size: int | None = None,
                 overrides: Sequence[str] = ()) -> None:
        super().__init__()
        if isinstance(batch_size, str) and not batch_size.isdigit():
            raise ValueError(f"batch_size must be a positive integer (no 'auto' here); got {batch_size!r}")
        self.batch_size = int(batch_size)
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1; got {batch_size}")
        if isinstance(pretrained, Source):
            source = pretrained
        else:
            source = load_source(pretrained, torch.device(device) if device else None, overrides)
        if source.corpus != "text":
            raise ValueError(f"{source.label} was trained on a {source.corpus} corpus; the harness's tasks are "
                             "text: evaluate a text run (OpenWebText, or your own text through `pope prep text`)")
        self.source = source
        self.model = source.model.eval()
        self.text_tokenizer = source.tokenizer
        self._device = next(self.model.parameters()).device
        cfg = self.model.cfg
        self._max_length = int(max_length) if max_length else cfg.max_seq_len
        if self._max_length < 2:
            raise ValueError(f"max_length must be at least 2 tokens; got {max_length}")
        if cfg.position == "learned" and self._max_length > cfg.max_seq_len:
            raise ValueError(f"a model with learned positions reads at most model.max_seq_len={cfg.max_seq_len} "
                             f"tokens; --max-length {self._max_length} is more")
        eos = source.tokenizer.info.eos
        if eos is None:
            raise ValueError(f"{source.label}: its tokenizer has no EOS, which the harness needs as the prefix token")
        self._eos = int(eos)

    # -------------------------------------------------------------------------------------- what TemplateLM needs

    @property
    def eot_token_id(self) -> int:
        return self._eos

    @property
    def prefix_token_id(self) -> int:
        """What an empty context becomes, and what the first rolling window starts from: EOS, which precedes every
        document the model was trained on."""
        return self._eos

    @property
    def max_length(self) -> int:
        return self._max_length

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        """The data's tokenizer, as prep used it: no BOS or EOS added (both tokenizers are lossless on any text)."""
        return [int(i) for i in self.text_tokenizer.encode(string)]

    def tok_decode(self, ids: Sequence[int]) -> str:
        return self.text_tokenizer.decode([int(i) for i in ids])

    # -------------------------------------------------------------------------------------------- scoring

    def _loglikelihood_tokens(self, requests: Sequence[tuple[Any, list[int], list[int]]],
                              disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), whether greedy decoding gives the continuation) per request of
        ((context, continuation), context ids, continuation ids), in the requests' order."""
        pieces: list[Piece] = []
        for index, (_, context, continuation) in enumerate(requests):
            pieces.extend((index, inp, target) for inp, target in self.pieces(context, continuation))
        totals = [0.0] * len(requests)
        greedy = [True] * len(requests)
        for (index, _, _), (logprob, is_greedy) in zip(pieces, self.score_pieces(pieces)):
            totals[index] += logprob
            greedy[index] = greedy[index] and is_greedy
        for (pair, _, _), total, is_greedy in zip(requests, totals, greedy):
            if pair is not None:  # rolling windows have no string pair to cache under
                self.cache_hook.add_partial("loglikelihood", pair, (total, is_greedy))
        return list(zip(totals, greedy))

    def pieces(self, context: Sequence[int], continuation: Sequence[int]) -> Iterator[tuple[list[int], list[int]]]:
        """(model input, targets scored at the input's end) covering the continuation: one piece when it fits in
        max_length, else consecutive pieces of max_length targets. Each input is the max_length tokens before its
        last target (fewer at the start): the context left-truncated, every target predicted once."""
        if not context:
            raise ValueError("a request needs at least one context token (TemplateLM gives EOS for an empty one)")
        if not continuation:
            raise ValueError("a request has an empty continuation (its text encodes to no tokens)")
        whole = list(context) + list(continuation)
        start = len(context)
        if len(continuation) > self.max_length:
            lm_utils.warning_once(log, f"continuations longer than max_length ({self.max_length} tokens) are scored "
                                       "in pieces of max_length tokens")
        for first in range(0, len(continuation), self.max_length):
            end = min(first + self.max_length, len(continuation))
            upto = whole[: start + end]
            yield upto[-(self.max_length + 1):-1], list(continuation[first:end])

    @torch.no_grad()
    def score_pieces(self, pieces: Sequence[Piece]) -> list[tuple[float, bool]]:
        """(log-likelihood, greedy) of each piece's targets, in the pieces' order: longest inputs first (a batch
        that does not fit in memory fails at once), `batch_size` a forward, padded on the right (causal attention:
        padding after a row's tokens changes none of its logits)."""
        order = sorted(range(len(pieces)), key=lambda i: -len(pieces[i][1]))
        results: list[tuple[float, bool]] = [(0.0, True)] * len(pieces)
        for start in range(0, len(order), self.batch_size):
            batch = [pieces[i] for i in order[start:start + self.batch_size]]
            width = max(len(inp) for _, inp, _ in batch)
            tokens = torch.full((len(batch), width), self._eos, dtype=torch.long)
            for row, (_, inp, _) in enumerate(batch):
                tokens[row, :len(inp)] = torch.tensor(inp)
            hidden = self.model.hidden(tokens.to(self._device))
            # only the positions that predict a target go through the tied head
            rows = torch.cat([hidden[row, len(inp) - len(target):len(inp)]
                              for row, (_, inp, target) in enumerate(batch)])
            targets = torch.tensor([t for _, _, target in batch for t in target], device=self._device)
            logprob, best = self.target_logprobs(rows, targets)
            offset = 0
            for i, (_, _, target) in zip(order[start:start + self.batch_size], batch):
                span = slice(offset, offset + len(target))
                results[i] = (float(logprob[span].double().sum()), bool((best[span] == targets[span]).all()))
                offset += len(target)
        return results

    def target_logprobs(self, hidden: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """log p(target) and the argmax token at each of (n, d_model) final hidden states: the model's tied output
        head and a log-softmax in fp32, CHUNK_ROWS positions at a time."""
        logprob = torch.empty(len(targets), dtype=torch.float32, device=hidden.device)
        best = torch.empty(len(targets), dtype=torch.long, device=hidden.device)
        for start in range(0, len(targets), CHUNK_ROWS):
            logits = F.linear(hidden[start:start + CHUNK_ROWS], self.model.embed.weight).float()
            logp = torch.log_softmax(logits, dim=-1)
            chunk = targets[start:start + CHUNK_ROWS]
            logprob[start:start + len(chunk)] = logp.gather(1, chunk[:, None])[:, 0]
            best[start:start + len(chunk)] = logp.argmax(dim=-1)
        return logprob, best

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of each whole text: disjoint windows of max_length tokens (EOS before the first), every
        token scored once; a plain float per request."""
        windows: list[tuple[None, list[int], list[int]]] = []
        owner: list[int] = []
        for index, (text,) in enumerate(request.args for request in requests):
            for context, target in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, target))
                owner.append(index)
        totals = [0.0] * len(requests)
        for index, (logprob, _) in zip(owner, self._loglikelihood_tokens(windows)):
            totals[index] += logprob
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    # ------------------------------------------------------------------------------------------ generation

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        """The continuation of each context, one request at a time through the KV-cached decoder, cut at the first
        `until` string; the context is left-truncated to leave room for max_gen_toks new tokens."""
        outputs = []
        for context, gen_kwargs in (request.args for request in requests):
            kwargs = normalize_gen_kwargs(gen_kwargs or {}, DEFAULT_MAX_GEN_TOKS)
            until = [s for s in kwargs["until"] if s]
            max_new = int(kwargs["max_gen_toks"])
            if max_new >= self.max_length:
                raise ValueError(f"max_gen_toks {max_new} leaves no room for a context in max_length "
                                 f"{self.max_length}")
            temperature = float(kwargs.get("temperature") or 0.0)
            sampling = (Sampling(temperature=temperature, top_k=int(kwargs.get("top_k") or 0),
                                 top_p=float(kwargs.get("top_p") or 1.0))
                        if kwargs.get("do_sample") and temperature > 0 else Sampling(temperature=0))
            prompt = (self.tok_encode(context) if context else [self.prefix_token_id])
            prompt = prompt[-(self.max_length - max_new):]

            def done(new: list[int]) -> bool:
                text = self.tok_decode(new)
                return any(stop in text for stop in until)

            new = generate(self.model, prompt, max_new, sampling, banned=banned_ids(self.source),
                           stop=stop_ids(self.source), done=done if until else None)
            text = self.tok_decode([t for t in new if t != self._eos])
            for stop in until:
                text = text.split(stop)[0]
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            outputs.append(text)
        return outputs


# ------------------------------------------------------------------------------------------ pope eval harness

TASKS_DIR = Path(__file__).resolve().parent / "harness_tasks"  # the project's own tasks (CBT), shipped with it


def task_manager(tasks: Sequence[str], include_path: str | Path | None = None) -> Any:
    """A TaskManager that knows every name in `tasks` (glob patterns allowed): the project's tasks and
    `include_path` first, which index in a moment; lm-eval's bundled tasks (about 30 s to index) only when a name
    is not among those. An unknown name is a one-line ValueError."""
    from lm_eval.tasks import TaskManager

    paths = [str(TASKS_DIR)]
    if include_path is not None:
        if not Path(include_path).is_dir():
            raise ValueError(f"--include-path {include_path} is not a folder of task YAMLs")
        paths.append(str(include_path))
    missing = lambda manager: [name for name in tasks if not manager.match_tasks([name])]
    manager = TaskManager(include_path=paths, include_defaults=False)
    if missing(manager):
        manager = TaskManager(include_path=paths, include_defaults=True)
    unknown = missing(manager)
    if unknown:
        raise ValueError(f"unknown task{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}: not one of lm-eval's "
                         "tasks, the project's (cbt, cbt_cn, cbt_ne) or --include-path's (`lm_eval ls tasks` lists "
                         "lm-eval's)")
    return manager


def run_harness(path: str | Path, tasks: Sequence[str], *, include_path: str | Path | None = None,
                num_fewshot: int | None = None, limit: float | None = None, batch_size: int = 1,
                max_length: int | None = None, out: str | Path | None = None, overrides: Sequence[str] = (),
                bootstrap_iters: int = 100000) -> tuple[dict[str, Any], Path]:
    """`pope eval harness`: evaluate a run or export on harness tasks; writes the harness's JSON (results, group
    results, configs, versions, n-shot, n-samples, the model) to `out` and returns (that dict, its path).
    Default `out`: harness-<folder name>.json in the current folder."""
    from lm_eval import evaluator

    tasks = [t for t in tasks if t]
    if not tasks:
        raise ValueError("--tasks needs at least one task name, e.g. --tasks lambada_openai,cbt_cn")
    if num_fewshot is not None and num_fewshot < 0:
        raise ValueError(f"--num-fewshot must be >= 0; got {num_fewshot}")
    if limit is not None and limit <= 0:
        raise ValueError(f"--limit must be > 0; got {limit}")
    if limit is not None and limit >= 1:
        limit = int(limit)  # a count of documents; below 1 the harness reads a fraction
    out = Path(out) if out else Path(f"harness-{Path(path).resolve().name}.json")
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder; give a file name such as {out / 'harness.json'}")
    manager = task_manager(tasks, include_path)
    lm = PopeLM(path, batch_size=batch_size, max_length=max_length, overrides=overrides)
    results = evaluator.simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, num_fewshot=num_fewshot,
                                        limit=limit, bootstrap_iters=bootstrap_iters, log_samples=False)
    results["pope"] = {"source": lm.source.label, "max_length": lm.max_length, "batch_size": lm.batch_size,
                       "overrides": list(overrides), "processes": 1}
    out.write_text(json.dumps(results, indent=2, default=lm_utils.handle_non_serializable, ensure_ascii=False))
    return results, out


def results_table(results: dict[str, Any]) -> str:
    """The harness's own tables (markdown): every task's metrics with their standard errors (acc and acc_norm where
    a task has both), then the groups' aggregates."""
    table = lm_utils.make_table(results)
    if results.get("groups"):
        table += "\n" + lm_utils.make_table(results, "groups")
    return table
