"""The DeepSpeed engine of a run: its JSON config, the learning-rate schedule, and the gradient norm it reports.

The learning rate is set by the loop before every step from `lr_multiplier(step)`, rather than by a stateful
scheduler inside the checkpoint: the schedule is a pure function of the step, and a resumed run follows the config
it is given (an edited optim.lr or schedule takes effect on resume).
"""

from __future__ import annotations

import logging
import math
from typing import Any, Callable

import torch

from pipeline.config import Config, deep_merge
from pipeline.distributed import DistEnv
from pipeline.model import Transformer


def lr_multiplier(config: Config) -> Callable[[int], float]:
    """Step k (0-based) → fraction of optim.lr: linear warmup to 1, then decay to min_lr_ratio at the last step."""
    warmup, total, floor = config.schedule.warmup_steps, config.schedule.max_steps, config.schedule.min_lr_ratio
    decay = config.schedule.decay

    def multiplier(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if decay == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - 1 - warmup))
        if decay == "linear":
            return 1.0 - (1.0 - floor) * progress
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return multiplier


def deepspeed_config(config: Config, world_size: int) -> dict[str, Any]:
    """The DeepSpeed JSON for this config on `world_size` processes, deepspeed.extra merged over it."""
    d, ds = config.data, config.deepspeed
    per_step = d.micro_batch_size * world_size
    if d.batch_size % per_step:
        raise ValueError(f"data.batch_size={d.batch_size} is not a multiple of data.micro_batch_size "
                         f"({d.micro_batch_size}) × {world_size} processes; change one of them")
    out: dict[str, Any] = {
        "train_batch_size": d.batch_size,
        "train_micro_batch_size_per_gpu": d.micro_batch_size,
        "gradient_accumulation_steps": d.batch_size // per_step,
        "gradient_clipping": config.optim.grad_clip,
        "zero_optimization": {"stage": ds.zero_stage},
        "bf16": {"enabled": ds.precision == "bf16"},
        "fp16": {"enabled": ds.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "zero_allow_untested_optimizer": True,  # a client torch AdamW: no JIT-compiled optimizer op needed
        **_bf16_zero_fp32_gradients(ds.precision, ds.zero_stage),
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    merged = deep_merge(out, ds.extra)
    writer = merged.get("checkpoint", {}).get("writer") if isinstance(merged.get("checkpoint"), dict) else None
    if writer or merged.get("nebula", {}).get("enabled"):
        # They write after save_checkpoint returns: COMPLETE.json would vouch for files still being written.
        raise ValueError("deepspeed.extra selects an asynchronous checkpoint writer (checkpoint.writer or nebula); "
                         "pope-pretrain marks a checkpoint complete when save_checkpoint returns, so it needs the "
                         "default synchronous one")
    return merged


def _bf16_zero_fp32_gradients(precision: str, zero_stage: int) -> dict[str, Any]:
    """bf16 with ZeRO-2/3: accumulate micro-batch gradients and reduce them across processes in fp32.

    DeepSpeed's defaults follow the model dtype, so with bf16 the default config (8 micro-batches per step) would
    sum gradients in bf16 (8 significant bits) and all-reduce them in bf16. fp32 costs one fp32 gradient buffer
    and twice the reduction traffic. Not for ZeRO-1, where DeepSpeed answers fp32 accumulation with another
    optimizer wrapper (BF16_Optimizer) whose checkpoints existing ZeRO-1 runs could not resume from, nor ZeRO-0,
    where it is not implemented; both keep DeepSpeed's defaults. deepspeed.extra can override either key.
    """
    if precision != "bf16" or zero_stage < 2:
        return {}
    return {"data_types": {"grad_accum_dtype": "fp32"}, "communication_data_type": "fp32"}


def build_engine(model: Transformer, config: Config, env: DistEnv) -> tuple[Any, int]:
    """The DeepSpeed engine around the model and a client AdamW; returns (engine, accumulation steps). No
    scheduler: the loop sets the learning rate of every step (`set_lr`)."""
    import deepspeed

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    o = config.optim
    optimizer = torch.optim.AdamW(model.param_groups(o.weight_decay), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)
    ds_config = deepspeed_config(config, env.world_size)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    return engine, ds_config["gradient_accumulation_steps"]


def set_lr(engine: Any, lr: float) -> None:
    """The learning rate of the next update, in every parameter group."""
    for group in engine.optimizer.param_groups:
        group["lr"] = lr


def grad_norm(engine: Any, fallback: float | None) -> float:
    """The global gradient norm before clipping: DeepSpeed's where its optimizer wrapper records one (ZeRO 1-3,
    bf16/fp16), else `fallback` (ZeRO-0 with a client optimizer records none)."""
    norm = engine.get_global_grad_norm()
    if norm is None:
        return float("nan") if fallback is None else fallback
    return float(norm.item() if torch.is_tensor(norm) else norm)


def reduced_grad_norm(engine: Any) -> float:
    """L2 norm of the gradients at the accumulation boundary (ZeRO-0: already all-reduced, whole on every rank)."""
    grads = [p.grad.detach().float() for p in engine.module.parameters() if p.grad is not None]
    if not grads:
        return float("nan")
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))
