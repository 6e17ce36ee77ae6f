"""The training loop. `main(config)` runs in every process, started by launch/local.py or launch/slurm.py.

    python -m pipeline.train RUN_DIR/config.yaml      (what the launchers run; `pope train` is the front door)

One step = gradient accumulation over micro-batches, then one AdamW update through the DeepSpeed engine. Every
step all ranks all-reduce [loss, target tokens, non-finite flag, stop flag] once: the loss is logged, a non-finite
loss stops every rank before the update (so that state is never checkpointed), and a stop request (SIGUSR2 or
SIGTERM on any rank, e.g. SLURM's warning before preemption) makes all ranks save one checkpoint together and
exit with EXIT_STOPPED, ready to be resumed.
"""

from __future__ import annotations

import logging
import math
import shutil
import signal
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

from data_prep.mds import TOKENS_COLUMN
from pipeline import distributed, init_from
from pipeline.checkpoint import Checkpointer, reseed
from pipeline.config import Config, deep_merge, load_config, model_identity, to_yaml
from pipeline.data import (ID_KEY, BatchMaker, batches_forever, clean_stale_shared_memory, count_windows,
                           make_loader, open_dataset, sample_digest, windows_per_sample)
from pipeline.distributed import DistEnv
from pipeline.evaluate import evaluate
from pipeline.metrics import Metrics, Throughput, detect_peak_tflops
from pipeline.model import Transformer

EXIT_USER_ERROR = 2
EXIT_NONFINITE = 3
EXIT_STOPPED = 75  # checkpointed on request (preemption, time limit): run again to resume


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite; nothing after the last checkpoint was saved."""


class StopRequested(Exception):
    """A stop signal arrived; a checkpoint was saved at `step`. `requeue`: the signal was SIGUSR2 (SLURM's
    warning before a time limit, or a preemption notice), which asks to be continued; SIGTERM only stops."""

    def __init__(self, step: int, requeue: bool) -> None:
        super().__init__(f"stopped on request after step {step}; checkpoint saved, run again to resume")
        self.step, self.requeue = step, requeue


# -------------------------------------------------------------------------------------------- the run folder


def run_dir(config: Config) -> Path:
    return Path(config.run_dir) / config.name


def prepare_run_dir(config: Config, fresh: bool = False, adopt: bool = False) -> Path:
    """Create RUN (run_dir/name) and write the resolved config; with fresh, remove what an earlier run left; with
    adopt, mark checkpoint folders this program did not write complete as they are (pipeline/checkpoint.py)."""
    path = run_dir(config)
    if fresh and adopt:
        raise ValueError("--fresh and --adopt-checkpoints contradict each other: choose one")
    if adopt:
        from pipeline.checkpoint import adopt as adopt_checkpoints

        for folder in adopt_checkpoints(path / "checkpoints"):
            print(f"adopted {folder} as it is (checksums recorded now)", flush=True)
    if fresh and path.exists():
        for item in ("checkpoints", "tb", "metrics.jsonl", "train.log"):
            target = path / item
            shutil.rmtree(target, ignore_errors=True) if target.is_dir() else target.unlink(missing_ok=True)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.yaml").write_text(to_yaml(config))
    return path


# ---------------------------------------------------------------------------------------------- the engine


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
    """The DeepSpeed engine around the model and a client AdamW; returns (engine, accumulation steps).

    The learning rate is set by the loop before every step from `lr_multiplier(step)`, rather than by a stateful
    scheduler inside the checkpoint: the schedule is a pure function of the step, and a resumed run follows the
    config it is given (an edited optim.lr or schedule takes effect on resume).
    """
    import deepspeed

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    o = config.optim
    optimizer = torch.optim.AdamW(model.param_groups(o.weight_decay), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)
    ds_config = deepspeed_config(config, env.world_size)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    return engine, ds_config["gradient_accumulation_steps"]


def set_lr(engine: Any, lr: float) -> None:
    for group in engine.optimizer.param_groups:
        group["lr"] = lr


# ------------------------------------------------------------------------------------------------- signals


class StopFlag:
    """Set by SIGUSR2 or SIGTERM; read (and all-reduced) at every step boundary."""

    def __init__(self) -> None:
        self.requested = False
        self.requeue = False  # SIGUSR2 seen: stop to be continued (SLURM requeues); SIGTERM alone only stops
        self.installed = False

    def install(self) -> "StopFlag":
        if not self.installed:
            for sig in (signal.SIGUSR2, signal.SIGTERM):
                signal.signal(sig, self._handler)
            self.installed = True
        return self

    def _handler(self, signum: int, frame: Any) -> None:
        self.requested = True
        self.requeue = self.requeue or signum == signal.SIGUSR2


STOP = StopFlag()


def install_stop_handlers() -> StopFlag:
    """Catch SIGUSR2/SIGTERM from now on (idempotent); the SLURM task calls this first thing."""
    return STOP.install()


# ------------------------------------------------------------------------------------------------- the loop


def main(config: Config) -> dict[str, Any]:
    """Train (or resume) the run described by `config`; every process calls this."""
    env = distributed.init(config.launch.backend)
    try:
        return train(config, env)
    finally:
        distributed.shutdown()


def train(config: Config, env: DistEnv) -> dict[str, Any]:
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")  # DeepSpeed's calls
    stop = install_stop_handlers()
    folder = run_dir(config)
    say = _printer(folder, env)
    dataset = open_dataset(config)
    torch.manual_seed(config.seed)  # identical initial weights on every rank
    model = Transformer(config.model)
    # Counted before DeepSpeed sees the model: ZeRO-3 partitions the parameters, leaving each rank a shard.
    num_params, flops_per_token = model.num_params(), model.flops_per_token(config.data.seq_len)
    # The saved data position counts windows: another number per sample would point elsewhere in the epoch.
    identity = {"model": model_identity(config.model), "dataset": dataset.hash, "world_size": env.world_size,
                "zero_stage": config.deepspeed.zero_stage,
                "windows_per_sample": windows_per_sample(dataset, config.data), "init": init_from.identity(config)}
    checkpoints = Checkpointer(folder / "checkpoints", env, config.checkpoint.keep_last, identity)
    # init.from only starts a run: one with checkpoints resumes from them (or refuses, never starting over).
    if config.init.from_ and not checkpoints.complete_steps():
        record = init_from.init_weights(config, model)  # every rank, before DeepSpeed (ZeRO-3) partitions them
        checkpoints.metadata["init"] = record
        say(f"init: weights from {config.init.from_} step {record['step']} ({record['tensors']} tensors)")
    resume = checkpoints.choose()  # before the engine: another world size converts the checkpoint first
    engine, accum = build_engine(model, config, env)
    torch.manual_seed(config.seed + 1 + env.rank)  # different dropout masks per rank
    clean_stale_shared_memory(env)
    loader = make_loader(dataset, config.data, config.data.train_split, train=True)
    make_batch = BatchMaker(config, dataset)

    step, tokens_seen = 0, 0
    if resume is not None:
        client = checkpoints.load(engine, resume)
        step, tokens_seen = client["step"], client["tokens_seen"]
        # The data position is global (samples of the epoch consumed by all processes together), so with the
        # same global batch the stream continues where it stopped on any number of processes.
        loader.load_state_dict(client["loader"])
        say(f"resumed from step {step} ({tokens_seen:,} tokens seen)")
        if resume.resharded:
            reseed(config.seed, step, env.rank)
            how = f"converted to the universal checkpoint {resume.universal}" if resume.universal else \
                "ZeRO-0 keeps the whole optimizer state in every process, no conversion needed"
            say(f"world size changed: saved by {resume.saved_world_size} process(es), resumed on "
                f"{resume.world_size}: {how}; each process's RNG (dropout) reseeded from (seed, step, rank)")
    else:
        say(f"starting {config.name}: {num_params:,} parameters, {config.model.position} positions, "
            f"{env.world_size} process(es), ZeRO-{config.deepspeed.zero_stage}, {config.deepspeed.precision}, "
            f"{accum} micro-batch(es) of {config.data.micro_batch_size} per process per step")
    if env.is_main:  # reads only the shards' offset tables
        say(f"{config.data.train_split}: {count_windows(dataset, config.data, config.data.train_split).describe()}")

    metrics = Metrics(folder, env.is_main, config.logging.tensorboard, start_step=step)
    peak = config.logging.peak_tflops or detect_peak_tflops()
    val_loader = make_loader(dataset, config.data, config.data.val_split, train=False) \
        if dataset.has_split(config.data.val_split) else None
    if val_loader is not None and env.is_main:
        say(f"{config.data.val_split}: {count_windows(dataset, config.data, config.data.val_split).describe()}")
    batches = batches_forever(loader)
    throughput = Throughput()
    last_loss, last_val = float("nan"), None
    max_steps = config.schedule.max_steps
    schedule = lr_multiplier(config)
    tokens_per_step = config.data.batch_size * config.data.seq_len  # positions computed, padding included

    def save() -> None:
        state = {"step": step, "tokens_seen": tokens_seen, "loader": loader.state_dict()}
        checkpoints.save(engine, step, state)

    def validate() -> dict[str, float] | None:
        if val_loader is None:
            return None
        engine.eval()
        result = evaluate(lambda i, t: engine(i, t), val_loader, make_batch, env, config.eval.max_batches)
        engine.train()
        metrics.delta_figures(step, engine.module)  # every rank: ZeRO-3 gathers δ collectively
        metrics.scalars(step, {k: result[k] for k in ("val/loss", "val/ppl", "val/accuracy")})
        say(f"step {step}: val loss {result['val/loss']:.4f}, ppl {result['val/ppl']:.2f}, "
            f"accuracy {result['val/accuracy']:.3f}")
        return result

    try:
        engine.train()
        while step < max_steps:
            loss_sum = torch.zeros((), device=env.device)  # summed on the device: one sync per step, not per micro
            lr = config.optim.lr * schedule(step)
            set_lr(engine, lr)
            step_ids: list[int] = []
            for micro in range(accum):
                batch = next(batches)
                step_ids += batch[ID_KEY]
                inputs, targets = make_batch(batch[TOKENS_COLUMN], step=step, ids=batch[ID_KEY])
                _, loss = engine(inputs.to(env.device), targets.to(env.device))
                engine.backward(loss)
                loss_sum += loss.detach().float()
                if micro == accum - 1:  # before the update: agree on the loss, non-finite, stop
                    local = float(loss_sum)
                    total, bad, stops, requeues = distributed.all_reduce_sum(
                        [local, 0.0 if math.isfinite(local) else 1.0, 1.0 if stop.requested else 0.0,
                         1.0 if stop.requeue else 0.0], env)
                    if bad:
                        raise NonFiniteLoss(f"non-finite loss at step {step + 1} (on {int(bad)} rank(s)); stopped "
                                            f"before the update, nothing after step {step} was saved")
                    own_norm = _reduced_grad_norm(engine) if config.deepspeed.zero_stage == 0 else None
                engine.step()
            step += 1
            tokens_seen += tokens_per_step
            throughput.add(tokens_per_step)
            last_loss = total / (accum * env.world_size)
            grad_norm = _grad_norm(engine, own_norm)
            record = {"train/loss": last_loss, "train/lr": lr, "train/grad_norm": grad_norm}
            all_ids = [i for ids in distributed.all_gather(step_ids, env) for i in ids]  # a few hundred ints
            if env.is_main:
                record["data/sample_digest"] = sample_digest(all_ids)
            log_now = step % config.logging.log_every == 0 or step == max_steps
            if log_now:
                rate = throughput.report()
                record["train/tokens_per_s"] = rate
                if peak:
                    record["train/mfu"] = flops_per_token * rate / (peak * 1e12 * env.world_size)
                say(f"step {step}/{max_steps} | loss {last_loss:.4f} | lr {lr:.2e} | grad {grad_norm:.3f} | "
                    f"{rate:,.0f} tok/s")
            metrics.scalars(step, record, to_tensorboard=log_now)
            if config.eval.every and step % config.eval.every == 0 and step < max_steps:
                last_val = validate()
            if stops:
                save()
                raise StopRequested(step, requeue=bool(requeues))
            if step % config.checkpoint.every == 0 or step == max_steps:
                save()
        last_val = validate()  # the loop's own passes skip the last step, so this never repeats one
    finally:
        metrics.close()
    return {"step": step, "train_loss": last_loss, "val_loss": last_val["val/loss"] if last_val else None,
            "tokens_seen": tokens_seen}


def _grad_norm(engine: Any, fallback: float | None) -> float:
    """The global gradient norm before clipping: DeepSpeed's where its optimizer wrapper records one (ZeRO 1-3,
    bf16/fp16), else `fallback` (ZeRO-0 with a client optimizer records none)."""
    norm = engine.get_global_grad_norm()
    if norm is None:
        return float("nan") if fallback is None else fallback
    return float(norm.item() if torch.is_tensor(norm) else norm)


def _reduced_grad_norm(engine: Any) -> float:
    """L2 norm of the gradients at the accumulation boundary (ZeRO-0: already all-reduced, whole on every rank)."""
    grads = [p.grad.detach().float() for p in engine.module.parameters() if p.grad is not None]
    if not grads:
        return float("nan")
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))


def _printer(folder: Path, env: DistEnv) -> Callable[[str], None]:
    """Rank 0 prints progress lines and appends them to RUN/train.log; other ranks stay quiet."""
    def say(message: str) -> None:
        if env.is_main:
            line = f"[{time.strftime('%H:%M:%S')}] {message}"
            print(line, flush=True)
            with open(folder / "train.log", "a") as log:
                log.write(line + "\n")
    return say


def entry(argv: list[str] | None = None) -> int:
    """`python -m pipeline.train RUN_DIR/config.yaml`: one process of a run; exit code says how it ended."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m pipeline.train RUN_DIR/config.yaml", file=sys.stderr)
        return EXIT_USER_ERROR
    rank = distributed.env_from_os()[0]
    try:
        main(load_config(args[0]))
    except StopRequested as stopped:
        if rank == 0:
            print(f"pope: {stopped}", file=sys.stderr)
        return EXIT_STOPPED
    except NonFiniteLoss as err:
        if rank == 0:
            print(f"pope: error: {err}", file=sys.stderr)
        return EXIT_NONFINITE
    except ValueError as err:
        if rank == 0:
            print(f"pope: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except OSError as err:  # disk full, permissions: one line, from the rank that met it
        where = f" ({err.filename})" if err.filename else ""
        print(f"pope: error: rank {rank}: {err.strerror or err}{where}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        if rank == 0:
            print("pope: interrupted (the last checkpoint stands; the same command resumes)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(entry())
