"""A suite's summaries: OUT/SUITE/summary.csv (one row per run), table.md (mean ± sd per setting), plots, meta.json.

summary.csv columns: suite, setting, seed, steps, the suite's metrics (extrapolation: also nll_L<L> for every
evaluated length), wall_s (seconds spent on the run, summed over invocations), run (its folder). The standard
deviation is the sample one (n − 1); with one seed it is left empty. Plots: extrapolation, NLL against evaluation
length per setting, the mean over seeds as a line and ± one sd as a band (log-x); the other suites, a bar per
setting with ± one sd.
"""

from __future__ import annotations

import csv
import json
import math
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Sequence

FIXED = ("suite", "setting", "seed", "steps")
TAIL = ("wall_s", "run")


def columns(suite_metrics: Sequence[str], rows: Sequence[dict[str, Any]]) -> list[str]:
    lengths = sorted({int(k[5:]) for r in rows for k in r if k.startswith("nll_L")})
    return [*FIXED, *suite_metrics, *(f"nll_L{L}" for L in lengths), *TAIL]


def write_csv(path: Path, rows: Sequence[dict[str, Any]], suite_metrics: Sequence[str]) -> Path:
    names = columns(suite_metrics, rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=names, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    os.replace(tmp, path)
    return path


def read_summary(path: Path) -> list[dict[str, Any]]:
    """summary.csv's rows with numbers as numbers (seed and steps int, metrics float; empty cells dropped)."""
    rows = []
    with open(path, newline="") as handle:
        for raw in csv.DictReader(handle):
            row: dict[str, Any] = {}
            for key, value in raw.items():
                if value in ("", None):
                    continue
                if key in ("seed", "steps"):
                    row[key] = int(value)
                elif key in ("suite", "setting", "run"):
                    row[key] = value
                else:
                    row[key] = float(value)
            rows.append(row)
    return rows


def aggregate(rows: Sequence[dict[str, Any]], metric: str) -> dict[str, tuple[float, float | None, int]]:
    """setting -> (mean, sample sd or None with one seed, n) of `metric` over the rows that have it."""
    values: dict[str, list[float]] = {}
    for row in rows:
        value = row.get(metric)
        if value is not None and not (isinstance(value, float) and math.isnan(value)):
            values.setdefault(row["setting"], []).append(float(value))
    return {s: (statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else None, len(v)) for s, v in values.items()}


def mean_sd(stat: tuple[float, float | None, int] | None, digits: int = 4) -> str:
    if stat is None:
        return "—"
    mean, sd, n = stat
    return f"{mean:.{digits}f} ± {sd:.{digits}f} (n={n})" if sd is not None else f"{mean:.{digits}f} (n={n})"


def table_markdown(suite: Any, rows: Sequence[dict[str, Any]]) -> str:
    """Mean ± sd per setting (rows) and metric (columns), n seeds, the settings' labels."""
    metrics = [m for m in columns(suite.metrics, rows) if m not in FIXED + TAIL]
    stats = {m: aggregate(rows, m) for m in metrics}
    lines = [f"| setting | n | {' | '.join(metrics)} |", "|---|---|" + "---|" * len(metrics)]
    for setting in suite.settings:
        counts = [stats[m][setting.name][2] for m in metrics if setting.name in stats[m]]
        if not counts:
            continue
        cells = [mean_sd(stats[m].get(setting.name), 4).rsplit(" (n=", 1)[0] for m in metrics]
        lines.append(f"| {setting.label or setting.name} (`{setting.name}`) | {max(counts)} | {' | '.join(cells)} |")
    return "\n".join(lines) + "\n"


def machine() -> str:
    """This machine in words: CPU model and cores (or the GPU), OS, Python, torch."""
    import torch

    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpu = f", {torch.cuda.device_count()} × {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (f"{cores} cores of {cpu}{gpu}; {platform.system()} {platform.release()}; Python "
            f"{platform.python_version()}; torch {torch.__version__}")


def plot(suite: Any, rows: Sequence[dict[str, Any]], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    labels = {s.name: s.label or s.name for s in suite.settings}
    if suite.name == "extrapolation":
        lengths = sorted({int(k[5:]) for r in rows for k in r if k.startswith("nll_L")})
        for setting in suite.settings:
            points = [(L, aggregate(rows, f"nll_L{L}").get(setting.name)) for L in lengths]
            points = [(L, s) for L, s in points if s is not None]
            if not points:
                continue
            xs, means = [L for L, _ in points], [s[0] for _, s in points]
            sds = [s[1] or 0.0 for _, s in points]
            line, = ax.plot(xs, means, marker="o", label=f"{labels[setting.name]} (n={points[0][1][2]})")
            ax.fill_between(xs, [m - d for m, d in zip(means, sds)], [m + d for m, d in zip(means, sds)],
                            color=line.get_color(), alpha=0.2)
        if lengths:
            ax.axvline(lengths[0], color="gray", linestyle="--", linewidth=1)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("evaluation length (tokens); dashed: the training length")
        ax.set_ylabel("mean NLL per token on held-out text (nats)")
        ax.set_title("extrapolation: mean over seeds, band ± 1 sd")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        name = "nll_vs_length.png"
    else:
        metric = suite.metrics[0]
        stats = aggregate(rows, metric)
        shown = [s for s in suite.settings if s.name in stats]
        ax.bar(range(len(shown)), [stats[s.name][0] for s in shown],
               yerr=[stats[s.name][1] or 0.0 for s in shown], capsize=4, color="tab:blue", alpha=0.8)
        ax.set_xticks(range(len(shown)), [labels[s.name] for s in shown], rotation=30, ha="right", fontsize=8)
        ax.set_ylabel(metric)
        ax.set_title(f"{suite.name}: {metric}, mean over seeds ± 1 sd")
        ax.grid(True, axis="y", alpha=0.3)
        name = f"{metric}.png"
    fig.tight_layout()
    fig.savefig(out / name, dpi=120)
    plt.close(fig)
    return out / name


def write_summary(plan: Any, elapsed: float | None) -> list[Path]:
    """summary.csv, table.md, the plot and meta.json for the grid's runs that have a result."""
    from launch.repro.runner import read_result, run_name
    from launch.slurm import git_commit

    out = plan.suite_out
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for setting, seed in plan.grid():
        result = read_result(plan.suite_runs / run_name(setting, seed))
        if result is not None:
            rows.append(result)
    files = [write_csv(out / "summary.csv", rows, plan.suite.metrics)]
    (out / "table.md").write_text(f"# {plan.suite.name}\n\n{plan.suite.description}\n\n"
                                  f"{table_markdown(plan.suite, rows)}")
    files.append(out / "table.md")
    if rows:
        files.append(plot(plan.suite, rows, out))
    meta = {"suite": plan.suite.name, "profile": plan.profile_name, "profile_note": plan.profile.note,
            "seeds": plan.seeds, "command": plan.command, "machine": machine(),
            "git_commit": plan.git_commit or git_commit(),
            "date": time.strftime("%Y-%m-%d"), "runs_with_results": len(rows), "runs_in_grid": len(plan.grid()),
            "run_wall_s": round(sum(r.get("wall_s", 0.0) for r in rows), 1),
            "elapsed_s": round(elapsed, 1) if elapsed is not None else None,
            "data": {k: str(v) for k, v in plan.folders.items()}}
    (out / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    files.append(out / "meta.json")
    return files
