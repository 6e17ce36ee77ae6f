"""Checkpoints: DeepSpeed's collective save plus client state, published last; resume from the newest whole one.

Layout of RUN/checkpoints/:
- `stepNNNNNNNN/`: DeepSpeed's files (model states, each rank's optimizer shard), `rng_rankNNNNN.pt` (each
  rank's python/numpy/torch/cuda RNG states), and `COMPLETE.json`, written by rank 0 only after every rank has
  finished writing. It lists every file with its size, the step, and the run's identity (model config, dataset
  hash, world size, ZeRO stage). A folder without it is an interrupted save and is ignored.
- `latest`: the newest complete tag, replaced atomically after COMPLETE.json (for people and `pope status`).

On start the newest checkpoint whose COMPLETE.json is present and whose files still have the listed sizes is
loaded; a damaged newer one is skipped with a warning. A checkpoint of another model config or dataset is refused.
A different world size is refused as well: ZeRO partitions the optimizer state by rank, and streaming's position
is counted in global samples but the ranks' shares would change; convert with DeepSpeed's universal checkpoint
tools, or start a new run from exported weights.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline import distributed
from pipeline.distributed import DistEnv

MARKER = "COMPLETE.json"
LATEST = "latest"
PREFIX = "step"


def tag_for(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Checkpointer:
    """Saves and finds checkpoints of one run. `identity` is what a resume must match."""

    def __init__(self, folder: Path, env: DistEnv, keep_last: int, identity: dict[str, Any]) -> None:
        self.folder, self.env, self.keep_last, self.identity = Path(folder), env, keep_last, identity

    # ------------------------------------------------------------------------------------------------ saving

    def save(self, engine: Any, step: int, client_state: dict[str, Any]) -> Path:
        """Collective: every rank calls it at the same step boundary."""
        tag = tag_for(step)
        path = self.folder / tag
        if self.env.is_main and (path / MARKER).exists():
            (path / MARKER).unlink()  # re-saving a step (a resumed run saving again) unpublishes it first
        distributed.barrier(self.env)
        engine.save_checkpoint(str(self.folder), tag=tag, client_state=client_state, save_latest=False)
        rng_file = path / f"rng_rank{self.env.rank:05d}.pt"
        torch.save(rng_state(), rng_file.with_suffix(".tmp"))
        os.replace(rng_file.with_suffix(".tmp"), rng_file)
        distributed.barrier(self.env)  # every rank's files are on disk
        if self.env.is_main:
            files = {p.relative_to(path).as_posix(): p.stat().st_size
                     for p in sorted(path.rglob("*")) if p.is_file() and p.name != MARKER}
            marker = {"step": step, "identity": self.identity, "files": files,
                      "saved": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            _atomic_write(path / MARKER, json.dumps(marker, indent=1) + "\n")
            _atomic_write(self.folder / LATEST, tag + "\n")
            self._prune(step)
        distributed.barrier(self.env)
        return path

    def _prune(self, newest: int) -> None:
        """Keep the `keep_last` newest checkpoints up to `newest`; drop older ones and interrupted saves.

        Folders past `newest` are from a future this run did not resume from (damaged, or never completed):
        they go too, so they can neither crowd good checkpoints out of the kept ones nor be found later.
        """
        complete = [s for s in self.complete_steps() if s <= newest]
        keep = set(complete[-self.keep_last:])
        for entry in self.folder.glob(f"{PREFIX}*"):
            step = _step_of(entry)
            if step is not None and step not in keep:
                shutil.rmtree(entry, ignore_errors=True)

    # ------------------------------------------------------------------------------------------------ loading

    def complete_steps(self) -> list[int]:
        """Steps with a COMPLETE.json, ascending (whether their files are intact is checked on load)."""
        steps = [_step_of(p) for p in self.folder.glob(f"{PREFIX}*") if (p / MARKER).is_file()]
        return sorted(s for s in steps if s is not None)

    def damage(self, step: int) -> str | None:
        """Why checkpoint `step` cannot be used, or None when its files are all there with their sizes."""
        path = self.folder / tag_for(step)
        try:
            marker = json.loads((path / MARKER).read_text())
        except (OSError, json.JSONDecodeError) as err:
            return f"unreadable {MARKER}: {err}"
        for name, size in marker["files"].items():
            file = path / name
            if not file.is_file():
                return f"{name} is missing"
            if file.stat().st_size != size:
                return f"{name} has {file.stat().st_size} bytes, {size} were written"
        return None

    def check_identity(self, step: int) -> None:
        """Refuse a checkpoint of another model, dataset or world size, naming what differs."""
        stored = json.loads((self.folder / tag_for(step) / MARKER).read_text())["identity"]
        for key, value in self.identity.items():
            if stored.get(key) != value:
                raise ValueError(_mismatch_message(key, stored.get(key), value, self.folder.parent))

    def load(self, engine: Any) -> dict[str, Any] | None:
        """Load the newest usable checkpoint into `engine` and restore RNG; returns its client state, or None
        when the run has no checkpoint. Checkpoints that exist but none of which loads are an error, not a
        reason to start over silently."""
        steps = self.complete_steps()
        for step in reversed(steps):
            reason = self.damage(step)
            # Every rank must take the same branch (the load below is collective): damaged anywhere, skip.
            if distributed.all_reduce_sum([0.0 if reason is None else 1.0], self.env)[0] and reason is None:
                reason = "damaged as seen from another rank"
            if reason is None:
                self.check_identity(step)
                try:
                    _, client_state = engine.load_checkpoint(str(self.folder), tag=tag_for(step),
                                                             load_optimizer_states=True,
                                                             load_lr_scheduler_states=False)
                    rng = torch.load(self.folder / tag_for(step) / f"rng_rank{self.env.rank:05d}.pt",
                                     weights_only=False)
                    ok = client_state is not None
                except Exception as err:  # noqa: BLE001 - any failure: try the next older checkpoint
                    reason, ok = f"loading failed: {type(err).__name__}: {err}", False
                if distributed.all_reduce_sum([0.0 if ok else 1.0], self.env)[0] == 0:
                    set_rng_state(rng)
                    return client_state
                reason = reason or "loading failed on another rank"
            if self.env.is_main:
                warnings.warn(f"skipping damaged checkpoint {self.folder / tag_for(step)}: {reason}", stacklevel=2)
        if steps:
            raise ValueError(f"none of the {len(steps)} checkpoints in {self.folder} can be loaded (see the warnings); "
                             "move them away to keep them, or start over with --fresh")
        return None


def _step_of(path: Path) -> int | None:
    digits = path.name[len(PREFIX):]
    return int(digits) if path.name.startswith(PREFIX) and digits.isdigit() else None


def _mismatch_message(key: str, stored: Any, current: Any, run_dir: Path) -> str:
    hint = "start over with --fresh, or give the run another name"
    if key == "model":
        changed = sorted(k for k in set(stored) | set(current) if stored.get(k) != current.get(k))
        what = ", ".join(f"model.{k}: {stored.get(k)!r} → {current.get(k)!r}" for k in changed)
        return f"cannot resume {run_dir}: its checkpoints are of another model ({what}); {hint}"
    if key == "dataset":
        return f"cannot resume {run_dir}: its checkpoints were trained on other data (manifest {stored}, now " \
               f"{current}); {hint}"
    if key == "world_size":
        return (f"cannot resume {run_dir} on {current} processes: it was saved by {stored}, and ZeRO partitions "
                f"optimizer state per process; run with {stored} processes, or convert the checkpoint with "
                f"DeepSpeed's universal checkpoint tools")
    return f"cannot resume {run_dir}: {key} was {stored!r}, now {current!r}; {hint}"
