"""Validation loss and perplexity over a split, each process on its share, reduced over all of them."""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn.functional as F

from data_prep.mds import TOKENS_COLUMN
from pipeline import distributed
from pipeline.data import ID_KEY, BatchMaker
from pipeline.distributed import DistEnv
from pipeline.model import IGNORE_INDEX


@torch.no_grad()
def evaluate(forward: Callable[[torch.Tensor, torch.Tensor], Any], loader: Any, make_batch: BatchMaker,
             env: DistEnv, max_batches: int = 0) -> dict[str, float]:
    """Mean loss per target token, its perplexity, and the accuracy of the most likely token at the targets (with
    data.loss_on=last: final-token accuracy, the indirect indexing metric). `forward(inputs, targets)` returns
    (logits, mean loss). Every process must call this (the sums are gathered); `max_batches` (0: all) bounds
    each process's share.

    Every window counts once. streaming gives every process the same number of windows, so when the split does not
    divide by the processes it repeats a few; the sums are kept per window id and merged over the processes, so a
    repeated window is not counted twice.
    """
    scored: dict[int, tuple[float, int, int]] = {}  # window id -> (loss sum, target tokens, correct)
    for index, batch in enumerate(loader):
        if max_batches and index >= max_batches:
            break
        inputs, targets = make_batch(batch[TOKENS_COLUMN], augment=False)
        targets = targets.to(env.device)
        logits, _ = forward(inputs.to(env.device), targets)
        mask = targets != IGNORE_INDEX
        losses = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX,
                                 reduction="none").view_as(targets).sum(dim=1)
        right = ((logits.argmax(dim=-1) == targets) & mask).sum(dim=1)
        rows = zip(batch[ID_KEY], losses.tolist(), mask.sum(dim=1).tolist(), right.tolist())  # one sync each
        for window, loss_sum, count, correct in rows:
            scored[int(window)] = (loss_sum, int(count), int(correct))
    merged: dict[int, tuple[float, int, int]] = {}
    for share in distributed.all_gather(scored, env):
        merged.update(share)
    loss_sum = math.fsum(v[0] for v in merged.values())
    tokens, right_total = sum(v[1] for v in merged.values()), sum(v[2] for v in merged.values())
    if tokens == 0:
        raise ValueError("the validation split produced no target token")
    mean = loss_sum / tokens
    return {"val/loss": mean, "val/ppl": math.exp(min(mean, 700.0)), "val/accuracy": right_total / tokens,
            "val/tokens": tokens}


def evaluate_run(run: str, split: str = "val", max_batches: int = 0, data: str | None = None) -> dict[str, float]:
    """`pope eval val RUN [--data DIR]`: the newest checkpoint's loss on a split of its own dataset or of DIR
    (another prep folder, refused in one line unless made with the run's tokenizer), in this one process."""
    from pathlib import Path

    from data_prep.contract import check_same_tokenizer
    from pipeline.config import resolve
    from pipeline.data import make_loader, open_dataset
    from pipeline.export import build_model
    from pipeline.run import load_run

    config, state, step = load_run(Path(run))
    if data is not None:
        check_same_tokenizer(config.data.path, data, Path(run).name)
        config.data.path = str(data)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model(config.model, state).to(device).eval()
    dataset = open_dataset(config)
    config = resolve(config, dataset.manifest)  # the run's vocabulary must be this data's
    if not dataset.has_split(split):
        raise ValueError(f"dataset {dataset.path} has no '{split}' split")
    loader = make_loader(dataset, config.data, split, train=False)
    result = evaluate(model, loader, BatchMaker(config, dataset), DistEnv(device=device), max_batches)
    return {"step": step, **result}
