"""Shared fixtures: a tiny real dataset made by data_prep, and running `pope` as a user would (subprocesses)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
WORDS = ("the a of music genome position phase rotates polar magnitude query key value attention layer head "
         "frequency train loss token sequence sample shard checkpoint resume preempt cluster node rank").split()


def pytest_configure(config):
    # Keep DeepSpeed and streaming quiet and CPU-only in every process the tests start.
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def synthetic_documents(count: int, seed: int) -> list[str]:
    """Documents with some structure (repeated phrases) so a tiny model's loss can fall."""
    rng = np.random.default_rng(seed)
    phrases = [" ".join(rng.choice(WORDS, size=rng.integers(3, 7))) for _ in range(40)]
    return [". ".join(rng.choice(phrases, size=rng.integers(5, 40))) + "." for _ in range(count)]


@pytest.fixture(scope="session")
def text_dataset(tmp_path_factory) -> Path:
    """A SentencePiece text dataset (vocab 320, samples of 33 tokens) made by `prep_text` from jsonl."""
    from data_prep.parallel import PrepOptions
    from data_prep.text import prep_text

    root = tmp_path_factory.mktemp("text_dataset")
    (root / "docs.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in synthetic_documents(300, 0)))
    out = root / "data"
    prep_text([root / "docs.jsonl"], out, vocab_size=320, val_fraction=0.1, seq_len=32,
              options=PrepOptions(workers=1, progress=False))
    return out


def run_pope(*args: str, check: bool = True, timeout: float = 600, **kwargs) -> subprocess.CompletedProcess:
    """`pope ARGS...` in a subprocess from the repository root, output captured."""
    proc = subprocess.run([sys.executable, "-m", "launch.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, **kwargs)
    if check and proc.returncode != 0:
        raise AssertionError(f"pope {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def tiny_train_args(dataset: Path, run_dir: Path, name: str, *extra: str) -> list[str]:
    """`pope train` arguments for a 2-process CPU run on the tiny text dataset."""
    return ["train", "tiny/owt_124m_pope", f"data.path={dataset}", "data.seq_len=32", f"run_dir={run_dir}",
            f"name={name}", "model.d_model=32", "model.n_heads=2", "model.n_layers=2", "model.max_seq_len=32",
            *extra]


@contextlib.contextmanager
def small_tmpfs(mount: Path, size: str):
    """A real file system of `size` (tmpfs) at `mount`, to fill up; the test is skipped where mounting is refused."""
    mount.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill (needs root): {proc.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def metrics(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def kill_after_step(args: list[str], run: Path, step: int) -> None:
    """Start `pope ARGS...`, SIGKILL its whole process group once `step` is in RUN/metrics.jsonl (or after 300 s)."""
    proc = subprocess.Popen([sys.executable, "-m", "launch.cli", *args], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if any(m.get("step", 0) >= step for m in metrics(run)):
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
