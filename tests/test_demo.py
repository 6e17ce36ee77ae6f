"""`pope demo --steps 3` end to end: music21's chorales, two 2-process trainings, the length table, CSV and PNG."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.conftest import run_pope

ROW = re.compile(r"^\s*(\d+)\s+(\d+)×\s+(\d+)\s+(\d+\.\d+)\s+(\d+\.\d+)\s*$")
CHANGE = re.compile(r"PoPE's NLL (rose|fell) by (\d+\.\d+) nats \((\d+\.\d+) → (\d+\.\d+)\), "
                    r"RoPE's (rose|fell) by (\d+\.\d+) nats \((\d+\.\d+) → (\d+\.\d+)\)")


def test_demo_prints_the_length_table_and_writes_csv_and_png(tmp_path):
    pytest.importorskip("music21")
    from pipeline.length_eval import read_csv

    proc = run_pope("demo", "--steps", "3", "--data", str(tmp_path / "data"), "--runs", str(tmp_path / "runs"))
    out = proc.stdout

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

    figure = re.search(r"Figure: (\S+\.png)", out)
    assert figure, out
    png = Path(figure.group(1))
    assert png.parent == csv_path.parent and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
