"""Resuming on another number of processes: ZeRO checkpoints converted to DeepSpeed's universal format.

ZeRO 1-3 save each process's slice of the optimizer state (and with ZeRO-3 of the weights): a checkpoint written
by N processes only loads into N. DeepSpeed's universal checkpoint holds every parameter whole (its fp32 master
copy and Adam's two moments, one folder per parameter), which any number of processes can slice again.

When a run resumes on another world size (`Checkpointer.choose` sees the saved one differ), rank 0 converts the
checkpoint it resumes from into RUN/universal/stepNNNNNNNN with DeepSpeed's converter
(`deepspeed.checkpoint.ds_to_universal`), in a child process that loads weights-only like every load of this
project; the original checkpoint is only read. Every rank then loads the converted copy with DeepSpeed's
`load_universal` switched on for that one call (`loading_universal`). The copy carries the client state (step,
tokens seen, data position) along with the model states file. A conversion is reused while its CONVERTED.json
names the same source checkpoint (by the checksum of its COMPLETE.json) and its files keep their recorded sizes
and checksums, and removed by the run once a newer checkpoint of its own is complete.

ZeRO-0 keeps the whole optimizer state in one file every process reads, so it resumes on any world size as is.
What cannot carry over: each process's random state (dropout masks, python/numpy RNG), which belongs to ranks
that may no longer exist. Such a resume reseeds every process from (seed, step, rank) instead and says so;
with dropout off (the default) the training is otherwise the same computation, regrouped.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

CONVERTED = "CONVERTED.json"


def needs_conversion(zero_stage: int, saved_world_size: int | None, world_size: int) -> bool:
    """Whether a checkpoint saved by `saved_world_size` processes must be converted to load into `world_size`."""
    return zero_stage > 0 and saved_world_size is not None and saved_world_size != world_size


def conversion_source(target: Path) -> dict[str, Any] | None:
    """The CONVERTED.json record of a finished conversion folder, or None (absent, unfinished, unreadable)."""
    try:
        return json.loads((target / CONVERTED).read_text())
    except (OSError, ValueError):
        return None


def convert(source: Path, target: Path, fingerprint: str, record: dict[str, Any],
            file_record: Callable[[Path], dict[str, Any]], workers: int = 0) -> bool:
    """Convert checkpoint folder `source` into a universal checkpoint at `target` (rank 0 only); returns False
    when an earlier conversion of the same source (same `fingerprint`) is reused, its files all unchanged.

    The converter writes into a hidden staging folder beside `target`, which becomes `target` only once it
    succeeded and CONVERTED.json (with `record` and every file's `file_record`: size and checksum) is inside: a
    crash leaves no folder that looks finished. Only folders this program wrote are replaced or removed (its
    hidden staging and set-aside folders, and conversions with a CONVERTED.json)."""
    done = conversion_source(target)
    if done is not None and done.get("fingerprint") == fingerprint and _intact(target, done, file_record):
        return False
    if target.exists() and done is None:
        raise ValueError(f"{target} exists and was not written by a conversion of this run; move it away")
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in [*target.parent.glob(f".{target.name}.tmp-*"), *target.parent.glob(f".{target.name}.old-*")]:
        shutil.rmtree(stale, ignore_errors=True)  # ours, from a conversion or replacement that died
    staging = target.parent / f".{target.name}.tmp-{os.getpid()}"
    workers = workers or max(1, min(4, (os.cpu_count() or 1) // 2))
    started = time.time()
    proc = subprocess.run([sys.executable, "-m", "pipeline.universal", str(source), str(staging), str(workers)],
                          capture_output=True, text=True, env={**os.environ, "DS_ACCELERATOR": "cpu"})
    (target.parent / "latest_universal").unlink(missing_ok=True)  # the converter's pointer, to the staging name
    if proc.returncode != 0:
        shutil.rmtree(staging, ignore_errors=True)
        last = next((line for line in reversed(proc.stderr.strip().splitlines()) if line.strip()), "no message")
        raise ValueError(f"converting {source} to a universal checkpoint failed: {last.strip()[:300]}")
    files = {p.relative_to(staging).as_posix(): file_record(p) for p in sorted(staging.rglob("*")) if p.is_file()}
    note = {**record, "fingerprint": fingerprint, "source": str(source), "seconds": round(time.time() - started, 1),
            "converted": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "files": files}
    (staging / CONVERTED).write_text(json.dumps(note, indent=1) + "\n")
    if target.exists():  # an older or damaged conversion of ours: set aside by a rename, then removed
        aside = target.parent / f".{target.name}.old-{os.getpid()}"
        os.rename(target, aside)
        shutil.rmtree(aside, ignore_errors=True)
    os.rename(staging, target)
    return True


def _intact(target: Path, done: dict[str, Any], file_record: Callable[[Path], dict[str, Any]]) -> bool:
    """Whether every file CONVERTED.json lists is there with its recorded size and checksum."""
    listed = done.get("files")
    if not isinstance(listed, dict) or not listed:
        return False
    return all((target / name).is_file() and (target / name).stat().st_size == entry.get("size")
               and file_record(target / name) == entry for name, entry in listed.items())


def remove_conversions(folder: Path, below: int, step_of: Any) -> None:
    """Remove the conversions under `folder` (RUN/universal) of steps before `below`: a newer checkpoint of the
    run's own supersedes them. Folders without CONVERTED.json were not written here and stay."""
    if not folder.is_dir():
        return
    for entry in folder.iterdir():
        step = step_of(entry)
        if step is not None and step < below and conversion_source(entry) is not None:
            shutil.rmtree(entry, ignore_errors=True)


@contextlib.contextmanager
def loading_universal(engine: Any) -> Iterator[None]:
    """DeepSpeed's `checkpoint.load_universal` switched on for the loads inside the block only, and the optimizer's
    param-group hyperparameters kept as the run set them up.

    The engine reads the switch when it loads (`engine.load_universal_checkpoint()`); DeepSpeed 0.19.8 reads it
    nowhere else, but issue #7546 reports ZeRO-3 saves of an engine configured with it writing rank 0's states
    only, so it is never left on. ZeRO-3's
    universal load copies the first param group's hyperparameters onto every group, which would give the
    no-decay group (norms, biases, δ) weight decay (their weights 3e-6 off after one step, measured).
    The groups' settings are the config's, so they are put back after the load (the learning rate is set every
    step anyway). ZeRO-3's load also gives every group's state one and the same `step` tensor, which torch's AdamW
    increments in place, once per group: the second group's bias correction would run a step ahead (3e-5 off after
    one step, measured). Each state gets its own copy."""
    config = engine._config  # noqa: SLF001 - DeepSpeed exposes no setter; the getter reads this attribute
    before = config.load_universal_checkpoint
    groups = [{k: v for k, v in group.items() if k != "params"} for group in engine.optimizer.param_groups]
    config.load_universal_checkpoint = True
    try:
        yield
    finally:
        config.load_universal_checkpoint = before
    for group, settings in zip(engine.optimizer.param_groups, groups):
        group.update(settings)
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)  # the client AdamW inside ZeRO's wrapper
    for state in inner.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()


def _main(argv: list[str]) -> int:
    """`python -m pipeline.universal SOURCE TARGET WORKERS`: the conversion, in a process of its own so that its
    worker pool starts from a clean process and its chatter stays out of the training log."""
    from pipeline import safe_load

    source, target, workers = argv
    # A preemption notice (SIGUSR2) reaches every process of the job step: this one finishes the conversion and
    # the training process, which has noted the request, stops at its first step boundary with a checkpoint.
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    safe_load.enforce()  # the converter calls torch.load(weights_only=False): refuse code all the same
    from deepspeed.checkpoint import ds_to_universal

    args = argparse.Namespace(input_folder=source, output_folder=target, num_extract_workers=int(workers),
                              num_merge_workers=max(1, int(workers) // 2), keep_temp_folder=False, strict=True,
                              inject_missing_state=True)  # checkpoints saved before the project recorded it
    ds_to_universal.main(args)
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
