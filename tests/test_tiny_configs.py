"""Every tiny config trains end to end on CPU from data its corpus's real prep made (tests/tiny_data.py)."""

import math

import pytest

from conftest import metrics, run_pope
from tiny_data import build

pytestmark = pytest.mark.slow

# The corpus each experiment's tiny config trains on. owt_253m and owt_774m are owt_124m's data and code at other
# sizes: test_config.py checks their configs; training them here would repeat owt_124m.
CORPUS = {"indirect": "indirect", "owt_124m": "text", "jsb": "jsb", "maestro": "midi", "genome": "genome"}


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny_data")


@pytest.mark.parametrize("experiment", CORPUS)
def test_tiny_config_trains(experiment, tiny_root, tmp_path):
    data = build(CORPUS[experiment], tiny_root)
    proc = run_pope("train", f"tiny/{experiment}_pope", f"data.path={data}", f"run_dir={tmp_path}",
                    "schedule.max_steps=8", "eval.every=4", "eval.max_batches=2", "checkpoint.every=8")
    assert "step 8/8" in proc.stdout and "val loss" in proc.stdout
    logged = [m for m in metrics(tmp_path / f"tiny_{experiment}_pope") if "train/loss" in m]
    assert [m["step"] for m in logged] == list(range(1, 9)) and all(math.isfinite(m["train/loss"]) for m in logged)
    assert logged[-1]["train/loss"] < logged[0]["train/loss"]
