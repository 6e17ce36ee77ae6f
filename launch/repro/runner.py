"""Run a suite's grid (settings × seeds) through `pope train` and `pope eval`, here or as a SLURM job array.

A run is RUNS/SUITE/<setting>_s<seed>/ (an ordinary run folder). It is **finished** when its checkpoint at
`schedule.max_steps` is complete and intact and its evaluation is recorded in `repro_result.json` (written last,
atomically). A rerun skips finished runs without starting any process, evaluates runs whose training finished but
whose evaluation did not, and resumes the others from their newest checkpoint (the ordinary resume of
`launch_local`). Wall time spent on a run is summed over invocations in `repro_wall.json`.

With `--slurm`: the data is prepared here first (seconds to minutes), then one job array of the training settings
(one task per run, each running the same `execute` as the local path: `launch_local` with `launch.nproc`
processes inside the task), a second array for fine-tunes that start from those runs (the YaRN setting;
afterok), and a collect job (afterany) that writes the summaries. A task stopped by SIGTERM or SIGUSR2 saves a
checkpoint (launch_local forwards the signal); running the command again resumes what is unfinished.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from launch.repro.suites import Profile, Setting, Suite, eval_lengths
from pipeline.config import Config, load_config

RESULT = "repro_result.json"
WALL = "repro_wall.json"


class RunFailed(RuntimeError):
    """A run's training or evaluation failed; the others go on."""


@dataclasses.dataclass
class Plan:
    """Everything a suite's runs need; picklable, so SLURM tasks get it whole."""

    suite: Suite
    profile_name: str
    profile: Profile
    seeds: int
    out: Path  # summaries: OUT/SUITE/summary.csv, table.md, plots, meta.json
    runs: Path  # run folders: RUNS/SUITE/<setting>_s<seed>
    data: Path  # prepared corpora: DATA/<folder>
    overrides: tuple[str, ...] = ()  # the user's --set, on every run
    text: tuple[Path, ...] | None = None
    eval_text: tuple[Path, ...] | None = None
    only: tuple[str, ...] = ()  # --settings: a subset of the suite's settings (empty: all)
    command: str = ""  # as typed, for meta.json and RESULTS.md
    git_commit: str = ""  # the code the suite started with (the checkout may move while it runs), for meta.json
    folders: dict = dataclasses.field(default_factory=dict)  # filled by prepare(): role -> prep folder

    @property
    def suite_runs(self) -> Path:
        return self.runs / self.suite.name

    @property
    def suite_out(self) -> Path:
        return self.out / self.suite.name

    def grid(self) -> list[tuple[Setting, int]]:
        """Every (setting, seed), trained settings first: fine-tunes and evaluations need their base run."""
        chosen = [self.suite.setting(name) for name in self.only] if self.only else list(self.suite.settings)
        order = sorted(chosen, key=lambda s: (s.init_from is not None or not s.trains))
        return [(setting, seed) for setting in order for seed in range(self.seeds)]


def run_name(setting: Setting | str, seed: int) -> str:
    return f"{setting if isinstance(setting, str) else setting.name}_s{seed}"


# ------------------------------------------------------------------------------------------------ data


def prepare(plan: Plan) -> dict[str, Path]:
    """Prepare (or reuse) the suite's data; returns and records the folders by role."""
    from launch.repro import data

    p, name = plan.profile, plan.suite.name
    plan.data.mkdir(parents=True, exist_ok=True)
    if name in ("extrapolation", "ablations"):
        train, held = data.prep_text_pair(plan.data, p.seq_len, p.prep.get("vocab_size", 2000), plan.text,
                                          plan.eval_text)
        folders = {"train": train, "eval": held}
    elif name == "jsb":
        seq_len = load_config(p.config, p.overrides).data.seq_len
        folders = {"train": data.prep_jsb_data(plan.data, seq_len, p.prep.get("music21_limit"))}
    else:
        folders = {"train": data.prep_indirect_data(plan.data, p.prep["train"], p.prep["val"], p.prep["test"])}
    plan.folders = {k: Path(v) for k, v in folders.items()}
    return plan.folders


# ------------------------------------------------------------------------------------------------ configs


def _format(items: tuple[str, ...], profile: Profile) -> list[str]:
    return [item.format(L=profile.seq_len) for item in items]


def config_for(plan: Plan, setting: Setting, seed: int) -> Config:
    """The resolved config of one training run (see the module docstring of suites.py for the layering)."""
    p = plan.profile
    common = [*p.overrides, f"data.path={plan.folders['train']}", f"run_dir={plan.suite_runs}",
              f"name={run_name(setting, seed)}", f"seed={seed}", f"data.shuffle_seed={1234 + seed}"]
    if plan.suite.name in ("extrapolation", "ablations"):
        common += [f"data.seq_len={p.seq_len}", f"model.max_seq_len={4 * p.seq_len}"]
    overrides = common + _format(setting.overrides, p)
    if setting.init_from is not None:  # the fine-tune: 4 L, a short constant schedule at a tenth of the LR
        base = load_config(p.config, overrides + list(plan.overrides))
        steps = p.finetune_steps
        overrides += [f"init.from={plan.suite_runs / run_name(setting.init_from, seed)}",
                      f"data.seq_len={4 * p.seq_len}", f"schedule.max_steps={steps}",
                      f"schedule.warmup_steps={min(20, steps)}", "schedule.decay=constant",
                      f"optim.lr={base.optim.lr / 10}", f"checkpoint.every={steps}", "eval.every=0",
                      *_format(p.finetune_overrides, p)]
    return load_config(p.config, overrides + list(plan.overrides))


# ------------------------------------------------------------------------------------------------ state


def training_done(folder: Path, max_steps: int) -> bool:
    """The checkpoint at max_steps is complete and its files intact (sizes and checksums)."""
    from pipeline.run import RunFolder

    checkpoints = RunFolder(folder).checkpointer()
    return max_steps in checkpoints.complete_steps() and checkpoints.damage(max_steps) is None


def read_result(folder: Path) -> dict[str, Any] | None:
    path = folder / RESULT
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError):
        return None  # a torn file (impossible with the atomic write, but harmless): evaluate again


def _write_json(path: Path, record: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(tmp, path)


def _add_wall(folder: Path, seconds: float) -> float:
    path = folder / WALL
    total = (json.loads(path.read_text())["seconds"] if path.is_file() else 0.0) + seconds
    folder.mkdir(parents=True, exist_ok=True)
    _write_json(path, {"seconds": round(total, 1)})
    return total


def is_finished(plan: Plan, setting: Setting, seed: int) -> bool:
    folder = plan.suite_runs / run_name(setting, seed)
    result = read_result(folder)
    if result is None:
        return False
    if not setting.trains:
        return True
    config = config_for(plan, setting, seed)
    return result.get("steps") == config.schedule.max_steps and training_done(folder, config.schedule.max_steps)


# ------------------------------------------------------------------------------------------------ one run


def execute(plan: Plan, setting: Setting, seed: int, say=print) -> tuple[dict[str, Any], str]:
    """Train (or resume) and evaluate one run; returns (its result, what happened: skipped/evaluated/trained)."""
    from launch.local import launch_local

    name = run_name(setting, seed)
    folder = plan.suite_runs / name
    if is_finished(plan, setting, seed):
        return read_result(folder), "skipped"
    started, what = time.monotonic(), "evaluated"
    try:
        if setting.trains:
            config = config_for(plan, setting, seed)
            steps = config.schedule.max_steps
            if not training_done(folder, steps):
                if setting.init_from and not training_done(plan.suite_runs / run_name(setting.init_from, seed),
                                                           config_for(plan, plan.suite.setting(setting.init_from),
                                                                      seed).schedule.max_steps):
                    raise RunFailed(f"{name} fine-tunes {run_name(setting.init_from, seed)}, which has not finished")
                say(f"[{plan.suite.name}] training {name} ({steps} steps)")
                code = launch_local(config)
                if code != 0:
                    raise RunFailed(f"training {name} failed (exit {code}); see {folder / 'train.log'}")
                what = "trained"
            metrics = evaluate(plan, setting, folder, folder)
        else:
            base = plan.suite_runs / run_name(setting.eval_of, seed)
            config = config_for(plan, plan.suite.setting(setting.eval_of), seed)
            steps = config.schedule.max_steps
            if not training_done(base, steps):
                raise RunFailed(f"{name} evaluates {base.name}, which has not finished")
            folder.mkdir(parents=True, exist_ok=True)
            metrics = evaluate(plan, setting, base, folder)
    finally:
        wall = _add_wall(folder, time.monotonic() - started)
    result = {"suite": plan.suite.name, "setting": setting.name, "seed": seed, "steps": steps,
              "profile": plan.profile_name, **metrics, "wall_s": round(wall, 1), "run": str(folder),
              "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    _write_json(folder / RESULT, result)
    return result, what


def evaluate(plan: Plan, setting: Setting, run: Path, folder: Path) -> dict[str, float]:
    """The suite's measurement of `run` (a finished run folder); files go to `folder`."""
    p, suite = plan.profile, plan.suite.name
    if suite == "extrapolation":
        return _length_metrics(plan, setting, run, folder)
    from pipeline.evaluate import evaluate_run

    if suite == "ablations":  # perplexity on the held-out works, windows of L
        r = evaluate_run(str(run), split="train", data=str(plan.folders["eval"]), max_batches=p.eval_batches)
        return {"ppl": r["val/ppl"], "nll": r["val/loss"]}
    r = evaluate_run(str(run), split="test", max_batches=p.eval_batches)
    if suite == "indirect":  # data.loss_on=last: accuracy at the final token
        return {"accuracy": 100.0 * r["val/accuracy"], "test_nll": r["val/loss"]}
    return {"test_nll": r["val/loss"], "test_accuracy": r["val/accuracy"]}


def _length_metrics(plan: Plan, setting: Setting, run: Path, folder: Path) -> dict[str, float]:
    """`pope eval length` on the held-out works (their train split: no run saw them), as the user would type it."""
    from pipeline.length_eval import read_csv

    p = plan.profile
    lengths = eval_lengths(p)
    out = folder / "length_eval"
    # The overrides follow the RUN (argparse reads them with it), before the options.
    command = [sys.executable, "-m", "launch.cli", "eval", "length", str(run), *_format(setting.eval_overrides, p),
               "--data", str(plan.folders["eval"]), "--split", "train", "--lengths", ",".join(map(str, lengths)),
               "--max-samples", str(p.eval_samples), "--out", str(out)]
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RunFailed(f"pope eval length {run.name} failed (exit {proc.returncode}): "
                        f"{(proc.stderr.strip().splitlines() or ['no output'])[-1]}")
    nll = {int(row["L"]): float(row["nll"]) for row in read_csv(out / "length.csv")}
    L = p.seq_len
    metrics = {f"nll_L{length}": value for length, value in sorted(nll.items())}
    for key, (a, b) in {"nll_rise_10x": (L, 10 * L), "nll_rise_20x": (L, 20 * L),
                        "nll_rise_4x_10x": (4 * L, 10 * L)}.items():
        metrics[key] = nll[b] - nll[a] if a in nll and b in nll else float("nan")
    return metrics


# ------------------------------------------------------------------------------------------------ the grid


def run_local(plan: Plan) -> int:
    """Every run of the grid one after another here, then the summaries; 1 when a run failed (others go on)."""
    from launch.repro.summary import write_summary

    prepare(plan)
    started, failed, counts = time.monotonic(), [], {"skipped": 0, "evaluated": 0, "trained": 0}
    for setting, seed in plan.grid():
        name = run_name(setting, seed)
        try:
            result, what = execute(plan, setting, seed)
        except (RunFailed, ValueError) as err:  # ValueError: a config the code does not know (ConfigError), ...
            print(f"[{plan.suite.name}] {err}", flush=True)
            failed.append(name)
            continue
        counts[what] += 1
        shown = {k: result[k] for k in plan.suite.metrics if k in result}
        print(f"[{plan.suite.name}] {name}: {what}; " + ", ".join(f"{k} {v:.4f}" for k, v in shown.items()),
              flush=True)
    files = write_summary(plan, elapsed=time.monotonic() - started)
    print(f"[{plan.suite.name}] {counts['trained']} trained, {counts['evaluated']} evaluated only, "
          f"{counts['skipped']} skipped (finished before)" + (f", {len(failed)} failed: {', '.join(failed)}"
                                                              if failed else ""))
    print("wrote " + ", ".join(str(f) for f in files))
    return 1 if failed else 0


@dataclasses.dataclass
class RunTask:
    """One array task: `execute` the run named by the task's item."""

    plan: Plan

    def __call__(self, key: str) -> dict[str, Any]:
        setting, seed = key.rsplit("_s", 1)
        result, what = execute(self.plan, self.plan.suite.setting(setting), int(seed))
        return {**result, "what": what}


@dataclasses.dataclass
class CollectTask:
    plan: Plan

    def __call__(self) -> list[str]:
        from launch.repro.summary import write_summary

        return [str(f) for f in write_summary(self.plan, elapsed=None)]


def submit_slurm(plan: Plan, slurm: Any) -> int:
    """Prepare here, then submit the unfinished runs as job arrays and a collect job (see the module docstring)."""
    from launch.slurm import make_executor, require_slurm

    require_slurm()
    prepare(plan)
    folder = plan.suite_runs / "slurm"
    pending = [(s, seed) for s, seed in plan.grid() if not is_finished(plan, s, seed)]
    first = [run_name(s, seed) for s, seed in pending if s.trains and s.init_from is None]
    later = [run_name(s, seed) for s, seed in pending if not (s.trains and s.init_from is None)]
    job_ids: list[str] = []

    def array(keys: list[str], label: str, after: str | None) -> str:
        executor = make_executor(folder, slurm, tasks_per_node=1, local=False, name=f"repro-{plan.suite.name}")
        extra = dict(slurm.extra)
        if after:
            extra.update({"dependency": f"afterok:{after}", "kill-on-invalid-dep": "yes"})
        executor.update_parameters(nodes=1, slurm_array_parallelism=slurm.array_parallelism,
                                   slurm_additional_parameters=extra)
        jobs = executor.map_array(RunTask(plan), keys)
        array_id = str(jobs[0].job_id).split("_")[0]
        print(f"[{plan.suite.name}] {label}: array job {array_id} ({len(keys)} runs: {', '.join(keys)})")
        return array_id

    if first:
        job_ids.append(array(first, "training", None))
    if later:
        job_ids.append(array(later, "fine-tunes and evaluations", job_ids[0] if job_ids else None))
    collect = make_executor(folder, slurm, tasks_per_node=1, local=False, name=f"repro-{plan.suite.name}-collect")
    extra = dict(slurm.extra)
    if job_ids:
        extra["dependency"] = "afterany:" + ":".join(job_ids)
    collect.update_parameters(nodes=1, slurm_additional_parameters=extra)
    job = collect.submit(CollectTask(plan))
    print(f"[{plan.suite.name}] {len(pending)} unfinished of {len(plan.grid())} runs submitted; collect job "
          f"{job.job_id} writes {plan.suite_out}/summary.csv when they end; logs in {folder}/")
    return 0
