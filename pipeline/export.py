"""Weights out of a run: the newest checkpoint consolidated to one fp32 state dict, for evaluation and export.

`pope export RUN --out DIR` writes DIR/model.safetensors (fp32, parameter names of pipeline.model.Transformer; with
ZeRO 1-3 DeepSpeed's fp32 master weights, with ZeRO-0 the module's weights, which bf16/fp16 runs hold in half
precision),
DIR/config.yaml (the run's resolved config), DIR/model.json (what is needed to rebuild the model, the step and the
dataset hash) and DIR/tokenizer/ with DIR/manifest.json (the dataset's tokenizer, so ids can be decoded).
Rebuild with `load_exported(DIR)`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch

from data_prep.contract import MANIFEST, TOKENIZER_DIR
from pipeline import safe_load
from pipeline.checkpoint import MARKER, Checkpointer, tag_for
from pipeline.config import Config, ModelConfig, apply_model_overrides, load_config, model_config_from_dict
from pipeline.distributed import DistEnv
from pipeline.model import Transformer


def newest_checkpoint(run: Path) -> int:
    """The newest checkpoint of a run whose files are intact (sizes and checksums); damaged ones are skipped."""
    checkpoints = Checkpointer(run / "checkpoints", DistEnv(), keep_last=1, identity={})
    for step in reversed(checkpoints.complete_steps()):
        reason = checkpoints.damage(step)
        if reason is None:
            return step
        warnings.warn(f"skipping damaged checkpoint {run / 'checkpoints' / tag_for(step)}: {reason}", stacklevel=2)
    raise ValueError(f"{run} has no complete checkpoint (is it a run folder? train it first)")


def load_run(run: str | Path, step: int | None = None) -> tuple[Config, dict[str, torch.Tensor], int]:
    """(config, fp32 state dict, step) of a run's newest (or given) checkpoint, on CPU, any ZeRO stage.

    The checkpoint's files are verified against their checksums and checked for code before anything loads them,
    and every load in this process is weights-only (pipeline/safe_load.py)."""
    run = Path(run)
    if not (run / "config.yaml").is_file():
        raise ValueError(f"{run} is not a run folder (no config.yaml)")
    config = load_config(run / "config.yaml")
    checkpoints = Checkpointer(run / "checkpoints", DistEnv(), keep_last=1, identity={})
    if step is None:
        step = newest_checkpoint(run)
    elif step not in checkpoints.complete_steps():
        raise ValueError(f"{run / 'checkpoints' / tag_for(step)} is not a complete checkpoint")
    else:
        reason = checkpoints.damage(step)
        if reason is not None:
            raise ValueError(f"{run / 'checkpoints' / tag_for(step)} is damaged: {reason}")
    folder = run / "checkpoints" / tag_for(step)
    safe_load.enforce()
    checkpoints.check_safe(step)
    if any(folder.glob("*optim_states.pt")) and config.deepspeed.zero_stage > 0:
        os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):  # its chatter
            state = get_fp32_state_dict_from_zero_checkpoint(str(run / "checkpoints"), tag=tag_for(step))
    else:  # ZeRO-0: the model states file holds the whole module
        state = safe_load.load(folder / "mp_rank_00_model_states.pt")["module"]
    state = {name: tensor.float() for name, tensor in state.items()}
    identity = json.loads((folder / MARKER).read_text())["identity"]
    if "model" in identity:
        config.model = model_config_from_dict(identity["model"])  # the vocab size the run resolved from its data
    return config, state, step


def build_model(model_config: ModelConfig, state: dict[str, torch.Tensor]) -> Transformer:
    model = Transformer(model_config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"weights do not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model


def export(run: str | Path, out: str | Path, step: int | None = None) -> Path:
    """Write the consolidated weights, config and tokenizer of a run to `out`."""
    from safetensors.torch import save_file

    run, out = Path(run), Path(out)
    config, state, step = load_run(run, step)
    build_model(config.model, state)  # refuse to export weights that do not load
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / "model.safetensors"))
    shutil.copy2(run / "config.yaml", out / "config.yaml")
    data = Path(config.data.path)
    if (data / TOKENIZER_DIR).is_dir():
        shutil.copytree(data / TOKENIZER_DIR, out / TOKENIZER_DIR, dirs_exist_ok=True)
    if (data / MANIFEST).is_file():
        shutil.copy2(data / MANIFEST, out / MANIFEST)
    info: dict[str, Any] = {"format": "pope-pretrain", "model": dataclasses.asdict(config.model), "step": step,
                            "run": str(run.resolve()), "parameters": sum(v.numel() for v in state.values())}
    (out / "model.json").write_text(json.dumps(info, indent=1) + "\n")
    return out


def is_export(folder: str | Path) -> bool:
    """Whether `folder` is a `pope export` folder (rather than a run folder)."""
    return (Path(folder) / "model.json").is_file() and (Path(folder) / "model.safetensors").is_file()


def read_exported(folder: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor], int]:
    """(model config, fp32 state dict, step) of an `export` folder; safetensors holds no code to run."""
    from safetensors.torch import load_file

    folder = Path(folder)
    info = json.loads((folder / "model.json").read_text())
    model_config = model_config_from_dict(info["model"])
    return model_config, load_file(str(folder / "model.safetensors")), int(info.get("step", 0))


def load_exported(folder: str | Path, overrides: Sequence[str] = ()) -> Transformer:
    """The model of an `export` folder, in eval mode; `overrides` as for `apply_model_overrides` (YaRN, base)."""
    model_config, state, _ = read_exported(folder)
    return build_model(apply_model_overrides(model_config, overrides), state).eval()
