"""Checkpoints that are verified by content, never run code, and are never deleted unless this program wrote them.

Real runs (`pope train` in subprocesses, DeepSpeed on gloo), real files changed on disk the way a bad disk, a
careless copy or a hostile user would.
"""

import builtins
import json
import shutil
import subprocess

import pytest
import torch

from conftest import metrics, run_pope, small_tmpfs, tiny_train_args
from pipeline.checkpoint import HASH, Checkpointer, hash_file
from pipeline.distributed import DistEnv

pytestmark = pytest.mark.slow

ONE_PROCESS = ["launch.nproc=1", "schedule.warmup_steps=1", "eval.every=0", "checkpoint.every=2",
               "checkpoint.keep_last=5"]


def _checkpoints(run):
    return sorted(p for p in (run / "checkpoints").iterdir() if p.is_dir())


def _rehash(folder, name):
    """Record a file's new size and checksum in COMPLETE.json (so only the loader's own checks can refuse it)."""
    marker = json.loads((folder / "COMPLETE.json").read_text())
    marker["files"][name] = {"size": (folder / name).stat().st_size, HASH: hash_file(folder / name)}
    (folder / "COMPLETE.json").write_text(json.dumps(marker))


@pytest.fixture(scope="module")
def finished_run(text_dataset, tmp_path_factory):
    """A 1-process ZeRO-2 run with checkpoints at steps 2 and 4 (copied by each test that changes it)."""
    root = tmp_path_factory.mktemp("finished")
    run_pope(*tiny_train_args(text_dataset, root, "run", *ONE_PROCESS, "schedule.max_steps=4"))
    return root / "run"


def _copy(run, tmp_path):
    target = tmp_path / "run"
    shutil.copytree(run, target)
    config = (target / "config.yaml").read_text().replace(f"run_dir: {run.parent}", f"run_dir: {tmp_path}")
    (target / "config.yaml").write_text(config)
    return target


def test_changed_in_place_at_same_size_falls_back(text_dataset, finished_run, tmp_path):
    run = _copy(finished_run, tmp_path)
    newest = _checkpoints(run)[-1]
    optim = next(newest.glob("*optim_states.pt"))
    data = bytearray(optim.read_bytes())
    data[len(data) // 2: len(data) // 2 + 64] = bytes(64)  # a bad sector: same size, other content
    optim.write_bytes(bytes(data))
    args = tiny_train_args(text_dataset, tmp_path, "run", *ONE_PROCESS, "schedule.max_steps=6")
    resumed = run_pope(*args)
    assert "skipping damaged checkpoint" in resumed.stderr and "checksum mismatch" in resumed.stderr
    assert "resumed from step 2" in resumed.stdout
    checkpoints = Checkpointer(run / "checkpoints", DistEnv(), keep_last=5)
    assert checkpoints.complete_steps() == [2, 4, 6] and checkpoints.damage(4) is None  # step 4 saved anew
    export = run_pope("export", str(run), "--out", str(tmp_path / "export"))
    assert export.returncode == 0


class Payload:
    """Unpickling this writes a file: the proof that a load ran code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (builtins.exec, (f"open({self.marker!r}, 'w').write('ran')",))


def _plant(folder, kind, marker):
    """Put a payload into one file kind of checkpoint `folder`; returns the file's name."""
    if kind == "model_states":  # DeepSpeed's module file, which also holds the client state (loader position)
        name = "mp_rank_00_model_states.pt"
    elif kind == "optim_states":
        name = next(folder.glob("*optim_states.pt")).name
    else:
        name = "rng_rank00000.pt"
    state = torch.load(folder / name, weights_only=False)  # the test's own file: trusted
    if kind == "model_states":
        state["loader"]["payload"] = Payload(marker)
    else:
        state["payload"] = Payload(marker)
    torch.save(state, folder / name)
    _rehash(folder, name)
    return name


@pytest.mark.parametrize("kind", ["model_states", "optim_states", "rng"])
def test_planted_payload_never_runs(text_dataset, finished_run, tmp_path, kind):
    run = _copy(finished_run, tmp_path)
    marker = tmp_path / "payload-ran"
    for folder in _checkpoints(run):
        name = _plant(folder, kind, marker)
    commands = {"resume": tiny_train_args(text_dataset, tmp_path, "run", *ONE_PROCESS, "schedule.max_steps=6"),
                "export": ["export", str(run), "--out", str(tmp_path / "export")],
                "eval": ["eval", "val", str(run)]}
    for what, args in commands.items():
        proc = run_pope(*args, check=False)
        errors = [line for line in proc.stderr.splitlines() if line.startswith("pope: error:")]
        assert proc.returncode == 2, (what, proc.stderr[-2000:])
        assert len(errors) == 1 and "refusing to load" in errors[0] and name in errors[0], (what, proc.stderr)
        assert "Traceback" not in proc.stderr
        assert not marker.exists(), f"{what} ran the payload planted in {kind}"
    assert not (tmp_path / "export" / "model.safetensors").exists()


def test_unmarked_checkpoints_stop_the_run_and_are_kept(text_dataset, finished_run, tmp_path):
    run = _copy(finished_run, tmp_path)
    before = {}
    for folder in _checkpoints(run):  # as copied from elsewhere, or written by a tool without markers
        (folder / "COMPLETE.json").unlink()
        (folder / "SAVING.json").unlink()
        before.update({p: hash_file(p) for p in folder.iterdir()})
    args = tiny_train_args(text_dataset, tmp_path, "run", *ONE_PROCESS, "schedule.max_steps=6")
    proc = run_pope(*args, check=False)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("pope: error:")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr
    assert "step00000002, step00000004" in errors[0] and "--fresh" in errors[0] and "--adopt-checkpoints" in errors[0]
    assert {p: hash_file(p) for p in before} == before  # nothing deleted or changed
    assert not any(m.get("step", 0) > 4 for m in metrics(run))

    foreign = run / "checkpoints" / "global_step3"  # another tool's folder beside them
    foreign.mkdir()
    (foreign / "weights.pt").write_bytes(b"not ours")
    adopted = run_pope(*args, "--adopt-checkpoints", check=False)
    assert adopted.returncode == 2 and "cannot adopt" in adopted.stderr and "global_step3" in adopted.stderr
    shutil.move(foreign, tmp_path / "aside")
    adopted = run_pope(*args, "--adopt-checkpoints")
    assert "adopted" in adopted.stdout and "resumed from step 4" in adopted.stdout

    shutil.move(tmp_path / "aside", foreign)  # back beside complete checkpoints: warned about, never pruned
    more = run_pope(*tiny_train_args(text_dataset, tmp_path, "run", *ONE_PROCESS, "schedule.max_steps=14",
                                     "checkpoint.keep_last=1"))
    assert "did not write" in more.stderr and (foreign / "weights.pt").read_bytes() == b"not ours"
    # adopted folders were not written by this program either: kept; its own older ones are pruned
    assert [p.name for p in _checkpoints(run)] == ["global_step3", "step00000002", "step00000004", "step00000014"]

    ahead = run / "checkpoints" / "step00000020"  # an unmarked folder the run would have to save over
    ahead.mkdir()
    proc = run_pope(*tiny_train_args(text_dataset, tmp_path, "run", *ONE_PROCESS, "schedule.max_steps=24"),
                    check=False)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("pope: error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "step00000020" in errors[0], proc.stderr
    assert ahead.is_dir() and max(m["step"] for m in metrics(run)) == 14  # stopped before training on


def test_disk_full_while_checkpointing_loses_nothing(text_dataset, tmp_path):
    with small_tmpfs(tmp_path / "small", "2m") as mount:
        args = tiny_train_args(text_dataset, mount, "run", *ONE_PROCESS, "checkpoint.keep_last=10",
                               "schedule.max_steps=12")
        proc = run_pope(*args, check=False)
        errors = [line for line in proc.stderr.splitlines() if line.startswith("pope: error:")]
        assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-3000:]
        assert "no space left on device" in errors[0] and "stands" in errors[0] and "Traceback" not in proc.stderr
        complete = [p for p in _checkpoints(mount / "run") if (p / "COMPLETE.json").exists()]
        assert complete, "no checkpoint fitted at all: make the file system larger"
        subprocess.run(["mount", "-o", "remount,size=64m", str(mount)], check=True)
        resumed = run_pope(*args)
        assert f"resumed from step {int(complete[-1].name[4:])}" in resumed.stdout
        assert max(m["step"] for m in metrics(mount / "run")) == 12
