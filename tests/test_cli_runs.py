"""`pope eval val`, `pope export` and `pope tb` on real runs, as a user runs them: one tiny 2-process DeepSpeed
(gloo) run per ZeRO stage, trained once and shared, then the commands in subprocesses and their files read back.

The exported weights are checked against DeepSpeed's own fp32 master copy (zero_to_fp32 for ZeRO 1-3, the module
state for ZeRO-0, and for ZeRO 1-2 also the module state, which fp32 training keeps equal to the master copy);
the exported model's loss and accuracy over the whole val split, computed here with `load_exported` and
cross_entropy, against what `pope eval val` prints for the run.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT, metrics, run_pope, tiny_train_args
from data_prep.mds import read_split
from pipeline.export import load_exported, read_exported

pytestmark = pytest.mark.slow

STAGES = [0, 1, 2, 3]
# Micro-batches of 8 rather than the tiny config's 2: `pope eval val` then reads the val split in 43 batches, not 172.
FEWER_BATCHES = ("data.batch_size=16", "data.micro_batch_size=8")
STEPS = 2  # two updates: the exported weights are trained ones, not the initialization
# fp32 everywhere; the same weights summed in another order (2 ranks and micro-batches against one process, one
# batch) differ by a few ulps of a loss near 5.7, far below what a single changed weight would move it.
LOSS_TOL = 1e-5
NO_TARGET = -100  # cross_entropy's default ignore_index
EVAL_LINE = re.compile(r"step (\d+), val loss (\d+\.\d+), ppl (\d+\.\d+), accuracy (\d+\.\d+) over ([\d,]+) "
                       r"target tokens")


class StageRuns:
    """One tiny trained run per ZeRO stage, trained on first use and shared by every test of this module."""

    def __init__(self, dataset: Path, root: Path) -> None:
        self.dataset, self.root = dataset, root
        self.runs: dict[int, Path] = {}

    def __call__(self, stage: int) -> Path:
        if stage not in self.runs:
            name = f"zero{stage}"
            run_pope(*tiny_train_args(self.dataset, self.root, name, f"deepspeed.zero_stage={stage}",
                                      f"schedule.max_steps={STEPS}", "schedule.warmup_steps=1",
                                      f"checkpoint.every={STEPS}", "eval.every=0",
                                      # ZeRO-0's final validation reads the whole val split (see below)
                                      f"eval.max_batches={0 if stage == 0 else 1}",
                                      "logging.log_every=1", *FEWER_BATCHES))
            self.runs[stage] = self.root / name
        return self.runs[stage]


@pytest.fixture(scope="module")
def stage_runs(text_dataset, tmp_path_factory) -> StageRuns:
    return StageRuns(text_dataset, tmp_path_factory.mktemp("stage_runs"))


@pytest.fixture(scope="module")
def val_batch(text_dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) of every val sample, read straight from the MDS shards: the fixed batch. A document's
    last sample is shorter than seq_len+1 tokens; its row is padded, with no target there."""
    samples = [torch.from_numpy(np.asarray(s, dtype=np.int64)) for s in read_split(text_dataset / "val")]
    assert samples and max(len(s) for s in samples) == 33  # the fixture's seq_len 32, plus the next token
    inputs = torch.zeros((len(samples), 32), dtype=torch.long)  # token 0: any id will do under a causal mask
    targets = torch.full((len(samples), 32), NO_TARGET, dtype=torch.long)
    for row, sample in enumerate(samples):
        inputs[row, : len(sample) - 1], targets[row, : len(sample) - 1] = sample[:-1], sample[1:]
    return inputs, targets


def master_weights(run: Path, stage: int) -> list[dict[str, torch.Tensor]]:
    """DeepSpeed's own copies of the final fp32 weights: the fp32 master copy consolidated by zero_to_fp32 for
    ZeRO 1-3, and the module's state (the master copy itself with ZeRO-0, kept equal to it in fp32 with 1-2)."""
    folder = run / "checkpoints" / f"step{STEPS:08d}"
    copies = []
    if stage > 0:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        copies.append(get_fp32_state_dict_from_zero_checkpoint(str(run / "checkpoints"), tag=folder.name))
    if stage < 3:  # ZeRO-3's module state holds empty partitions
        copies.append(torch.load(folder / "mp_rank_00_model_states.pt", map_location="cpu",
                                 weights_only=False)["module"])
    return copies


def exported(stage_runs: StageRuns, stage: int) -> Path:
    """`pope export` of the stage's run, once."""
    out = stage_runs.root / f"export{stage}"
    if not out.exists():
        proc = run_pope("export", str(stage_runs(stage)), "--out", str(out))
        assert f"exported {stage_runs(stage)} to {out}" in proc.stdout
    return out


@pytest.mark.parametrize("stage", STAGES, ids=lambda s: f"zero{s}")
def test_export_is_the_master_weights(stage_runs, stage):
    run = stage_runs(stage)
    config, state, step = read_exported(exported(stage_runs, stage))
    assert step == STEPS and config.d_model == 32 and config.n_layers == 2 and config.vocab_size == 320
    assert all(t.dtype == torch.float32 for t in state.values())
    for copy in master_weights(run, stage):
        assert state.keys() == copy.keys()
        different = [k for k in state if not torch.equal(state[k], copy[k].float())]
        assert not different, f"exported weights differ from DeepSpeed's: {different}"


@pytest.mark.parametrize("stage", STAGES, ids=lambda s: f"zero{s}")
def test_eval_val_reports_the_exported_models_loss(stage_runs, val_batch, stage):
    run = stage_runs(stage)
    model = load_exported(exported(stage_runs, stage))
    inputs, targets = val_batch
    with torch.no_grad():
        logits, _ = model(inputs)
    scored = targets != NO_TARGET
    loss = float(F.cross_entropy(logits[scored].double(), targets[scored]))
    accuracy = float((logits[scored].argmax(-1) == targets[scored]).double().mean())

    proc = run_pope("eval", "val", str(run))
    match = EVAL_LINE.search(proc.stdout)
    assert match and proc.stdout.startswith(f"{run}: "), proc.stdout
    printed_step, printed_loss, ppl, printed_accuracy, tokens = match.groups()
    assert int(printed_step) == STEPS and int(tokens.replace(",", "")) == int(scored.sum())
    # Printed to 4 and 2 decimals: within half a unit of the last digit (plus fp32).
    assert abs(float(printed_loss) - loss) <= 5e-5 + LOSS_TOL
    assert abs(float(ppl) - math.exp(loss)) <= 5e-3 + math.exp(loss) * LOSS_TOL
    assert abs(float(printed_accuracy) - accuracy) <= 5e-5 + 1e-12


def listeners(port: int) -> list[str]:
    """The local addresses of the TCP sockets listening on `port` (IPv4 and IPv6), from /proc/net."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A: TCP_LISTEN
                found.append(socket.inet_ntop(socket.AF_INET, bytes.fromhex(address)[::-1]) if len(address) == 8
                             else address)
    return found


def get_json(url: str) -> object:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


@pytest.mark.skipif(not os.path.exists("/proc/net/tcp"), reason="reads listening sockets from Linux's /proc/net")
def test_tb_serves_the_runs_scalars_on_localhost_only(stage_runs, tmp_path):
    run = stage_runs(2)
    log = tmp_path / "tb.out"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "launch.cli", "tb", str(run)], cwd=ROOT, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    written = {m["step"]: m["train/loss"] for m in metrics(run) if "train/loss" in m}
    assert sorted(written) == list(range(1, STEPS + 1))
    try:
        # Until TensorBoard has read the events: it serves before its first reload has finished.
        deadline, port, served = time.monotonic() + 120, None, {}
        while time.monotonic() < deadline and proc.poll() is None and sorted(served) != sorted(written):
            found = re.search(r"http://127\.0\.0\.1:(\d+)/", log.read_text())
            port = int(found.group(1)) if found else None
            if port is not None:
                query = urllib.parse.urlencode({"run": ".", "tag": "train/loss"})
                with contextlib.suppress(urllib.error.URLError, ConnectionError):  # not serving yet
                    rows = get_json(f"http://127.0.0.1:{port}/data/plugin/scalars/scalars?{query}")
                    served = {step: value for _, step, value in rows}  # rows: [wall time, step, value]
            time.sleep(0.5)
        assert sorted(served) == sorted(written), f"pope tb served {served} in 120 s:\n{log.read_text()}"
        # The values are metrics.jsonl's train/loss, stored as float32 in the events.
        assert all(served[s] == pytest.approx(written[s], rel=1e-6) for s in written)
        assert f"TensorBoard for {run / 'tb'}" in log.read_text()
        assert listeners(port) == ["127.0.0.1"]  # not 0.0.0.0, not ::
        assert get_json(f"http://127.0.0.1:{port}/data/runs") == ["."]
        # Ctrl-C: `pope tb` and its TensorBoard stop, exit 0, and the port is free again.
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=30) == 0, log.read_text()
        deadline = time.monotonic() + 10
        while listeners(port) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not listeners(port)
    finally:
        with contextlib.suppress(ProcessLookupError):  # whatever of its process group is left
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_validation_during_training_counts_every_window_once(stage_runs, val_batch):
    """The training run's own validation (2 processes) of the whole val split: streaming gives both processes the
    same number of windows, repeating one of the 343; the logged loss must still be the mean over each window once.
    """
    run = stage_runs(0)
    logged = [m for m in metrics(run) if "val/loss" in m]
    assert logged and logged[-1]["step"] == STEPS
    inputs, targets = val_batch
    assert len(inputs) % 2 == 1  # an odd split: the case that repeats a window
    model = load_exported(exported(stage_runs, 0))
    with torch.no_grad():
        logits, _ = model(inputs)
    scored = targets != NO_TARGET
    loss = float(F.cross_entropy(logits[scored].double(), targets[scored]))
    assert abs(logged[-1]["val/loss"] - loss) <= LOSS_TOL
