"""Validation loss and perplexity over a split, each process on its share, reduced over all of them."""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

from data_prep.mds import TOKENS_COLUMN
from pipeline import distributed
from pipeline.data import BatchMaker
from pipeline.distributed import DistEnv
from pipeline.model import IGNORE_INDEX


@torch.no_grad()
def evaluate(forward: Callable[[torch.Tensor, torch.Tensor], Any], loader: Any, make_batch: BatchMaker,
             env: DistEnv, max_batches: int = 0) -> dict[str, float]:
    """Mean loss per target token, its perplexity, and the accuracy of the most likely token at the targets (with
    data.loss_on=last: final-token accuracy, the indirect indexing metric). `forward(inputs, targets)` returns
    (logits, mean loss). Every process must call this (the sums are all-reduced); `max_batches` (0: all) bounds
    each process's share.
    """
    total_loss, total_tokens, correct = 0.0, 0, 0
    for index, batch in enumerate(loader):
        if max_batches and index >= max_batches:
            break
        inputs, targets = make_batch(batch[TOKENS_COLUMN], augment=False)
        count = int((targets != IGNORE_INDEX).sum())
        targets = targets.to(env.device)
        logits, loss = forward(inputs.to(env.device), targets)
        total_loss += float(loss) * count
        total_tokens += count
        correct += int(((logits.argmax(dim=-1) == targets) & (targets != IGNORE_INDEX)).sum())
    loss_sum, tokens, right = distributed.all_reduce_sum([total_loss, float(total_tokens), float(correct)], env)
    if tokens == 0:
        raise ValueError("the validation split produced no target token")
    mean = loss_sum / tokens
    return {"val/loss": mean, "val/ppl": math.exp(min(mean, 700.0)), "val/accuracy": right / tokens,
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
