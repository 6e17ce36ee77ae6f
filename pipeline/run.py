"""The run folder: RUN = run_dir/name, the one place that knows what lives in it, and reading weights out of it.

    RUN/config.yaml          the config the run was started with (written by every `pope train` / `pope submit`)
    RUN/checkpoints/         pipeline/checkpoint.py's folders (stepNNNNNNNN/, latest)
    RUN/universal/           checkpoints converted for a resume on another number of processes (pipeline/universal.py)
    RUN/tb/                  TensorBoard events (training; `pope eval length` adds its figures)
    RUN/metrics.jsonl        every step's record (pipeline/metrics.py)
    RUN/train.log            rank 0's progress lines
    RUN/slurm/, RUN/submission.json, RUN/submission.sh, RUN/slurm_state.json    `pope submit` (launch/slurm.py)

Every other module asks a `RunFolder` for these paths instead of joining names itself.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import warnings
from pathlib import Path

import torch

from pipeline import safe_load
from pipeline.checkpoint import LATEST, Checkpointer, adopt, tag_for
from pipeline.config import Config, load_config, model_config_from_dict, to_yaml
from pipeline.distributed import DistEnv


class RunFolder:
    """The paths of one run folder; nothing is created or read by asking for them."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    @classmethod
    def of(cls, config: Config) -> "RunFolder":
        """The run folder a config trains in: run_dir/name."""
        return cls(Path(config.run_dir) / config.name)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    @property
    def config(self) -> Path:
        return self.path / "config.yaml"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def latest(self) -> Path:
        """The newest complete checkpoint's tag, as the last save wrote it (for people and `pope status`)."""
        return self.checkpoints / LATEST

    @property
    def universal(self) -> Path:
        """Universal-checkpoint conversions (stepNNNNNNNN/), while a resume on another world size needs one."""
        return self.path / "universal"

    @property
    def tb(self) -> Path:
        return self.path / "tb"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def train_log(self) -> Path:
        return self.path / "train.log"

    @property
    def slurm_logs(self) -> Path:
        """submitit's folder: the sbatch scripts, each task's stdout/stderr and pickled results."""
        return self.path / "slurm"

    @property
    def submission(self) -> Path:
        return self.path / "submission.json"

    @property
    def submission_script(self) -> Path:
        return self.path / "submission.sh"

    @property
    def slurm_state(self) -> Path:
        return self.path / "slurm_state.json"

    @property
    def training_outputs(self) -> tuple[Path, ...]:
        """What training writes, and `--fresh` removes: checkpoints (and their conversions), TensorBoard events,
        metrics, the log."""
        return (self.checkpoints, self.universal, self.tb, self.metrics, self.train_log)

    def is_run(self) -> bool:
        return self.config.is_file()

    def checkpointer(self) -> Checkpointer:
        """A Checkpointer over this run's checkpoints for reading them in this one process (no identity: it
        finds, verifies and reads checkpoints; it does not save or resume)."""
        return Checkpointer(self.checkpoints, DistEnv(), keep_last=1)


def prepare_run_dir(config: Config, fresh: bool = False, adopt_checkpoints: bool = False) -> RunFolder:
    """Create RUN (run_dir/name) and write the config; with fresh, remove what an earlier run left; with
    adopt_checkpoints, mark checkpoint folders this program did not write complete as they are
    (pipeline/checkpoint.py)."""
    run = RunFolder.of(config)
    if fresh and adopt_checkpoints:
        raise ValueError("--fresh and --adopt-checkpoints contradict each other: choose one")
    if adopt_checkpoints:
        for folder in adopt(run.checkpoints):
            print(f"adopted {folder} as it is (checksums recorded now)", flush=True)
    if fresh and run.path.exists():
        for target in run.training_outputs:
            shutil.rmtree(target, ignore_errors=True) if target.is_dir() else target.unlink(missing_ok=True)
    run.path.mkdir(parents=True, exist_ok=True)
    run.config.write_text(to_yaml(config))
    return run


# ---------------------------------------------------------------------------------------- weights out of a run


def newest_checkpoint(run: RunFolder) -> int:
    """The newest checkpoint of a run whose files are intact (sizes and checksums); damaged ones are skipped."""
    checkpoints = run.checkpointer()
    for step in reversed(checkpoints.complete_steps()):
        reason = checkpoints.damage(step)
        if reason is None:
            return step
        warnings.warn(f"skipping damaged checkpoint {run.checkpoints / tag_for(step)}: {reason}", stacklevel=2)
    raise ValueError(f"{run.path} has no complete checkpoint (is it a run folder? train it first)")


def load_run(path: str | Path, step: int | None = None) -> tuple[Config, dict[str, torch.Tensor], int]:
    """(config, fp32 state dict, step) of a run's newest (or given) checkpoint, on CPU, any ZeRO stage.

    The checkpoint's files are verified against their checksums and checked for code before anything loads them,
    and every load in this process is weights-only (pipeline/safe_load.py)."""
    run = RunFolder(path)
    if not run.is_run():
        raise ValueError(f"{run.path} is not a run folder (no config.yaml)")
    config = load_config(run.config)
    checkpoints = run.checkpointer()
    if step is None:
        step = newest_checkpoint(run)
    elif step not in checkpoints.complete_steps():
        raise ValueError(f"{run.checkpoints / tag_for(step)} is not a complete checkpoint")
    else:
        reason = checkpoints.damage(step)
        if reason is not None:
            raise ValueError(f"{run.checkpoints / tag_for(step)} is damaged: {reason}")
    folder = run.checkpoints / tag_for(step)
    safe_load.enforce()
    checkpoints.check_safe(step)
    if any(folder.glob("*optim_states.pt")) and config.deepspeed.zero_stage > 0:
        os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):  # its chatter
            state = get_fp32_state_dict_from_zero_checkpoint(str(run.checkpoints), tag=tag_for(step))
    else:  # ZeRO-0: the model states file holds the whole module
        state = safe_load.load(folder / "mp_rank_00_model_states.pt")["module"]
    state = {name: tensor.float() for name, tensor in state.items()}
    # An adopted or old checkpoint may record no model: the config's then stands.
    recorded = checkpoints.marker(step).get("identity", {}).get("model")
    if recorded is not None:
        config.model = model_config_from_dict(recorded)  # the vocab size the run resolved from its data
    return config, state, step
