"""SLURM through submitit: training that survives preemption and time limits, prep as job arrays, status, cancel.

Training (`pope submit`): one submitit job of `slurm.nodes` nodes with one task per GPU (or `launch.nproc` tasks per
CPU node). Each task computes its rendezvous from the SLURM environment (launch/rendezvous.py) and runs the same
`pipeline.train.main` as the local launcher. SLURM sends SIGUSR2 `slurm.signal_minutes` before the time limit (and
`scancel --signal=USR2` does the same by hand); the training loop then has every rank save one checkpoint
together, rank 0 requeues the job (`scontrol requeue`) while fewer than `slurm.max_requeues` restarts happened,
and the requeued job resumes from that checkpoint. (submitit's own hook checkpoints on global rank 0 only, which a
ZeRO save cannot use; USR1 is NCCL's.)

Prep (`pope prep <corpus> ... --slurm`): an array job of `--num-shards` tasks, each preparing its part with
`--shard-index i`, then a merge job that starts only when every array task succeeded (afterok). A SentencePiece
text prep first trains its tokenizer in a job of its own, which the array waits for.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from data_prep.shm import SHM_NAMESPACE_ENV
from pipeline.config import Config, SlurmConfig, load_config, to_dict

if TYPE_CHECKING:  # imported where used: pipeline.run brings torch, which prep job arrays do not need
    from pipeline.run import RunFolder

REPO = Path(__file__).resolve().parent.parent


def require_slurm() -> None:
    if shutil.which("sbatch") is None:
        raise ValueError("no SLURM on this machine (sbatch not found): train here with `pope train`, or set "
                         "launch.executor=local to run the job through submitit's local executor")


# ------------------------------------------------------------------------------------------------ executors


def make_executor(folder: Path, slurm: SlurmConfig, *, tasks_per_node: int, local: bool, name: str,
                  cpus_per_task: int | None = None) -> Any:
    """A submitit executor for this config (SLURM, or submitit's local executor)."""
    import submitit

    folder.mkdir(parents=True, exist_ok=True)
    executor = submitit.AutoExecutor(folder=str(folder), cluster="local" if local else "slurm")
    params: dict[str, Any] = {"name": name, "nodes": slurm.nodes, "tasks_per_node": tasks_per_node,
                              "cpus_per_task": cpus_per_task or slurm.cpus_per_task, "timeout_min": slurm.time}
    if slurm.gpus_per_node:
        params["gpus_per_node"] = slurm.gpus_per_node
    if not local:
        params.update(slurm_signal_delay_s=int(slurm.signal_minutes * 60),
                      # One task failing ends the step: its peers would otherwise wait in a collective until the
                      # process group's timeout (30 minutes), holding the GPUs.
                      slurm_srun_args=["--kill-on-bad-exit=1"],
                      # The batch shell must survive `scancel --full --signal=USR2`: only the tasks act on it.
                      slurm_setup=["trap 'true' USR2"])
        for key in ("partition", "account", "qos", "constraint", "mem"):
            if getattr(slurm, key):
                params[f"slurm_{key}"] = getattr(slurm, key)
        if slurm.exclusive:
            params["slurm_exclusive"] = True
        if slurm.extra:
            params["slurm_additional_parameters"] = dict(slurm.extra)
    executor.update_parameters(**params)
    return executor


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True,
                               timeout=10).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


# ---------------------------------------------------------------------------------------------- training jobs


def task_environment() -> dict[str, str]:
    """torch.distributed variables for this task: from SLURM, or from submitit's local executor."""
    from launch.rendezvous import port_for_job, rendezvous_from_env

    if "SLURM_JOB_ID" in os.environ and os.environ.get("SUBMITIT_EXECUTOR") == "slurm":
        return rendezvous_from_env(os.environ)
    import submitit

    job = submitit.JobEnvironment()
    return {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port_for_job(str(job.job_id))),
            "RANK": str(job.global_rank), "WORLD_SIZE": str(job.num_tasks), "LOCAL_RANK": str(job.local_rank),
            "LOCAL_WORLD_SIZE": str(job.num_tasks // max(job.num_nodes, 1))}


@dataclasses.dataclass
class TrainTask:
    """What submitit pickles and runs in every task of a training job."""

    config_path: str
    max_requeues: int

    def __call__(self) -> dict[str, Any]:
        from pipeline.stopping import StopRequested, install_stop_handlers

        install_stop_handlers()  # before anything slow: a USR2 must never reach submitit's own handler
        from pipeline import train
        from pipeline.run import RunFolder

        os.environ.update(task_environment())
        rank = int(os.environ["RANK"])
        restarts = int(os.environ.get("SLURM_RESTART_COUNT", 0))
        run = RunFolder(Path(self.config_path).parent)
        job_id = os.environ.get("SLURM_JOB_ID", "local")
        # Every task of this job (this incarnation) shares streaming's shared-memory namespace; no other job does.
        import submitit

        job_key = "".join(c if c.isalnum() else "." for c in str(submitit.JobEnvironment().job_id))
        on_slurm = os.environ.get("SUBMITIT_EXECUTOR") == "slurm"  # else submitit's local executor
        os.environ[SHM_NAMESPACE_ENV] = f"S{job_key}r{restarts}" if on_slurm else f"Q{job_key}"
        if rank == 0:
            _write_state(run, job_id=job_id, restarts=restarts, state="running")
        try:
            result = train.main(load_config(self.config_path))
        except StopRequested as stopped:
            # SIGUSR2 (time limit near, preemption notice) asks to continue; SIGTERM (scancel, or a preemption
            # that SLURM requeues by itself) only stops, with the checkpoint saved.
            requeue = stopped.requeue and os.environ.get("SUBMITIT_EXECUTOR") == "slurm" and \
                restarts < self.max_requeues
            if rank == 0:
                print(f"pope: {stopped}; " + (f"requeueing job {job_id} (restart {restarts + 1} of at most "
                                              f"{self.max_requeues})" if requeue else "not requeued"), flush=True)
            if requeue:
                if rank == 0:
                    done = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True,
                                          timeout=120)
                    if done.returncode == 0:
                        _write_state(run, job_id=job_id, restarts=restarts, state="requeued", step=stopped.step)
                    else:  # e.g. JobRequeue=0 on this cluster: stop cleanly, the checkpoint stands
                        print(f"pope: could not requeue job {job_id}: {done.stderr.strip()}; resubmit to resume",
                              flush=True)
                        requeue = False
                if requeue:
                    _wait_to_be_requeued()
            if rank == 0:
                _write_state(run, job_id=job_id, restarts=restarts, state="stopped", step=stopped.step)
            return {"stopped": stopped.step, "requeues": restarts}
        if rank == 0:
            _write_state(run, job_id=job_id, restarts=restarts, state="completed", step=result["step"])
        return result


def _wait_to_be_requeued(limit_s: float = 600) -> None:
    """Requeueing ends this job's processes; until then, return nothing (no result file that says 'done')."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        time.sleep(1)
    raise RuntimeError("the job was requeued but its processes were not stopped within 10 minutes")


def _write_state(run: RunFolder, **state: Any) -> None:
    path = run.slurm_state
    previous = json.loads(path.read_text()) if path.exists() else {}
    record = {**previous, **state, "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(tmp, path)


def submit_training(config: Config, fresh: bool = False, wait: bool = False, adopt: bool = False) -> int:
    """`pope submit`: submit the config's training; print the job id and run folder."""
    from pipeline.config import resolve
    from pipeline.data import open_dataset
    from pipeline.run import prepare_run_dir

    local = config.launch.executor == "local"
    if not local:
        require_slurm()
    resolve(config, open_dataset(config).manifest)  # fail now, not in the queue
    tasks = config.slurm.gpus_per_node or config.launch.nproc
    run = prepare_run_dir(config, fresh, adopt)
    executor = make_executor(run.slurm_logs, config.slurm, tasks_per_node=tasks, local=local, name=config.name)
    try:
        job = executor.submit(TrainTask(str(run.config), config.slurm.max_requeues))
    except Exception as err:  # noqa: BLE001 - submitit's FailedJobError carries sbatch's own message
        raise ValueError(f"submission failed: {' '.join(str(err).split())[:500]}") from None
    script = run.slurm_logs / f"{job.job_id}_submission.sh"
    record = {"job_id": str(job.job_id), "executor": "local" if local else "slurm",
              "submitted": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "git_commit": git_commit(),
              "command": sys.argv, "nodes": config.slurm.nodes, "tasks_per_node": tasks,
              "sbatch_script": script.read_text() if script.exists() else None, "config": to_dict(config)}
    run.submission.write_text(json.dumps(record, indent=1) + "\n")
    if script.exists():
        shutil.copy2(script, run.submission_script)
    print(f"submitted job {job.job_id} ({config.slurm.nodes} node(s) × {tasks} task(s)); run folder {run.path}")
    print(f"follow it with `pope status {run.path}`; logs in {run.slurm_logs}/")
    if not wait:
        return 0
    return wait_for_run(run, str(job.job_id), local_job=job if local else None)


def wait_for_run(run: RunFolder, job_id: str, local_job: Any = None, poll_s: float = 2.0) -> int:
    """Block until the job has left the queue (a requeued job stays in it, pending); 0 when it completed."""
    while True:
        if local_job is not None:
            if local_job.done():
                break
        elif job_state(job_id) is None:
            break
        time.sleep(poll_s)
    state = _read_state(run)
    print(f"job {job_id}: {state.get('state', 'unknown')} at step {state.get('step', '?')}, "
          f"{state.get('restarts', 0)} requeue(s)")
    return 0 if state.get("state") == "completed" else 1


# --------------------------------------------------------------------------------------------- status, cancel


def job_state(job_id: str, attempts: int = 5) -> str | None:
    """The job's SLURM state from squeue; None once it has left the queue. A failing squeue is retried, then
    reported, rather than mistaken for a finished job."""
    for attempt in range(attempts):
        try:
            out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True,
                                 timeout=30)
        except (OSError, subprocess.TimeoutExpired) as err:
            out, error = None, str(err)
        else:
            error = out.stderr.strip()
            if out.returncode == 0:
                states = out.stdout.split()
                return states[0] if states else None
            if "Invalid job id" in error:  # squeue's answer for a job that has left the queue
                return None
        time.sleep(min(2 ** attempt, 10))
    raise ValueError(f"squeue keeps failing for job {job_id}: {error}")


def _read_state(run: RunFolder) -> dict[str, Any]:
    path = run.slurm_state
    return json.loads(path.read_text()) if path.exists() else {}


def _submission(run: RunFolder) -> dict[str, Any]:
    path = run.submission
    if not path.exists():
        raise ValueError(f"{run.path} has no {path.name}: it was not started with `pope submit`")
    return json.loads(path.read_text())


def status(path: str | Path) -> str:
    """`pope status RUN`: job state (of a submitted run), last step, last checkpoint, requeues, and the number of
    processes the newest checkpoint was saved by, with every change of it the run went through."""
    from pipeline.run import RunFolder

    run = RunFolder(path)
    if not run.submission.exists() and not run.config.is_file():
        raise ValueError(f"{run.path} is not a run folder (no config.yaml)")
    submission = _submission(run) if run.submission.exists() else None
    state = _read_state(run)
    queue = job_state(submission["job_id"]) if submission and submission["executor"] == "slurm" else None
    steps = _logged_steps(run.metrics)
    latest = run.latest.read_text().strip() if run.latest.exists() else "none"
    lines = [f"run        {run.path}"]
    if submission is not None:
        lines += [f"job        {submission['job_id']} ({submission['executor']}), submitted "
                  f"{submission['submitted']}, commit {submission['git_commit']}",
                  f"state      {queue or state.get('state', 'not started')}" +
                  (f" (in queue; last run: {state.get('state')})" if queue and state else "")]
    else:
        lines.append("job        none (trained with `pope train`, not submitted)")
    lines += [f"last step  {max(steps) if steps else 'none'}", f"checkpoint {latest}"]
    if submission is not None:
        lines.append(f"requeues   {state.get('restarts', 0)}")
    lines += _process_lines(run.checkpoints)
    return "\n".join(lines)


def _process_lines(checkpoints: Path) -> list[str]:
    """The newest checkpoint's number of processes and ZeRO stage, and the world-size changes it went through."""
    from pipeline.checkpoint import newest_marker

    marker = newest_marker(checkpoints)
    if marker is None:
        return []
    identity = marker.get("identity", {})
    lines = [f"processes  {identity.get('world_size', '?')} (ZeRO-{identity.get('zero_stage', '?')})"]
    for change in marker.get("metadata", {}).get("resharded", []):
        how = "through a universal checkpoint" if change.get("universal") else "ZeRO-0, no conversion"
        lines.append(f"resharded  at step {change['step']}: {change['from_world_size']} → "
                     f"{change['to_world_size']} processes ({how})")
    return lines


def _logged_steps(path: Path) -> list[int]:
    """Steps in metrics.jsonl; a line torn by a killed writer is skipped."""
    steps = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            steps.append(int(json.loads(line).get("step", 0)))
        except (json.JSONDecodeError, AttributeError, ValueError):
            continue
    return steps


def cancel(run: str | Path) -> str:
    from pipeline.run import RunFolder

    submission = _submission(RunFolder(run))
    if submission["executor"] != "slurm":
        raise ValueError(f"{run} runs under submitit's local executor; stop it with Ctrl-C where it runs")
    require_slurm()
    job_id = submission["job_id"]
    if job_state(job_id) is None:
        return f"job {job_id} is no longer in the queue ({run})"
    done = subprocess.run(["scancel", job_id], capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise ValueError(f"scancel {job_id} failed: {done.stderr.strip()}")
    return f"cancelled job {job_id} ({run})"


# ------------------------------------------------------------------------------------------------ prep arrays


@dataclasses.dataclass
class PrepTask:
    """One array task of a sharded prep: calls `function(**kwargs, out=part, options=shard i of n)`."""

    function: str  # "module:function"
    kwargs: dict[str, Any]
    parts: str
    options: dict[str, Any]  # PrepOptions fields; shard_index is this task's

    def __call__(self, shard_index: int) -> str:
        from data_prep.parallel import PrepOptions

        module, name = self.function.split(":")
        function: Callable[..., Any] = getattr(__import__(module, fromlist=[name]), name)
        out = Path(self.parts) / f"part-{shard_index:05d}"
        function(out=out, options=PrepOptions(**{**self.options, "shard_index": shard_index}), **self.kwargs)
        return str(out)


@dataclasses.dataclass
class MergeTask:
    out: str
    parts: list[str]
    overwrite: bool

    def __call__(self) -> str:
        from data_prep.shards import merge_parts

        merge_parts(Path(self.out), [Path(p) for p in self.parts], overwrite=self.overwrite)
        return self.out


@dataclasses.dataclass
class TokenizerTask:
    """Trains the SentencePiece model every shard of a text prep shares."""

    kwargs: dict[str, Any]
    model_path: str
    workers: int

    def __call__(self) -> str:
        from data_prep.text import train_text_tokenizer

        train_text_tokenizer(model_path=Path(self.model_path), workers=self.workers, **self.kwargs)
        return self.model_path


def submit_prep(function: str, kwargs: dict[str, Any], out: Path, options: Any, slurm: SlurmConfig,
                tokenizer: dict[str, Any] | None = None, wait: bool = False) -> int:
    """Submit a prep as an array of `options.num_shards` tasks plus a merge job that waits for all of them.

    `options` (PrepOptions) carries what the user asked for: overwrite, compression, the skip fraction; the
    workers of each task are its `slurm.cpus_per_task`.
    """
    require_slurm()
    out = Path(out).resolve()
    num_shards = options.num_shards
    from data_prep.contract import DONE
    from data_prep.shards import check_output, is_prep_output

    check_output(out)  # at submission, not hours later in the merge job
    if out.is_dir() and any(out.iterdir()) and not is_prep_output(out):
        raise ValueError(f"{out} exists and is not a prep output; refusing to touch it, even with --overwrite: move "
                         "it away or give another --out")
    if (out / DONE).exists() and not options.overwrite:
        raise ValueError(f"{out} already holds a finished prep; a job array always rebuilds it, so pass --overwrite "
                         "to replace it (or prepare into another folder)")
    parts = out.parent / f"{out.name}.parts"
    folder = parts / "slurm"
    dependency = None
    if tokenizer is not None:  # SentencePiece: one tokenizer for every shard, trained first
        model_path = parts / "spm.model"
        executor = make_executor(folder, slurm, tasks_per_node=1, local=False, name=f"{out.name}-tokenizer")
        executor.update_parameters(nodes=1)
        job = executor.submit(TokenizerTask(tokenizer, str(model_path), slurm.cpus_per_task))
        kwargs = {**kwargs, "tokenizer_model": model_path}
        dependency = str(job.job_id)
        print(f"tokenizer job {job.job_id} → {model_path}")
    executor = make_executor(folder, slurm, tasks_per_node=1, local=False, name=f"{out.name}-prep")
    extra = dict(slurm.extra)
    if dependency:
        extra.update({"dependency": f"afterok:{dependency}", "kill-on-invalid-dep": "yes"})
    executor.update_parameters(nodes=1, slurm_array_parallelism=slurm.array_parallelism,
                               slurm_additional_parameters=extra)
    task = PrepTask(function, kwargs, str(parts), {**dataclasses.asdict(options), "workers": slurm.cpus_per_task,
                                                   "progress": False})
    jobs = executor.map_array(task, list(range(num_shards)))
    array_id = str(jobs[0].job_id).split("_")[0]
    merge = make_executor(folder, slurm, tasks_per_node=1, local=False, name=f"{out.name}-merge")
    # kill-on-invalid-dep: if an array task fails, SLURM removes the merge job instead of leaving it pending
    merge.update_parameters(nodes=1, slurm_additional_parameters={**dict(slurm.extra),
                                                                  "dependency": f"afterok:{array_id}",
                                                                  "kill-on-invalid-dep": "yes"})
    part_dirs = [str(parts / f"part-{i:05d}") for i in range(num_shards)]
    merge_job = merge.submit(MergeTask(str(out), part_dirs, options.overwrite))
    print(f"prep array job {array_id} ({num_shards} tasks) → {parts}/part-*; merge job {merge_job.job_id} → {out}")
    if not wait:
        return 0
    while job_state(str(merge_job.job_id)) is not None:
        time.sleep(2)
    if not (out / "DONE").exists():
        print(f"pope: error: the prep did not finish; see the logs in {folder}", file=sys.stderr)
        return 1
    print(f"{out}: merged from {num_shards} parts")
    return 0
