"""Training with real processes, real DeepSpeed (gloo, 2 ranks) and real MDS shards made by data_prep."""

import json
import math

import pytest
import torch

import conftest
from conftest import metrics, run_pope, tiny_train_args
from pipeline.checkpoint import HASH, hash_file
from pipeline.config import Config, apply_overrides
from pipeline.engine import deepspeed_config, lr_multiplier
from pipeline.stopping import EXIT_NONFINITE

pytestmark = pytest.mark.slow


def final_weights(run, step):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(run / "checkpoints"), tag=f"step{step:08d}")


def losses_by_step(run):
    """The last logged loss of each step (a resumed run logs the steps after its checkpoint again)."""
    return {m["step"]: m["train/loss_hex"] for m in metrics(run) if "train/loss_hex" in m}


def kill_after_step(args, run, step):
    """Start `pope train`, SIGKILL its whole process group once `step` is logged."""
    conftest.kill_after_step(args, run, step)
    assert max(m["step"] for m in metrics(run)) < 12, "the run finished before it was killed"


@pytest.mark.parametrize("stage", [2, 3])
def test_killed_run_resumes_bit_for_bit(text_dataset, tmp_path, stage):
    common = [f"deepspeed.zero_stage={stage}", "schedule.max_steps=12", "checkpoint.every=4", "eval.every=6",
              "model.dropout=0.1", "logging.log_every=3", "checkpoint.keep_last=5", "logging.peak_tflops=1"]
    straight = run_pope(*tiny_train_args(text_dataset, tmp_path, "straight", *common))
    # Counted before ZeRO-3 partitions the parameters: the whole model, and MFU from the whole model's FLOPs.
    from pipeline.config import load_config
    from pipeline.model import Transformer

    config = load_config(tmp_path / "straight" / "config.yaml")
    config.model.vocab_size = 320
    model = Transformer(config.model)
    assert f"{model.num_params():,} parameters" in straight.stdout
    logged = [m for m in metrics(tmp_path / "straight") if "train/mfu" in m]
    assert logged and all(m["train/mfu"] == pytest.approx(
        model.flops_per_token(32) * m["train/tokens_per_s"] / (1e12 * 2), rel=1e-9) for m in logged)
    args = tiny_train_args(text_dataset, tmp_path, "killed", *common)
    kill_after_step(args, tmp_path / "killed", 6)
    resumed = run_pope(*args)
    assert "resumed from step" in resumed.stdout
    straight, killed = losses_by_step(tmp_path / "straight"), losses_by_step(tmp_path / "killed")
    assert sorted(straight) == list(range(1, 13)) and killed == straight
    a, b = final_weights(tmp_path / "straight", 12), final_weights(tmp_path / "killed", 12)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_tensorboard_continues_without_duplicates_and_damaged_newest_is_skipped(text_dataset, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    common = ["schedule.max_steps=8", "checkpoint.every=2", "logging.log_every=1", "eval.every=4"]
    args = tiny_train_args(text_dataset, tmp_path, "run", *common)
    run = tmp_path / "run"
    kill_after_step(args + ["schedule.max_steps=12"], run, 5)
    checkpoints = sorted((run / "checkpoints").glob("step*"))
    newest = [c for c in checkpoints if (c / "COMPLETE.json").exists()][-1]
    optim = next(newest.glob("*optim_states.pt"))
    optim.write_bytes(optim.read_bytes()[:100])  # damage the newest complete checkpoint
    resumed = run_pope(*args, "schedule.max_steps=12")
    assert "skipping damaged checkpoint" in resumed.stderr and str(newest.name) in resumed.stderr
    step_resumed = int(resumed.stdout.split("resumed from step ")[1].split()[0])
    assert step_resumed < int(newest.name[4:])
    events = EventAccumulator(str(run / "tb"))
    events.Reload()
    steps = [e.step for e in events.Scalars("train/loss")]
    assert steps == list(range(1, 13))  # continuous, no step twice
    assert {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "val/loss", "val/ppl"} <= set(
        events.Tags()["scalars"])
    logged = {m["step"]: m["train/loss"] for m in metrics(run) if "train/loss" in m}
    assert all(abs(e.value - logged[e.step]) < 1e-5 for e in events.Scalars("train/loss"))


def test_non_finite_loss_stops_without_checkpointing_it(text_dataset, tmp_path):
    args = tiny_train_args(text_dataset, tmp_path, "nan", "deepspeed.zero_stage=0", "schedule.warmup_steps=1",
                           "checkpoint.every=1", "eval.every=0")
    run_pope(*args, "schedule.max_steps=3")
    norms = [m["train/grad_norm"] for m in metrics(tmp_path / "nan") if "train/grad_norm" in m]
    assert len(norms) == 3 and all(math.isfinite(n) and n > 0 for n in norms)  # ZeRO-0 records none itself
    # Diverged weights: an infinite embedding in the newest checkpoint makes the next loss NaN.
    step3 = tmp_path / "nan" / "checkpoints" / "step00000003"
    states = torch.load(step3 / "mp_rank_00_model_states.pt", weights_only=False)
    states["module"]["embed.weight"].fill_(float("inf"))
    torch.save(states, step3 / "mp_rank_00_model_states.pt")
    marker = json.loads((step3 / "COMPLETE.json").read_text())
    marker["files"]["mp_rank_00_model_states.pt"] = {  # recorded anew, so the checksum lets it load
        "size": (step3 / "mp_rank_00_model_states.pt").stat().st_size,
        HASH: hash_file(step3 / "mp_rank_00_model_states.pt")}
    (step3 / "COMPLETE.json").write_text(json.dumps(marker))
    proc = run_pope(*args, "schedule.max_steps=10", check=False)
    assert proc.returncode == EXIT_NONFINITE, proc.stderr
    assert "non-finite loss at step 4" in proc.stderr and "nothing after step 3 was saved" in proc.stderr
    assert sorted(p.name for p in (tmp_path / "nan" / "checkpoints").glob("step*"))[-1] == "step00000003"
    assert all(math.isfinite(m["train/loss"]) for m in metrics(tmp_path / "nan") if "train/loss" in m)


def test_mismatched_resume_and_dataset_are_refused(text_dataset, tmp_path):
    args = tiny_train_args(text_dataset, tmp_path, "run", "schedule.max_steps=2", "schedule.warmup_steps=1", "checkpoint.every=2",
                           "eval.every=0")
    run_pope(*args)
    proc = run_pope(*args, "model.n_layers=3", check=False)
    assert proc.returncode == 2
    assert "cannot resume" in proc.stderr and "model.n_layers: 2 → 3" in proc.stderr
    proc = run_pope(*args, "deepspeed.zero_stage=1", check=False)  # another world size resumes: test_elastic.py
    assert proc.returncode == 2 and "with ZeRO-1" in proc.stderr and "saved by ZeRO-2" in proc.stderr
    proc = run_pope(*args, "model.vocab_size=999", check=False)
    assert proc.returncode == 2 and "model.vocab_size=999 but dataset" in proc.stderr
    proc = run_pope(*args, f"data.path={tmp_path / 'nowhere'}", check=False)
    assert proc.returncode == 2 and "does not exist" in proc.stderr
    fresh = run_pope(*args, "model.n_layers=3", "--fresh")
    assert "resumed" not in fresh.stdout and "starting run" in fresh.stdout


def test_lr_schedule_and_deepspeed_config():
    config = apply_overrides(Config(), ["schedule.max_steps=101", "schedule.warmup_steps=10", "optim.lr=1.0"])
    f = lr_multiplier(config)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0) and f(10) == pytest.approx(1.0)
    assert f(100) == pytest.approx(0.1) and f(55) == pytest.approx(0.55)
    assert all(f(k) >= f(k + 1) for k in range(10, 100))
    config = apply_overrides(Config(), ["data.batch_size=64", "data.micro_batch_size=8", "deepspeed.zero_stage=3",
                                        "deepspeed.extra={zero_optimization: {overlap_comm: true}}"])
    ds = deepspeed_config(config, world_size=2)
    assert ds["gradient_accumulation_steps"] == 4 and ds["train_batch_size"] == 64
    assert ds["zero_optimization"] == {"stage": 3, "overlap_comm": True} and ds["bf16"]["enabled"]
    with pytest.raises(ValueError, match="not a multiple"):
        deepspeed_config(config, world_size=3)
    # bf16 with ZeRO-2/3 accumulates and reduces gradients in fp32; ZeRO-0/1 and fp32 keep DeepSpeed's defaults
    assert ds["data_types"] == {"grad_accum_dtype": "fp32"} and ds["communication_data_type"] == "fp32"
    for overrides in (["deepspeed.zero_stage=1"], ["deepspeed.precision=fp32"]):
        assert "data_types" not in deepspeed_config(apply_overrides(config, overrides), world_size=2)
    kept = apply_overrides(config, ["deepspeed.extra={data_types: {grad_accum_dtype: bf16}}"])
    assert deepspeed_config(kept, world_size=2)["data_types"] == {"grad_accum_dtype": "bf16"}
