"""Checkpoints: DeepSpeed's collective save plus client state, published last, verified by content on resume.

Layout of RUN/checkpoints/:
- `stepNNNNNNNN/`: DeepSpeed's files (model states, each rank's optimizer shard), `rng_rankNNNNN.pt` (each
  rank's python/numpy/torch/cuda RNG states, as tensors and plain types), `SAVING.json` (written by rank 0 before
  anything else: this folder is a save of this program) and `COMPLETE.json`, written by rank 0 only after every
  rank has finished writing. COMPLETE.json lists every file with its size and its xxh3-128 checksum (the ranks
  hash their shares of the files in parallel), the step, and the run's identity (model config, dataset hash,
  world size, ZeRO stage). A folder without it is an interrupted save.
- `latest`: the newest complete tag, replaced atomically after COMPLETE.json (for people and `pope status`).

On start the newest checkpoint whose COMPLETE.json is present and whose files all still have the listed sizes and
checksums is loaded; a damaged newer one (missing, truncated, or changed in place) is skipped with a warning.
Before DeepSpeed reads a file, pipeline/safe_load.py checks that it holds no code, and the whole process loads
with torch's weights-only unpickler: a planted payload is refused in one line, never run. A checkpoint of another
model config, dataset or ZeRO stage is refused. One saved by another number of processes is resumed: ZeRO 1-3
through a universal checkpoint that pipeline/universal.py converts it to (RUN/universal/stepNNNNNNNN; the
original is only read), ZeRO-0 as it is; each process's RNG state cannot carry over and is reseeded (`reseed`).

What a run may delete: only folders this program wrote (COMPLETE.json or SAVING.json). Checkpoint folders it did
not write (copied in, written by another tool or by a version without markers) are never deleted or overwritten;
when no complete checkpoint exists beside them the run stops and says so (`--fresh` to start over, which removes
them, or `--adopt-checkpoints` to mark them complete as they are and resume from them).
"""

from __future__ import annotations

import dataclasses
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

from data_prep.atomic import atomic_write as _atomic_write
from pipeline import distributed, safe_load
from pipeline.config import model_config_from_dict, model_identity
from pipeline.distributed import DistEnv
from pipeline.state import RunIdentity, TrainState
from pipeline.universal import convert, loading_universal, needs_conversion, remove_conversions

MARKER = "COMPLETE.json"
SAVING = "SAVING.json"
LATEST = "latest"
PREFIX = "step"
HASH = "xxh3_128"
CONVERT_HOURS = 6.0  # how long the other processes wait for rank 0 to convert a checkpoint (pipeline/universal.py)


def tag_for(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def _step_of(path: Path) -> int | None:
    digits = path.name[len(PREFIX):]
    return int(digits) if path.name.startswith(PREFIX) and digits.isdigit() else None


def hash_file(path: Path, chunk: int = 1 << 24) -> str:
    """xxh3-128 of a file's bytes: about 4.5 GB/s from the page cache on one core, so the disk is the limit."""
    return file_record(path, chunk)[HASH]


def file_record(path: Path, chunk: int = 1 << 24) -> dict[str, Any]:
    """{"size", "xxh3_128"} of a file, the size being the bytes actually read (not a possibly stale stat)."""
    import xxhash

    digest, size = xxhash.xxh3_128(), 0
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
            size += len(block)
    return {"size": size, HASH: digest.hexdigest()}


# ------------------------------------------------------------------------------------------------------ RNG


def rng_state() -> dict[str, Any]:
    """This process's RNG states as tensors and plain types (what a weights-only load accepts)."""
    np_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "python": random.getstate(),  # (version, tuple of ints, gauss): plain types
        "numpy": {"bit_generator": np_state["bit_generator"],
                  "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                  "pos": int(np_state["state"]["pos"]), "has_gauss": int(np_state["has_gauss"]),
                  "gauss": float(np_state["gauss"])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def reseed(seed: int, step: int, rank: int) -> None:
    """Seed this process's python, numpy and torch RNGs from (seed, step, rank): a resume on another number of
    processes, whose saved RNG states belong to ranks that may no longer exist."""
    key = np.random.SeedSequence([seed, step, rank]).generate_state(2)
    value = int(key[0]) << 32 | int(key[1])
    random.seed(value)
    np.random.seed(int(key[0]))
    torch.manual_seed(value)


def set_rng_state(state: dict[str, Any]) -> None:
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    numpy_state = state["numpy"]
    if isinstance(numpy_state, dict):
        np.random.set_state({"bit_generator": numpy_state["bit_generator"],
                             "state": {"key": numpy_state["key"].numpy().astype(np.uint32),
                                       "pos": numpy_state["pos"]},
                             "has_gauss": numpy_state["has_gauss"], "gauss": numpy_state["gauss"]})
    else:  # written before RNG states were stored as tensors: numpy's legacy tuple
        np.random.set_state(numpy_state)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------- what is in a folder


def written_by(files: Any) -> int | None:
    """How many processes wrote a checkpoint, from the names of its files, for checkpoints whose COMPLETE.json
    records no world size (adopted ones): one ZeRO optimizer shard per process under ZeRO 1-3, else one RNG file
    per process; None when neither is there."""
    names = [Path(name).name for name in files]
    shards = sum(1 for n in names if "zero_pp_rank_" in n and n.endswith("optim_states.pt"))
    return shards or sum(1 for n in names if n.startswith("rng_rank") and n.endswith(".pt")) or None


def newest_marker(folder: Path) -> dict[str, Any] | None:
    """The COMPLETE.json of the newest complete checkpoint under `folder` (RUN/checkpoints), unverified; None when
    there is none. For reports (`pope status`); loading verifies."""
    steps = sorted(s for s in (_step_of(p) for p in Path(folder).glob(f"{PREFIX}*") if (p / MARKER).is_file())
                   if s is not None)
    for step in reversed(steps):
        try:
            return json.loads((Path(folder) / tag_for(step) / MARKER).read_text())
        except (OSError, ValueError):
            continue
    return None


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, quota, permissions); the previous complete one stands."""


def _write_failure(path: Path, err: BaseException, complete: list[int]) -> str:
    """One line: which checkpoint failed, why (a full disk named as such), and what still stands."""
    try:
        stat = os.statvfs(path.parent)
        full = stat.f_bavail * stat.f_frsize < (1 << 20)
    except OSError:
        full = False
    if full or (isinstance(err, OSError) and err.errno == 28):
        why = "no space left on device"
    elif isinstance(err, OSError):
        why = f"{err.strerror or err}" + (f" ({err.filename})" if err.filename else "")
    else:
        why = " ".join(str(err).split())[:200]
    stands = f"the last complete checkpoint, {tag_for(complete[-1])}, stands" if complete else \
        "no complete checkpoint exists yet"
    return f"could not write checkpoint {path}: {why}; {stands} (the partial folder is removed at the next save)"


class ForeignCheckpoints(ValueError):
    """Checkpoint folders this program did not write, and no complete checkpoint of its own beside them."""


def foreign_folders(folder: Path) -> list[Path]:
    """Folders under RUN/checkpoints that this program did not write: neither COMPLETE.json nor SAVING.json."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir()
                  if p.is_dir() and not p.name.startswith(".") and not (p / MARKER).is_file()
                  and not (p / SAVING).is_file())


def adopt(folder: Path) -> list[Path]:
    """Mark the unmarked `stepNNNNNNNN` folders under `folder` complete as they are (`--adopt-checkpoints`).

    Their files are recorded with sizes and checksums, so later damage is noticed; their identity is unknown, so a
    resume checks it through DeepSpeed's own load (a shape or world-size mismatch fails there). Folders not named
    like this program's checkpoints cannot be resumed from (the step is in the name) and are refused.
    """
    adopted = []
    for path in foreign_folders(folder):
        step = _step_of(path)
        if step is None:
            raise ValueError(f"cannot adopt {path}: pope-pretrain checkpoints are named {PREFIX}NNNNNNNN (the step); "
                             "move it out of the checkpoints folder")
        files = {p.relative_to(path).as_posix(): file_record(p) for p in sorted(path.rglob("*")) if p.is_file()}
        marker = {"step": step, "identity": {}, "files": files, "adopted": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        _atomic_write(path / MARKER, json.dumps(marker, indent=1) + "\n")
        adopted.append(path)
    return adopted


def verify_files(path: Path, names: list[str], listed: dict[str, Any]) -> str | None:
    """Why some of `names` (files of checkpoint `path`) do not match COMPLETE.json, or None."""
    for name in names:
        file, entry = path / name, listed[name]
        size, digest = (entry, None) if isinstance(entry, int) else (entry["size"], entry.get(HASH))
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != size:
            return f"{name} has {file.stat().st_size} bytes, {size} were written"
        if digest is not None and hash_file(file) != digest:
            return f"{name} changed since it was written (checksum mismatch)"
    return None


class Checkpointer:
    """Saves and finds checkpoints of one run. `identity` is what a resume must match (None: this Checkpointer
    only finds, verifies and reads checkpoints, it cannot save); `metadata` is recorded beside it and not checked
    (where a fine-tune's weights came from); a resume carries the loaded checkpoint's metadata on into its later
    saves."""

    def __init__(self, folder: Path, env: DistEnv, keep_last: int, identity: RunIdentity | None = None,
                 universal_folder: Path | None = None) -> None:
        self.folder, self.env, self.keep_last, self.identity = Path(folder), env, keep_last, identity
        # Conversions for resuming on another number of processes (pipeline/universal.py): RunFolder.universal.
        self.universal_folder = Path(universal_folder) if universal_folder else None
        self.metadata: dict[str, Any] = {}

    # ------------------------------------------------------------------------------------------------ saving

    def save(self, engine: Any, state: TrainState) -> Path:
        """Collective: every rank calls it at the same step boundary."""
        if self.identity is None:
            raise ValueError("a Checkpointer without the run's identity cannot save: its checkpoints could not be "
                             "checked on resume")
        step = state.step
        tag = tag_for(step)
        path = self.folder / tag
        if path.exists() and not (path / SAVING).is_file():
            adopted = (path / MARKER).is_file()
            raise ValueError(f"{path} exists and was not written by this run{' (it was adopted)' if adopted else ''}; "
                             "it is never overwritten: move it away" +
                             ("" if adopted else ", or adopt it with --adopt-checkpoints"))
        distributed.barrier(self.env)  # every rank has looked before rank 0 marks the folder as its own
        if self.env.is_main:
            if path.exists():  # ours: re-saving a step (a run resumed from an older checkpoint)
                # Unpublished first, then emptied but for SAVING.json: an earlier save of this step by more
                # processes left files (ranks' optimizer shards, RNG states) that this save would not overwrite
                # and COMPLETE.json would then vouch for.
                (path / MARKER).unlink(missing_ok=True)
                for item in path.iterdir():
                    if item.name != SAVING:
                        shutil.rmtree(item) if item.is_dir() and not item.is_symlink() else item.unlink()
            else:  # the folder appears with its SAVING.json already inside: never a folder without a marker
                staging = self.folder / f".{tag}.tmp-{os.getpid()}"
                staging.mkdir(parents=True)
                _atomic_write(staging / SAVING, json.dumps({"step": step, "started": time.time()}) + "\n")
                os.rename(staging, path)
        distributed.barrier(self.env)
        try:
            # universal_checkpoint_info: DeepSpeed's converter to the universal format (a resume on another number
            # of processes) requires the key; it lands in the model states file.
            engine.save_checkpoint(str(self.folder), tag=tag, save_latest=False,
                                   client_state={**state.to_client_state(), "universal_checkpoint_info": {}})
            rng_file = path / f"rng_rank{self.env.rank:05d}.pt"
            torch.save(rng_state(), rng_file.with_suffix(".tmp"))
            os.replace(rng_file.with_suffix(".tmp"), rng_file)
        except (OSError, RuntimeError) as err:  # torch.save reports a full disk as a RuntimeError of its zip writer
            raise CheckpointWriteError(_write_failure(path, err, self.complete_steps())) from None
        distributed.barrier(self.env)  # every rank's files are on disk
        # One listing, rank 0's, for all: on a network file system another node's view of the folder may lag.
        names = distributed.broadcast(sorted(p.relative_to(path).as_posix() for p in path.rglob("*")
                                             if p.is_file() and p.name not in (MARKER, SAVING))
                                      if self.env.is_main else None, self.env)
        mine = {name: file_record(path / name) for name in names[self.env.rank::self.env.world_size]}
        shares = distributed.all_gather(mine, self.env)
        if self.env.is_main:
            files = {name: entry for share in shares for name, entry in share.items()}
            marker = {"step": step, "identity": self.identity.to_dict(), "metadata": self.metadata,
                      "files": dict(sorted(files.items())), "saved": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            try:
                _atomic_write(path / MARKER, json.dumps(marker, indent=1) + "\n")
                _atomic_write(self.folder / LATEST, tag + "\n")
            except OSError as err:
                raise CheckpointWriteError(_write_failure(path, err, self.complete_steps())) from None
            self._prune(step)
        distributed.barrier(self.env)
        return path

    def _prune(self, newest: int) -> None:
        """Keep the `keep_last` newest complete checkpoints up to `newest`; drop older ones and interrupted saves.

        Only folders this program wrote are candidates (COMPLETE.json or SAVING.json). Those past `newest` are from
        a future this run did not resume from (damaged, or never completed): they go too, so they can neither crowd
        good checkpoints out of the kept ones nor be found later.
        """
        complete = [s for s in self.complete_steps() if s <= newest]
        keep = set(complete[-self.keep_last:])
        for entry in self.folder.glob(f"{PREFIX}*"):
            step = _step_of(entry)
            ours = (entry / SAVING).is_file()  # adopted folders have a COMPLETE.json but were not written here
            if step is not None and ours and step not in keep:
                shutil.rmtree(entry, ignore_errors=True)
        if self.universal_folder is not None:
            remove_conversions(self.universal_folder, below=newest, step_of=_step_of)

    # ------------------------------------------------------------------------------------------------ loading

    def complete_steps(self) -> list[int]:
        """Steps with a COMPLETE.json, ascending (whether their files are intact is checked on load)."""
        steps = [_step_of(p) for p in self.folder.glob(f"{PREFIX}*") if (p / MARKER).is_file()]
        return sorted(s for s in steps if s is not None)

    def _listed(self, step: int) -> tuple[dict[str, Any] | None, str | None]:
        try:
            return json.loads((self.folder / tag_for(step) / MARKER).read_text())["files"], None
        except (OSError, ValueError, KeyError, TypeError) as err:
            return None, f"unreadable {MARKER}: {err}"

    def damage(self, step: int) -> str | None:
        """Why checkpoint `step` cannot be used, or None when its files are all there, unchanged (one process)."""
        listed, reason = self._listed(step)
        return reason if listed is None else verify_files(self.folder / tag_for(step), sorted(listed), listed)

    def damage_collective(self, step: int) -> str | None:
        """`damage`, with the checksums shared out over the ranks; every rank gets the same answer."""
        listed, reason = self._listed(step)
        if listed is not None:
            names = sorted(listed)[self.env.rank::self.env.world_size]
            reason = verify_files(self.folder / tag_for(step), names, listed)
        reasons = [r for r in distributed.all_gather(reason, self.env) if r is not None]
        return reasons[0] if reasons else None

    def check_safe(self, step: int) -> None:
        """Refuse (one line naming the file) any file of checkpoint `step` that could run code when loaded."""
        for file in sorted((self.folder / tag_for(step)).rglob("*.pt")):
            safe_load.check_file(file)

    def marker(self, step: int) -> dict[str, Any]:
        """The COMPLETE.json of checkpoint `step`."""
        return json.loads((self.folder / tag_for(step) / MARKER).read_text())

    def check_identity(self, step: int) -> int | None:
        """Refuse a checkpoint of another model, dataset or ZeRO stage, naming what differs; returns the world
        size it was saved with (None when it records none), which may differ: `choose` converts."""
        stored = self.marker(step)["identity"]
        if isinstance(stored.get("model"), dict):
            # Model keys added since the checkpoint was written take their defaults, which is what it trained with.
            # Checkpoints record model_identity (runtime keys such as attention_impl left out); older ones may not.
            stored["model"] = model_identity(model_config_from_dict(stored["model"]))
        current = self.identity.to_dict() if self.identity is not None else {}
        for key, value in current.items():
            if key != "world_size" and key in stored and stored[key] != value:  # adopted ones record none
                raise ValueError(_mismatch_message(key, stored[key], value, self.folder.parent))
        return stored.get("world_size") or written_by(self.marker(step).get("files", {}))

    def choose(self) -> Resume | None:
        """The checkpoint to resume from, chosen before the engine exists (collective), or None for a new run.

        The newest complete checkpoint whose files are intact, of this model and data, and free of code; a damaged
        newer one is skipped with a warning. Saved by another number of processes under ZeRO 1-3, it is converted
        to a universal checkpoint first (pipeline/universal.py). Checkpoints that exist but none of which is usable
        are an error, not a reason to start over silently; so are checkpoint folders this program did not write."""
        steps = self.complete_steps()
        foreign = foreign_folders(self.folder)
        if foreign and not steps:
            names = ", ".join(p.name for p in foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5
                                                               else "")
            raise ForeignCheckpoints(
                f"{self.folder} holds checkpoint folders that no save of this run marked complete ({names}); they "
                "are never loaded, overwritten or deleted unasked: start over with --fresh (removes them), adopt "
                "them as they are with --adopt-checkpoints, or move them away")
        ahead = [p for p in foreign if (_step_of(p) or 0) >= steps[-1]] if steps else []
        if ahead:  # the run would reach that step and refuse to save over it, losing the work in between
            raise ForeignCheckpoints(
                f"{self.folder} holds {', '.join(p.name for p in ahead)}, not written by this run, at or after its "
                f"newest checkpoint {tag_for(steps[-1])}: the run could not save there; move it away, adopt it "
                "with --adopt-checkpoints, or start over with --fresh (removes it)")
        if foreign and self.env.is_main:
            warnings.warn(f"leaving alone folders in {self.folder} that this run did not write: "
                          f"{', '.join(p.name for p in foreign)}", stacklevel=2)
        safe_load.enforce()
        for step in reversed(steps):
            reason = self.damage_collective(step)
            if reason is None:
                saved_world_size = self.check_identity(step)
                self.check_safe(step)
                stage = self.identity.zero_stage if self.identity is not None else 0
                universal = self._convert(step, saved_world_size) \
                    if needs_conversion(stage, saved_world_size, self.env.world_size) else None
                return Resume(step, saved_world_size or self.env.world_size, self.env.world_size, universal)
            if self.env.is_main:
                warnings.warn(f"skipping damaged checkpoint {self.folder / tag_for(step)}: {reason}", stacklevel=2)
        if steps:
            raise ValueError(f"none of the {len(steps)} checkpoints in {self.folder} can be loaded (see the warnings); "
                             "move them away to keep them, or start over with --fresh")
        return None

    def _convert(self, step: int, saved_world_size: int) -> Path:
        """Rank 0 converts checkpoint `step` to RUN/universal/stepNNNNNNNN (or reuses a conversion of it); every
        rank gets the folder, or the same error."""
        if self.universal_folder is None:
            raise ValueError(f"{self.folder} was saved by {saved_world_size} processes; resuming on "
                             f"{self.env.world_size} needs a folder for the converted checkpoint")
        target, error = self.universal_folder / tag_for(step), None
        # The others wait for rank 0 in a group of their own with a long timeout: converting a large model on a
        # shared file system can outlast the default process group's 30 minutes.
        waiting = distributed.waiting_group(self.env, hours=CONVERT_HOURS)
        if self.env.is_main:
            source = self.folder / tag_for(step)
            record = {"step": step, "from_world_size": saved_world_size, "to_world_size": self.env.world_size,
                      "zero_stage": self.identity.zero_stage if self.identity is not None else None}
            try:
                convert(source, target, hash_file(source / MARKER), record, file_record)
            except (ValueError, OSError) as err:
                error = " ".join(str(err).split())
        error = distributed.broadcast(error, self.env, group=waiting)
        if error is not None:
            raise ValueError(error)
        return target

    def load(self, engine: Any, resume: Resume) -> TrainState:
        """Load the chosen checkpoint into `engine`; returns its training state. Same world size: every process's
        RNG states are restored too. Another one: they belong to processes that are gone, and are left to the
        caller to seed (`reseed`)."""
        tag = tag_for(resume.step)
        rng = None
        try:
            if resume.universal is not None:
                with loading_universal(engine):
                    _, client_state = engine.load_checkpoint(str(resume.universal.parent), tag=resume.universal.name,
                                                             load_optimizer_states=True,
                                                             load_lr_scheduler_states=False)
            else:
                _, client_state = engine.load_checkpoint(str(self.folder), tag=tag, load_optimizer_states=True,
                                                         load_lr_scheduler_states=False)
            if not resume.resharded:
                rng = safe_load.load(self.folder / tag / f"rng_rank{self.env.rank:05d}.pt")
            ok = client_state is not None and "step" in client_state
            reason = None if ok else "not a pope-pretrain checkpoint (no step in its client state)"
        except Exception as err:  # noqa: BLE001 - agreed over the ranks below, then reported
            reason = f"{type(err).__name__}: {' '.join(str(err).split())[:300]}"
        reasons = [r for r in distributed.all_gather(reason, self.env) if r is not None]
        if reasons:
            # Its files are intact (checksums): a failure here is the environment's (memory, versions), not
            # damage. Falling back would train over it and later prune it, so the run stops instead.
            loaded = resume.universal if resume.universal is not None else self.folder / tag
            remedy = " (a conversion of this run: remove it to convert again)" if resume.universal else ""
            raise ValueError(f"cannot load {loaded}{remedy}, whose files are intact: {reasons[0]}")
        if rng is not None:
            set_rng_state(rng)
        self.metadata = {**self.marker(resume.step).get("metadata", {}), **self.metadata}
        if resume.resharded:  # carried on in later saves: `pope status` tells the run's history
            history = list(self.metadata.get("resharded", []))
            history.append({"step": resume.step, "from_world_size": resume.saved_world_size,
                            "to_world_size": resume.world_size, "universal": resume.universal is not None})
            self.metadata["resharded"] = history
        return TrainState.from_client_state(client_state)


@dataclasses.dataclass(frozen=True)
class Resume:
    """Which checkpoint a run resumes from, and how: `universal` is its converted copy when the number of
    processes changed under ZeRO 1-3 (None otherwise)."""

    step: int
    saved_world_size: int
    world_size: int
    universal: Path | None = None

    @property
    def resharded(self) -> bool:
        return self.saved_world_size != self.world_size


def _mismatch_message(key: str, stored: Any, current: Any, run_dir: Path) -> str:
    hint = "start over with --fresh, or give the run another name"
    if key == "model":
        changed = sorted(k for k in set(stored) | set(current) if stored.get(k) != current.get(k))
        what = ", ".join(f"model.{k}: {stored.get(k)!r} → {current.get(k)!r}" for k in changed)
        return f"cannot resume {run_dir}: its checkpoints are of another model ({what}); {hint}"
    if key == "dataset":
        return f"cannot resume {run_dir}: its checkpoints were trained on other data (manifest {stored}, now " \
               f"{current}); {hint}"
    if key == "zero_stage":
        return (f"cannot resume {run_dir} with ZeRO-{current}: its checkpoints were saved by ZeRO-{stored}; set "
                f"deepspeed.zero_stage={stored}, or {hint}")
    if key == "init":
        started = f"from {stored['from']}" + (f" step {stored['step']}" if stored.get("step") else "") \
            if stored else "from random weights"
        asked = f"init.from={current['from']}" if current else "no init.from"
        return (f"cannot resume {run_dir}: its checkpoints started {started}, the config now has {asked}; a "
                f"resumed run continues from its own checkpoints, so set init back, or {hint}")
    if key == "windows_per_sample":
        return (f"cannot resume {run_dir}: its data position counts {stored} window(s) per prepared sample, "
                f"data.seq_len now cuts {current} (ceil(prepared seq_len / data.seq_len)); set data.seq_len back, "
                f"or {hint}")
    return f"cannot resume {run_dir}: {key} was {stored!r}, now {current!r}; {hint}"
