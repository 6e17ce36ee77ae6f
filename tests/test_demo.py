"""`pope demo --steps 3` end to end: music21's chorales, two 2-process trainings, the length table, CSV and PNG."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from tests.conftest import metrics, run_pope

ROW = re.compile(r"^\s*(\d+)\s+(\d+)×\s+(\d+)\s+(\d+\.\d+)\s+(\d+\.\d+)\s*$")
CHANGE = re.compile(r"PoPE's NLL (rose|fell) by (\d+\.\d+) nats \((\d+\.\d+) → (\d+\.\d+)\), "
                    r"RoPE's (rose|fell) by (\d+\.\d+) nats \((\d+\.\d+) → (\d+\.\d+)\)")
TRAINED = re.compile(r"^   (jsb64_pope|jsb64_rope): \d+ s; validation NLL (\d+\.\d+)$", re.M)


def test_demo_prints_the_length_table_and_writes_csv_and_png(tmp_path):
    pytest.importorskip("music21")
    from pipeline.length_eval import read_csv

    proc = run_pope("demo", "--steps", "3", "--data", str(tmp_path / "data"), "--runs", str(tmp_path / "runs"))
    out = proc.stdout

    # 1/4: both corpora prepared (published: manifest and DONE), one tokenizer, whole pieces and 64-token windows.
    manifests = {}
    for name in ("jsb-whole", "jsb-64"):
        folder = tmp_path / "data" / name
        assert (folder / "DONE").is_file(), out
        manifests[name] = json.loads((folder / "manifest.json").read_text())
    assert (manifests["jsb-whole"]["seq_len"], manifests["jsb-64"]["seq_len"]) == (2047, 64)
    assert manifests["jsb-whole"]["tokenizer"] == manifests["jsb-64"]["tokenizer"]
    assert all(m["splits"]["val"]["samples"] > 0 for m in manifests.values())
    # 2/4 and 3/4: each model trained its 3 steps, logged a finite loss each step and saved step 3.
    for index, (name, position) in enumerate((("jsb64_pope", "pope"), ("jsb64_rope", "rope")), start=2):
        assert f"== {index}/4  training {name}: {position}, 96 wide, 3 layers, 64-token windows, 3 steps" in out
        losses = {m["step"]: m["train/loss"] for m in metrics(tmp_path / "runs" / name) if "train/loss" in m}
        assert sorted(losses) == [1, 2, 3] and all(math.isfinite(v) for v in losses.values())
        assert (tmp_path / "runs" / name / "checkpoints" / "step00000003" / "COMPLETE.json").is_file()
    validation = dict(TRAINED.findall(out))
    assert validation.keys() == {"jsb64_pope", "jsb64_rope"}, out

    rows = [m.groups() for m in map(ROW.match, out.splitlines()) if m]
    assert [int(r[0]) for r in rows] == [64, 128, 256, 512] and [int(r[1]) for r in rows] == [1, 2, 4, 8]
    assert all(int(r[2]) > 0 for r in rows)

    # The printed table is the CSV's numbers, the CSV is the library's (pipeline/length_eval.py) format.
    csv_path = tmp_path / "runs" / "length_eval" / "length.csv"
    measured = {(row["position"], int(row["L"])): (int(row["samples"]), float(row["nll"]))
                for row in read_csv(csv_path)}
    for L, _, samples, pope, rope in rows:
        assert measured[("pope", int(L))] == (int(samples), pytest.approx(float(pope), abs=1e-4))
        assert measured[("rope", int(L))] == (int(samples), pytest.approx(float(rope), abs=1e-4))

    # The closing sentence is computed from those numbers, not written in advance.
    change = CHANGE.search(out)
    assert change, out
    groups = change.groups()
    for (verb, by, before, after), column in ((groups[:4], 3), (groups[4:], 4)):
        assert float(before) == pytest.approx(float(rows[0][column]), abs=1e-3)
        assert float(after) == pytest.approx(float(rows[-1][column]), abs=1e-3)
        assert float(by) == pytest.approx(abs(float(after) - float(before)), abs=2e-3)
        assert verb == ("rose" if float(after) >= float(before) else "fell")
    assert re.search(r"validation NLL over every 64-token window", out)
    assert re.search(r"In distribution .* is better by \d+\.\d+ nats \(PoPE \d+\.\d+, RoPE \d+\.\d+\)", out)
    at_last = re.search(r"At 8× the training length PoPE's NLL is (\d+\.\d+) nats (lower|higher) than RoPE's", out)
    assert at_last, out
    gap = float(rows[-1][3]) - float(rows[-1][4])
    assert float(at_last.group(1)) == pytest.approx(abs(gap), abs=2e-3)
    assert at_last.group(2) == ("lower" if gap < 0 else "higher") or abs(gap) < 1e-3  # 4-decimal rounding
    # The table's in-distribution row is the validation NLL each training step printed.
    row = re.search(r"^val NLL\s+(\d+\.\d+)\s+(\d+\.\d+)$", out, re.M)
    assert row and row.groups() == (validation["jsb64_pope"], validation["jsb64_rope"]), out

    figure = re.search(r"Figure: (\S+\.png)", out)
    assert figure, out
    png = Path(figure.group(1))
    assert png.parent == csv_path.parent and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
