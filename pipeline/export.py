"""`pope export`: a run's newest checkpoint (consolidated to fp32 by pipeline/run.py's `load_run`) as a folder of
its own, and reading such folders back.

`pope export RUN --out DIR` writes
- DIR/model.safetensors: fp32 weights (with ZeRO 1-3 DeepSpeed's fp32 master weights, with ZeRO-0 the module's,
  which bf16/fp16 runs hold in half precision), named as in Hugging Face's PopeForCausalLM: `model.` + the name in
  pipeline.model.Transformer; the tied output head is the embedding, stored once;
- DIR/model.json: what rebuilds the model here (its ModelConfig), the step, the run and the dataset's manifest hash;
- DIR/config.yaml (the run's resolved config), DIR/tokenizer/ and DIR/manifest.json (the dataset's tokenizer);
- the Hugging Face files (pipeline/hf_export.py): config.json, generation_config.json and the model's code, so
  `AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)` loads it without this project.
Rebuild with `load_exported(DIR)`, which also reads exports of older versions (weights named without `model.`).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any, Sequence

import torch

from data_prep.contract import MANIFEST, TOKENIZER_DIR, manifest_hash
from data_prep.tokenizers.hf import write_hf_tokenizer
from pipeline.config import Config, ModelConfig, apply_model_overrides, model_config_from_dict, to_yaml
from pipeline.hf_export import WEIGHTS_PREFIX, write_hf_files
from pipeline.model import Transformer
from pipeline.run import RunFolder, load_run


def build_model(model_config: ModelConfig, state: dict[str, torch.Tensor]) -> Transformer:
    model = Transformer(model_config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"weights do not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model


def trained_dataset_hash(run: RunFolder, step: int) -> str | None:
    """The manifest hash of the dataset the run trained on, as its checkpoint records it (None if older)."""
    return run.checkpointer().marker(step).get("identity", {}).get("dataset")


def export(run: str | Path, out: str | Path, step: int | None = None) -> Path:
    """Write the consolidated weights, config, tokenizer and Hugging Face files of a run to `out`."""
    config, state, step = load_run(run, step)
    build_model(config.model, state)  # refuse to export weights that do not load
    trained_on = trained_dataset_hash(RunFolder(run), step)
    data = Path(config.data.path)
    if (data / MANIFEST).is_file() and trained_on is not None and manifest_hash(data) != trained_on:
        raise ValueError(f"the dataset at {data} changed since the run trained on it (manifest hash "
                         f"{manifest_hash(data)}, trained on {trained_on}): its tokenizer may not be the run's")
    return write_export(out, config, state, step=step, run=str(Path(run).resolve()), dataset_hash=trained_on)


def write_export(out: str | Path, config: Config, state: dict[str, torch.Tensor], *, step: int, run: str,
                 dataset_hash: str | None) -> Path:
    """The export folder of a model (`config.model`, fp32 `state` named as in Transformer), with the tokenizer
    and manifest of `config.data.path`; `export` calls it for a run, tests for models they build."""
    from safetensors.torch import save_file

    out = Path(out)
    data = Path(config.data.path)
    out.mkdir(parents=True, exist_ok=True)
    save_file({WEIGHTS_PREFIX + k: v.contiguous() for k, v in state.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})  # transformers reads the "format" entry
    (out / "config.yaml").write_text(to_yaml(config))  # the run's config, with the vocab size it resolved
    manifest = None
    if (data / TOKENIZER_DIR).is_dir():
        shutil.copytree(data / TOKENIZER_DIR, out / TOKENIZER_DIR, dirs_exist_ok=True)
    if (data / MANIFEST).is_file():
        shutil.copy2(data / MANIFEST, out / MANIFEST)
        manifest = json.loads((data / MANIFEST).read_text())
    # AutoTokenizer.from_pretrained(out): tokenizer.json where the tokenizers library expresses the dataset's
    # tokenizer exactly, else a note of what to use instead (JSB, REMI), kept in model.json and config.json.
    tokenizer_note = None
    if manifest is not None and (out / TOKENIZER_DIR).is_dir():
        tokenizer_note = write_hf_tokenizer(out / TOKENIZER_DIR, manifest, out)
    record = {"step": step, "run": run, "dataset_manifest_hash": dataset_hash,
              "hf_tokenizer": "tokenizer.json" if manifest is not None and tokenizer_note is None else tokenizer_note}
    info: dict[str, Any] = {"format": "pope-pretrain", "model": dataclasses.asdict(config.model), **record,
                            "parameters": sum(v.numel() for v in state.values())}
    (out / "model.json").write_text(json.dumps(info, indent=1) + "\n")
    write_hf_files(out, config.model, manifest, record)
    return out


def is_export(folder: str | Path) -> bool:
    """Whether `folder` is a `pope export` folder (rather than a run folder)."""
    return (Path(folder) / "model.json").is_file() and (Path(folder) / "model.safetensors").is_file()


def read_exported(folder: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor], int]:
    """(model config, fp32 state dict named as in pipeline.model.Transformer, step) of an `export` folder;
    safetensors holds no code to run. Older exports, whose weights carry no `model.` prefix, read the same."""
    from safetensors.torch import load_file

    folder = Path(folder)
    info = json.loads((folder / "model.json").read_text())
    model_config = model_config_from_dict(info["model"])
    state = load_file(str(folder / "model.safetensors"))
    if all(name.startswith(WEIGHTS_PREFIX) for name in state):
        state = {name.removeprefix(WEIGHTS_PREFIX): tensor for name, tensor in state.items()}
    return model_config, state, int(info.get("step", 0))


def load_exported(folder: str | Path, overrides: Sequence[str] = ()) -> Transformer:
    """The model of an `export` folder, in eval mode; `overrides` as for `apply_model_overrides` (YaRN, base)."""
    model_config, state, _ = read_exported(folder)
    return build_model(apply_model_overrides(model_config, overrides), state).eval()
