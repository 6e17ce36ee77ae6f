"""Against a real SLURM (slurmctld + two emulated slurmd nodes on loopback, started here): submit, preempt with
SIGUSR2, requeue, resume, prep job arrays, multi-node rendezvous, status and cancel."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, metrics, run_pope, synthetic_documents, tiny_train_args
from launch.rendezvous import expand_nodelist, port_for_job, rendezvous_from_env, tasks_on_node
from slurm_cluster import install_reason, running_cluster


def test_rendezvous_from_slurm_environment():
    assert expand_nodelist("gpu[01-04]") == ["gpu01", "gpu02", "gpu03", "gpu04"]
    assert expand_nodelist("a1,b[2-3]") == ["a1", "b2", "b3"]
    assert expand_nodelist("n[1,3-5],x[08-10]") == ["n1", "n3", "n4", "n5", "x08", "x09", "x10"]
    assert expand_nodelist("r[1-2]n[01-02]") == ["r1n01", "r1n02", "r2n01", "r2n02"]
    assert tasks_on_node("2(x3),1", 3) == 1 and tasks_on_node("4", 0) == 4
    addresses = {"gpu01": "10.0.0.1", "gpu02": "10.0.0.2", "gpu03": "10.0.0.3", "gpu04": "10.0.0.4"}
    env = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu[01-04]", "SLURM_PROCID": "5", "SLURM_NTASKS": "8",
           "SLURM_NODEID": "2", "SLURM_LOCALID": "1", "SLURM_TASKS_PER_NODE": "2(x4)"}
    assert rendezvous_from_env(env, resolver=addresses.get) == {
        "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": str(port_for_job("4242")), "RANK": "5", "WORLD_SIZE": "8",
        "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    env.update(SLURM_JOB_NODELIST="a1,b[2-3]", SLURM_NODEID="0", SLURM_PROCID="0", SLURM_LOCALID="0",
               SLURM_TASKS_PER_NODE="3(x3)", SLURM_NTASKS="9")
    assert rendezvous_from_env(env, resolver=lambda h: f"addr-{h}")["MASTER_ADDR"] == "addr-a1"
    # emulated nodes, one machine: one node for shared memory purposes
    shared = rendezvous_from_env({**env, "SLURM_PROCID": "4", "SLURM_LOCALID": "1"}, resolver=lambda h: "127.0.0.1")
    assert shared["LOCAL_RANK"] == "4" and shared["LOCAL_WORLD_SIZE"] == "9"
    assert port_for_job("4242") != port_for_job("4243") and port_for_job("77_3") == port_for_job("77")
    with pytest.raises(ValueError, match="not inside a SLURM task"):
        rendezvous_from_env({})


def test_submit_without_slurm_says_so_and_local_executor_runs(text_dataset, tmp_path):
    env = {**os.environ, "PATH": str(Path(sys.executable).parent)}  # no sbatch on this PATH
    args = tiny_train_args(text_dataset, tmp_path, "nosched", "schedule.max_steps=2", "schedule.warmup_steps=1",
                           "eval.every=0")
    proc = subprocess.run([sys.executable, "-m", "launch.cli", "submit", *args[1:]], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0
    assert "no SLURM on this machine" in proc.stderr and "pope train" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "launch.cli", "submit", *args[1:], "launch.executor=local",
                           "--wait"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "completed at step 2" in proc.stdout


# ------------------------------------------------------------------------------------------ with a real SLURM


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    reason = install_reason()
    if reason:
        pytest.skip(reason)
    with running_cluster(tmp_path_factory.mktemp("slurm")) as cluster:
        yield cluster


SLURM_ARGS = ("schedule.max_steps=14", "checkpoint.every=100", "eval.every=7", "logging.log_every=1",
              "slurm.cpus_per_task=1", "slurm.time=20", "slurm.signal_minutes=1")


@pytest.fixture(scope="session")
def local_reference(text_dataset, tmp_path_factory):
    """The uninterrupted local 2-process run every SLURM run is compared with."""
    root = tmp_path_factory.mktemp("reference")
    run_pope(*tiny_train_args(text_dataset, root, "local", *SLURM_ARGS))
    return losses(root / "local")


def losses(run):
    return {m["step"]: m["train/loss_hex"] for m in metrics(run) if "train/loss_hex" in m}


def state(run):
    path = run / "slurm_state.json"
    return json.loads(path.read_text()) if path.exists() else {}


def wait_for(condition, what, timeout=300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


pytestmark = pytest.mark.slow


def test_submitted_two_task_job_matches_local_run(slurm, text_dataset, tmp_path, local_reference):
    proc = run_pope("submit", *tiny_train_args(text_dataset, tmp_path, "job", *SLURM_ARGS)[1:], "--wait")
    assert "submitted job" in proc.stdout and "completed at step 14" in proc.stdout
    run = tmp_path / "job"
    assert losses(run) == local_reference
    submission = json.loads((run / "submission.json").read_text())
    assert submission["tasks_per_node"] == 2 and "#SBATCH --signal=USR2@60" in submission["sbatch_script"]
    assert submission["git_commit"] and (run / "submission.sh").exists() and (run / "config.yaml").exists()


def test_usr2_checkpoints_requeues_and_resumes_exactly(slurm, text_dataset, tmp_path, local_reference):
    proc = run_pope("submit", *tiny_train_args(text_dataset, tmp_path, "preempted", *SLURM_ARGS)[1:])
    job_id = proc.stdout.split("submitted job ")[1].split()[0]
    run = tmp_path / "preempted"
    wait_for(lambda: any(m.get("step", 0) >= 4 for m in metrics(run)), "step 4")
    subprocess.run(["scancel", "--signal=USR2", "--full", job_id], check=True)
    wait_for(lambda: state(run).get("state") == "requeued", "the checkpoint and the requeue")
    # SLURM holds a requeued job back for two minutes (BeginTime); once it is pending again, let it start now
    # rather than make the test wait.
    wait_for(lambda: subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True,
                                    text=True).stdout.strip() == "PENDING", "the requeued job to be pending", 60)
    subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=True)
    wait_for(lambda: state(run).get("state") == "completed", "the requeued job to finish")
    assert state(run)["restarts"] == 1
    stopped_at = [int(p.name[4:]) for p in (run / "checkpoints").glob("step*")]
    assert 4 <= min(stopped_at) < 14 and max(stopped_at) == 14  # the preemption checkpoint, then the last
    assert losses(run) == local_reference  # every step, bit for bit, through the requeue
    log = "".join(p.read_text() for p in (run / "slurm").glob("*_log.*"))
    assert "resumed from step" in (run / "train.log").read_text() and "stopped on request" in log
    status = run_pope("status", str(run)).stdout
    assert "requeues   1" in status and "step00000014" in status and "completed" in status


def test_two_emulated_nodes_one_task_each_match_local_run(slurm, text_dataset, tmp_path, local_reference):
    proc = run_pope("submit", *tiny_train_args(text_dataset, tmp_path, "twonodes", *SLURM_ARGS)[1:],
                    "slurm.nodes=2", "launch.nproc=1", "--wait")
    assert losses(tmp_path / "twonodes") == local_reference
    job_id = proc.stdout.split("submitted job ")[1].split()[0]
    job = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True).stdout
    assert " NodeList=n[1-2]" in job and "NumNodes=2" in job and "NumTasks=2" in job


def test_status_and_cancel(slurm, text_dataset, tmp_path):
    proc = run_pope("submit", *tiny_train_args(text_dataset, tmp_path, "long", *SLURM_ARGS)[1:],
                    "schedule.max_steps=100000")
    run = tmp_path / "long"
    wait_for(lambda: metrics(run), "the first step")
    assert "RUNNING" in run_pope("status", str(run)).stdout
    assert "cancelled job" in run_pope("cancel", str(run)).stdout
    job_id = proc.stdout.split("submitted job ")[1].split()[0]
    wait_for(lambda: not subprocess.run(["squeue", "-h", "-j", job_id], capture_output=True, text=True).stdout,
             "the job to leave the queue", 60)
    time.sleep(3)
    assert subprocess.run(["squeue", "-h", "-j", job_id], capture_output=True, text=True).stdout == ""  # stays out
    assert state(run).get("state") != "requeued" and state(run).get("restarts", 0) == 0


def test_prep_job_array_and_merge_equal_single_prep(slurm, tmp_path):
    from data_prep.mds import read_split

    source = tmp_path / "docs"
    source.mkdir()
    for k in range(5):  # five units: the two array tasks take 2 and 3 of them
        docs = synthetic_documents(80, 10 + k)
        (source / f"{k}.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs))
    out = tmp_path / "arrayed"
    proc = run_pope("prep", "text", "--input", str(source), "--out", str(out), "--vocab-size", "320",
                    "--seq-len", "32", "--val-fraction", "0.1", "--num-shards", "2", "--slurm",
                    "slurm.cpus_per_task=1", "slurm.time=10", "--wait")
    assert "tokenizer job" in proc.stdout and "merged from 2 parts" in proc.stdout
    single = tmp_path / "single"
    run_pope("prep", "text", "--input", str(source), "--out", str(single), "--seq-len", "32", "--val-fraction",
             "0.1", "--tokenizer-model", str(tmp_path / "arrayed.parts" / "spm.model"), "--no-progress")
    for split in ("train", "val"):
        a, b = list(read_split(out / split)), list(read_split(single / split))
        assert len(a) == len(b) > 0 and all(np.array_equal(x, y) for x, y in zip(a, b))
    merged, alone = (json.loads((d / "manifest.json").read_text()) for d in (out, single))
    assert merged["splits"] == alone["splits"]
