"""`pope repro report`: RESULTS.md from the suites' summaries (OUT/SUITE/summary.csv and meta.json).

Each suite gets its claims (launch/repro/suites.py) as rows: the paper's figure, ours (mean ± sd over seeds, n),
a verdict and why. Verdict rules (also printed in RESULTS.md):

- a comparison ("X lower/higher than Y") is **reproduced** when the gap has the paper's sign and exceeds twice the
  larger of the two standard deviations over seeds; a gap of either sign within that is *not reproduced (within
  noise)*, the other sign beyond it *not reproduced (opposite)*;
- an absolute figure ("matches the paper") is **reproduced** when our mean lies within 2 × max(the paper's sd,
  ours) of the paper's (with no sd on either side: within 2 % of it);
- "flat" is reproduced when |mean| is within the stated tolerance;
- **not yet run** when a setting has fewer than MIN_SEEDS seeds with results (the command to run is given).

Nothing here computes a result: every number comes from the CSVs, which the repository keeps.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from launch.repro.suites import SUITES, Claim, get_suite
from launch.repro.summary import aggregate, mean_sd, read_summary, table_markdown

MIN_SEEDS = 3

RULES = ("**Verdicts.** A comparison (X lower/higher than Y) is *reproduced* when the gap has the paper's sign and "
         "exceeds 2 × the larger of the two standard deviations over seeds; a gap of either sign inside that is *not "
         "reproduced (within noise)*, the other sign beyond it *not reproduced (opposite)*. An absolute figure is "
         "*reproduced* when our mean is within 2 × max(the paper's sd, ours) of the paper's (within 2 % when "
         f"neither has an sd). *Not yet run*: fewer than {MIN_SEEDS} seeds with results. Standard deviations are "
         "sample sds (n − 1) over seeds.")


def judge(claim: Claim, rows: list[dict[str, Any]], profile_note: str) -> tuple[str, str, str]:
    """(ours as text, verdict, why) for one claim."""
    stats = aggregate(rows, claim.metric)
    needed = [claim.setting] + ([claim.other] if claim.other else [])
    short = [s for s in needed if stats.get(s, (0, None, 0))[2] < MIN_SEEDS]
    a = stats.get(claim.setting)
    b = stats.get(claim.other) if claim.other else None
    ours = mean_sd(a) + (f" vs {mean_sd(b)}" if claim.other else "")
    if short:
        counts = ", ".join(f"{s}: {stats.get(s, (0, None, 0))[2]}" for s in short)
        return ours, "not yet run", f"needs {MIN_SEEDS} seeds with results ({counts})"
    assert a is not None
    suffix = f"; budget: {profile_note}" if profile_note else ""
    if claim.kind in ("lower", "higher"):
        assert b is not None
        gap = (b[0] - a[0]) if claim.kind == "lower" else (a[0] - b[0])
        noise = 2 * max(a[1] or 0.0, b[1] or 0.0)
        if gap > noise:
            return ours, "reproduced", f"gap {gap:.4f} > 2 sd = {noise:.4f}"
        if gap < -noise:
            return ours, "not reproduced (opposite)", f"gap {gap:.4f} has the other sign, beyond 2 sd = {noise:.4f}{suffix}"
        return ours, "not reproduced (within noise)", f"|gap {gap:.4f}| ≤ 2 sd = {noise:.4f}{suffix}"
    if claim.kind == "flat":
        if abs(a[0]) <= claim.tolerance:
            return ours, "reproduced", f"|{a[0]:.4f}| ≤ {claim.tolerance}"
        return ours, "not reproduced", f"|{a[0]:.4f}| > {claim.tolerance}{suffix}"
    sds = [s for s in (claim.paper_sd, a[1]) if s]
    tolerance = 2 * max(sds) if sds else 0.02 * abs(claim.paper_mean)
    diff = abs(a[0] - claim.paper_mean)
    if diff <= tolerance:
        return ours, "reproduced", f"{diff:.4f} from the paper ≤ {tolerance:.4f}"
    return ours, "not reproduced", f"{diff:.4f} from the paper > {tolerance:.4f}{suffix}"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def suite_section(name: str, out: Path) -> str:
    suite = get_suite(name)
    folder = out / name
    lines = [f"## {name}", "", suite.description, ""]
    summary = folder / "summary.csv"
    rows = read_summary(summary) if summary.is_file() else []
    meta = json.loads((folder / "meta.json").read_text()) if (folder / "meta.json").is_file() else {}
    command = meta.get("command") or f"pope repro {name} --seeds {MIN_SEEDS}"
    gpu = suite.profiles["gpu"]
    gpu_line = f"on a GPU: `pope repro {name} --seeds {MIN_SEEDS} --profile gpu` ({gpu.note})"
    if not rows:
        lines += [f"**Not yet run.** Command: `pope repro {name} --seeds {MIN_SEEDS}` ({suite.profiles['cpu'].note}); "
                  f"{gpu_line}", ""]
    else:
        wall = meta.get("run_wall_s")
        lines += [f"- command: `{command}`",
                  f"- profile: {meta.get('profile', '?')} ({meta.get('profile_note', '')})",
                  f"- machine: {meta.get('machine', 'unknown')}",
                  f"- wall time: {wall / 3600:.2f} h over {meta.get('runs_with_results')} of "
                  f"{meta.get('runs_in_grid')} runs" + (f" ({wall / max(1, len(rows)) / 60:.1f} min a run)" if wall
                                                         else "") if wall is not None else "- wall time: unknown",
                  f"- date {meta.get('date', '?')}, commit {meta.get('git_commit', '?')}; data: "
                  f"`{name}/summary.csv` (one row per run)",
                  f"- {gpu_line}" if meta.get("profile") != "gpu" else "", ""]
    note = meta.get("profile_note", "")
    lines += ["| claim | paper | ours (mean ± sd, n seeds) | verdict | why |", "|---|---|---|---|---|"]
    for claim in suite.claims:
        if rows and meta.get("profile") == "smoke":
            ours, verdict, why = "—", "not yet run", f"only a smoke run (2 steps, plumbing): run `pope repro {name} " \
                f"--seeds {MIN_SEEDS}`"
        elif rows:
            ours, verdict, why = judge(claim, rows, note)
        else:
            ours, verdict, why = "—", "not yet run", f"no summary yet: run `{command}`"
        lines.append(f"| {_cell(claim.text)} | {_cell(claim.paper)} | {_cell(ours)} | **{verdict}** | {_cell(why)} |")
    if rows:
        lines += ["", "Per setting:", "", table_markdown(suite, rows).rstrip()]
        plots = sorted(p.name for p in folder.glob("*.png"))
        lines += [""] + [f"![{name} {p}]({folder.name}/{p})" for p in plots]
    return "\n".join(lines) + "\n"


def write_report(out: Path, path: Path) -> Path:
    """RESULTS.md at `path` from OUT/<suite>/; image links are relative to `out`, so keep RESULTS.md beside it
    (the default: ./RESULTS.md and ./results/)."""
    out = Path(out)
    relative = Path(out).resolve().relative_to(Path(path).resolve().parent) if \
        Path(out).resolve().is_relative_to(Path(path).resolve().parent) else Path(out).resolve()
    sections = [suite_section(name, out).replace(f"]({name}/", f"]({relative / name}/") for name in SUITES]
    text = "\n".join([
        "# Results: reproducing the PoPE paper (arXiv 2509.10534)", "",
        f"Generated by `pope repro report` on {time.strftime('%Y-%m-%d')} from `{relative}/<suite>/summary.csv`; "
        "do not edit by hand: run the suites (`pope repro SUITE`), then the report again.", "",
        RULES, "", *sections])
    path.write_text(text)
    return path
