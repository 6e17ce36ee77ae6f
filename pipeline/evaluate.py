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
    """Mean loss per target token and its perplexity. `forward(inputs, targets)` returns (logits, mean loss).

    Every process must call this (the sums are all-reduced); `max_batches` (0: all) bounds each process's share.
    """
    total_loss, total_tokens = 0.0, 0
    for index, batch in enumerate(loader):
        if max_batches and index >= max_batches:
            break
        inputs, targets = make_batch(batch[TOKENS_COLUMN], augment=False)
        count = int((targets != IGNORE_INDEX).sum())
        _, loss = forward(inputs.to(env.device), targets.to(env.device))
        total_loss += float(loss) * count
        total_tokens += count
    loss_sum, tokens = distributed.all_reduce_sum([total_loss, float(total_tokens)], env)
    if tokens == 0:
        raise ValueError("the validation split produced no target token")
    mean = loss_sum / tokens
    return {"val/loss": mean, "val/ppl": math.exp(min(mean, 700.0)), "val/tokens": tokens}
