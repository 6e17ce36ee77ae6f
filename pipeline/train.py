"""The training loop. `main(config)` runs in every process, started by launch/local.py or launch/slurm.py.

    python -m pipeline.train RUN_DIR/config.yaml      (what the launchers run; `pope train` is the front door)

One step = gradient accumulation over micro-batches, then one AdamW update through the DeepSpeed engine
(pipeline/engine.py). Before every update all ranks agree on the loss, a non-finite loss and a stop request
(pipeline/stopping.py): a non-finite loss stops every rank before the update, and a stop request (SIGUSR2 or
SIGTERM on any rank) makes all ranks save one checkpoint together and exit with EXIT_STOPPED, ready to be resumed.
"""

from __future__ import annotations

import sys
import time
import warnings
from typing import Any, Callable

import torch

from data_prep.mds import TOKENS_COLUMN
from pipeline import distributed, init_from
from pipeline.checkpoint import Checkpointer, reseed
from pipeline.config import Config, load_config, model_identity, resolve
from pipeline.data import (ID_KEY, BatchMaker, batches_forever, clean_stale_shared_memory, count_windows,
                           digest_terms, make_loader, open_dataset, sample_digest, windows_per_sample)
from pipeline.distributed import DistEnv
from pipeline.engine import build_engine, grad_norm, lr_multiplier, reduced_grad_norm, set_lr
from pipeline.evaluate import evaluate
from pipeline.metrics import Metrics, Throughput, detect_peak_tflops
from pipeline.model import Transformer
from pipeline.run import RunFolder
from pipeline.state import RunIdentity, TrainState
from pipeline.stopping import (EXIT_NONFINITE, EXIT_STOPPED, EXIT_USER_ERROR, NonFiniteLoss, StopRequested, agree,
                               install_stop_handlers)


# ------------------------------------------------------------------------------------------------- the loop


def main(config: Config) -> dict[str, Any]:
    """Train (or resume) the run described by `config`; every process calls this."""
    env = distributed.init(config.launch.backend)
    try:
        return train(config, env)
    finally:
        distributed.shutdown()


def train(config: Config, env: DistEnv) -> dict[str, Any]:
    """Build the run `config` describes, resume it from its checkpoints if it has any, and train it to
    schedule.max_steps; returns the last step, train and val loss, and tokens seen."""
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")  # DeepSpeed's calls
    stop = install_stop_handlers()
    run = RunFolder.of(config)
    say = _printer(run, env)
    dataset = open_dataset(config)
    config = resolve(config, dataset.manifest)  # the vocabulary from the data; seq_len checked against it
    torch.manual_seed(config.seed)  # identical initial weights on every rank
    model = Transformer(config.model)
    # Counted before DeepSpeed sees the model: ZeRO-3 partitions the parameters, leaving each rank a shard.
    num_params, flops_per_token = model.num_params(), model.flops_per_token(config.data.seq_len)
    # The saved data position counts windows: another number per sample would point elsewhere in the epoch.
    identity = RunIdentity(model=model_identity(config.model), dataset=dataset.hash, world_size=env.world_size,
                           zero_stage=config.deepspeed.zero_stage,
                           windows_per_sample=windows_per_sample(dataset, config.data),
                           init=init_from.identity(config))
    checkpoints = Checkpointer(run.checkpoints, env, config.checkpoint.keep_last, identity, run.universal)
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
        resumed = checkpoints.load(engine, resume)
        step, tokens_seen = resumed.step, resumed.tokens_seen
        # The data position is global (samples of the epoch consumed by all processes together), so with the
        # same global batch the stream continues where it stopped on any number of processes.
        loader.load_state_dict(resumed.loader)
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

    metrics = Metrics(run, env.is_main, config.logging.tensorboard, start_step=step)
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
        checkpoints.save(engine, TrainState(step, tokens_seen, loader.state_dict()))

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
                    agreed = agree(float(loss_sum), digest_terms(step_ids), stop, env, step)
                    own_norm = reduced_grad_norm(engine) if config.deepspeed.zero_stage == 0 else None
                engine.step()
            step += 1
            tokens_seen += tokens_per_step
            throughput.add(tokens_per_step)
            last_loss = agreed.loss_sum / (accum * env.world_size)
            norm = grad_norm(engine, own_norm)
            record = {"train/loss": last_loss, "train/lr": lr, "train/grad_norm": norm}
            record["data/sample_digest"] = sample_digest(agreed.digest_terms)
            log_now = step % config.logging.log_every == 0 or step == max_steps
            if log_now:
                rate = throughput.report()
                record["train/tokens_per_s"] = rate
                if peak:
                    record["train/mfu"] = flops_per_token * rate / (peak * 1e12 * env.world_size)
                say(f"step {step}/{max_steps} | loss {last_loss:.4f} | lr {lr:.2e} | grad {norm:.3f} | "
                    f"{rate:,.0f} tok/s")
            metrics.scalars(step, record, to_tensorboard=log_now)
            if config.eval.every and step % config.eval.every == 0 and step < max_steps:
                last_val = validate()
            if agreed.stop:
                save()
                raise StopRequested(step, requeue=agreed.requeue)
            if step % config.checkpoint.every == 0 or step == max_steps:
                save()
        last_val = validate()  # the loop's own passes skip the last step, so this never repeats one
    finally:
        metrics.close()
    return {"step": step, "train_loss": last_loss, "val_loss": last_val["val/loss"] if last_val else None,
            "tokens_seen": tokens_seen}


def _printer(run: RunFolder, env: DistEnv) -> Callable[[str], None]:
    """Rank 0 prints progress lines and appends them to RUN/train.log; other ranks stay quiet."""
    def say(message: str) -> None:
        if env.is_main:
            line = f"[{time.strftime('%H:%M:%S')}] {message}"
            print(line, flush=True)
            with open(run.train_log, "a") as log:
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
