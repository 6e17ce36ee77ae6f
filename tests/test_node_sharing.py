"""Jobs sharing one node: runs that never touch each other's shared memory, and processes that never outlive their
parent. Real `pope` processes, real DeepSpeed ranks (gloo), real data-loader and prep workers, real signals."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, metrics, run_pope, tiny_train_args
from data_prep.shm import SHM_DIR, remove_dead_segments

pytestmark = pytest.mark.slow


def _loss_bits(run):
    return {m["step"]: m["train/loss_hex"] for m in metrics(run) if "train/loss_hex" in m}


def _descendants(pid):
    """Every live process below `pid` (from /proc's parent links)."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _alive(pid):
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _wait_gone(pids, seconds):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.1)
    return [p for p in pids if _alive(p)]


def _start(args, env=None):
    return subprocess.Popen([sys.executable, "-m", "launch.cli", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)


def _wait_for_step(run, step, proc, seconds=300):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and proc.poll() is None:
        if any(m.get("step", 0) >= step for m in metrics(run)):
            return
        time.sleep(0.05)
    raise AssertionError(f"{run} did not reach step {step}: {proc.poll()}")


SHARED = ["checkpoint.every=1000", "eval.every=50", "eval.max_batches=2", "data.num_workers=1",
          "model.dropout=0.1", "logging.log_every=10"]


def _signal_group(proc, sig):
    os.killpg(proc.pid, sig)


def test_two_runs_on_one_node_one_resuming_keep_their_own_data_order(text_dataset, tmp_path):
    """A trains from scratch; B resumes (from a later epoch) while A runs, and lives on while A starts its next
    epoch, when streaming looks up the resume state by name. The order is made certain by pausing the jobs
    (SIGSTOP/SIGCONT of their process groups) rather than left to timing. Each job has its own TMPDIR."""
    per_epoch = json.loads((text_dataset / "manifest.json").read_text())["splits"]["train"]["samples"] // 8
    a_steps, b_first, b_steps = per_epoch + 20, per_epoch + 10, per_epoch + 30
    alone, together = tmp_path / "alone", tmp_path / "together"
    run_pope(*tiny_train_args(text_dataset, alone, "a", *SHARED, f"schedule.max_steps={a_steps}"))
    for where in (alone, together):
        run_pope(*tiny_train_args(text_dataset, where, "b", *SHARED, f"schedule.max_steps={b_first}",
                                  f"checkpoint.every={b_first}"))
    run_pope(*tiny_train_args(text_dataset, alone, "b", *SHARED, f"schedule.max_steps={b_steps}"))
    envs = []
    for name in ("a", "b"):
        (tmp_path / f"tmp_{name}").mkdir()
        envs.append({**os.environ, "TMPDIR": str(tmp_path / f"tmp_{name}")})
    a = _start(tiny_train_args(text_dataset, together, "a", *SHARED, f"schedule.max_steps={a_steps}"), env=envs[0])
    _wait_for_step(together / "a", 3, a)
    _signal_group(a, signal.SIGSTOP)  # A holds its data sets, in epoch 0
    b = _start(tiny_train_args(text_dataset, together, "b", *SHARED, f"schedule.max_steps={b_steps}"), env=envs[1])
    _wait_for_step(together / "b", b_first + 2, b)
    _signal_group(b, signal.SIGSTOP)  # B has resumed (its resume state is in shared memory) and stays alive
    _signal_group(a, signal.SIGCONT)
    out_a = a.communicate(timeout=600)
    _signal_group(b, signal.SIGCONT)
    out_b = b.communicate(timeout=600)
    assert a.returncode == 0 and b.returncode == 0, (out_a, out_b)
    assert f"resumed from step {b_first}" in out_b[0]
    for name, steps in (("a", a_steps), ("b", b_steps)):
        bits_alone, bits_together = _loss_bits(alone / name), _loss_bits(together / name)
        assert sorted(bits_alone) == list(range(1, steps + 1))
        assert bits_together == bits_alone, f"run {name}'s losses changed when it shared the node"
    for out, err in (out_a, out_b):
        assert "leaked shared_memory" not in err, err[-2000:]


JOB = """
import os, sys, time
from multiprocessing import resource_tracker, shared_memory
from data_prep import shm
shm._hold_lock(sys.argv[1])
segment = shared_memory.SharedMemory(sys.argv[1] + "_000000_locals", create=True, size=16)
segment.close()  # unmapped and closed: only the namespace lock says that the job lives
resource_tracker.unregister(segment._name, "shared_memory")  # as a SIGKILLed job's (its tracker dies too)
print("ready", flush=True)
if sys.argv[2] == "die":
    os._exit(0)
time.sleep(600)
"""


def test_dead_jobs_segments_are_removed_live_ones_kept(tmp_path):
    import tempfile

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    live = subprocess.Popen([sys.executable, "-c", JOB, "pTESTlive", "live"], stdout=subprocess.PIPE, text=True,
                            env=env)
    assert live.stdout.readline().strip() == "ready"
    dead = subprocess.run([sys.executable, "-c", JOB, "pTESTdead", "die"], capture_output=True, text=True, env=env)
    assert dead.stdout.strip() == "ready"
    filelock = Path(tempfile.gettempdir()) / "pTESTdead_000000_barrier_filelock"
    filelock.write_text("")
    young = SHM_DIR / "000777_barrier"  # another program's streaming, just created: left alone for a minute
    young.write_bytes(b"x")
    other = SHM_DIR / "not_streaming_000000_locals_x"  # not streaming's name: never touched
    other.write_bytes(b"x")
    try:
        removed = remove_dead_segments()
        assert {"pTESTdead_000000_locals", "pope-pTESTdead.lock", filelock.name} <= set(removed)
        assert not (SHM_DIR / "pTESTdead_000000_locals").exists() and not filelock.exists()
        assert (SHM_DIR / "pTESTlive_000000_locals").exists() and (SHM_DIR / "pope-pTESTlive.lock").exists()
        assert young.exists() and other.exists()
        live.kill()
        live.wait()
        removed = remove_dead_segments()
        assert "pTESTlive_000000_locals" in removed and not (SHM_DIR / "pope-pTESTlive.lock").exists()
    finally:
        live.kill()
        for path in (young, other, SHM_DIR / "pTESTlive_000000_locals", SHM_DIR / "pope-pTESTlive.lock"):
            path.unlink(missing_ok=True)


def test_killed_launcher_takes_ranks_and_loader_workers_with_it(text_dataset, tmp_path):
    args = tiny_train_args(text_dataset, tmp_path, "run", "schedule.max_steps=2000", "data.num_workers=1",
                           "eval.every=0", "checkpoint.every=1000")
    launcher = _start(args)
    _wait_for_step(tmp_path / "run", 2, launcher)
    below = _descendants(launcher.pid)
    assert len(below) >= 4, below  # two ranks, each with a loader worker
    launcher.send_signal(signal.SIGKILL)
    launcher.wait()
    assert _wait_gone(below, 10) == [], "processes outlived their killed launcher"


def test_a_failing_rank_stops_its_siblings(text_dataset, tmp_path):
    args = tiny_train_args(text_dataset, tmp_path, "run", "schedule.max_steps=2000", "data.num_workers=1",
                           "eval.every=0", "checkpoint.every=1000")
    launcher = _start(args)
    _wait_for_step(tmp_path / "run", 2, launcher)
    ranks = [p for p in _descendants(launcher.pid) if "pipeline.train" in Path(f"/proc/{p}/cmdline").read_text()]
    below = _descendants(launcher.pid)
    os.kill(max(ranks), signal.SIGKILL)  # one rank dies; its peer waits in a collective
    started = time.monotonic()
    launcher.communicate(timeout=60)
    assert launcher.returncode != 0 and time.monotonic() - started < 20
    assert _wait_gone(below, 10) == []


def test_killed_prep_takes_its_workers_with_it(text_dataset, tmp_path):
    from conftest import synthetic_documents

    inputs = tmp_path / "inputs"
    inputs.mkdir()
    docs = synthetic_documents(400, 1)
    for index in range(40):
        (inputs / f"part{index:03d}.jsonl").write_text("\n".join(json.dumps({"text": d * 5}) for d in docs))
    prep = _start(["prep", "text", "--input", str(inputs), "--out", str(tmp_path / "out"), "--workers", "2",
                   "--tokenizer-model", str(text_dataset / "tokenizer" / "spm.model")])
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(_descendants(prep.pid)) < 2 and prep.poll() is None:
        time.sleep(0.05)
    workers = _descendants(prep.pid)
    assert len(workers) >= 2 and prep.poll() is None, "the prep finished before it could be killed"
    prep.send_signal(signal.SIGKILL)
    prep.wait()
    assert _wait_gone(workers, 10) == [], "prep workers outlived the killed prep"
    assert not (tmp_path / "out").exists()
