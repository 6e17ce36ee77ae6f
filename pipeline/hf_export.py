"""The Hugging Face half of `pope export`: the files that let `transformers` load an export folder.

`AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)` reads:
- config.json: the model's fields (pipeline.config.ModelConfig), `auto_map` naming the two classes below, the
  special token ids, and `pope_pretrain` (the step and the dataset's manifest hash);
- configuration_pope.py, modeling_pope.py: pipeline/hf/, copied as they are;
- pope_model.py, pope_positional.py: pipeline/model.py and pipeline/positional.py, copied with their
  `from pipeline.X import` lines made relative, so the shipped network is the training one and there is one
  implementation of the model and its encodings (`shipped_source`);
- model.safetensors (written by pipeline/export.py; parameter names under `model.`), generation_config.json.
Writing them needs no transformers; loading them needs only torch and transformers (not this project).
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path
from typing import Any

HF_SOURCES = Path(__file__).resolve().parent / "hf"
WEIGHTS_PREFIX = "model."  # PopeForCausalLM.model is the Transformer
# pipeline module → the name of its copy in an export folder; the model may import nothing else of the project
SHIPPED = {"model": "pope_model", "positional": "pope_positional"}
CONFIG_CLASS, MODEL_CLASS = "configuration_pope.PopeConfig", "modeling_pope.PopeForCausalLM"
_IMPORT = re.compile(r"^(\s*)from pipeline\.(\w+) import (.*)$")


def shipped_source(module: str) -> str:
    """The source of pipeline/<module>.py as shipped: each `from pipeline.X import` made relative to X's copy.

    Two exceptions: `from pipeline import kernels` becomes `kernels = None` (the export runs the reference
    attention, never the Triton kernel), and pipeline.config, which pipeline/model.py imports for annotations only (under
    TYPE_CHECKING); its copy points at the shipped config class instead, so the file still reads as typed."""
    lines = []
    path = Path(__file__).resolve().parent / f"{module}.py"
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line == "from pipeline import kernels":  # Triton kernels are not shipped: see hf_config
            lines.append("kernels = None  # an export runs the reference attention (model.attention_impl: sdpa)")
            continue
        match = _IMPORT.match(line)
        if match:
            indent, name, names = match.groups()
            if name in SHIPPED:
                line = f"{indent}from .{SHIPPED[name]} import {names}"
            elif name == "config" and names.split("#")[0].strip() == "ModelConfig" and indent:
                line = f"{indent}from .configuration_pope import PopeConfig as ModelConfig"
            else:
                raise ValueError(f"{path}:{number} imports pipeline.{name}, which an export does not ship")
        elif re.match(r"^\s*(import pipeline|from pipeline\b)", line):
            raise ValueError(f"{path}:{number}: write project imports as `from pipeline.X import ...`")
        lines.append(line)
    return "\n".join(lines) + "\n"


def special_ids(manifest: dict[str, Any] | None) -> dict[str, int]:
    """The special ids transformers is told about. Text documents start after an EOS (there is no BOS in the
    data), so for text BOS is EOS: what `pope generate` starts from, and the tokenizer's bos_token
    (data_prep/tokenizers/hf.py), which lm-eval's HFLM puts before an empty context as `pope eval harness` does."""
    special = {k: v for k, v in ((manifest or {}).get("special_ids") or {}).items() if v is not None}
    if (manifest or {}).get("corpus") == "text" and "eos" in special:
        special["bos"] = special["eos"]
    return special


def hf_config(model: dict[str, Any], manifest: dict[str, Any] | None, record: dict[str, Any]) -> dict[str, Any]:
    """config.json: the model's fields, what transformers needs to find the classes, special ids, provenance."""
    special = special_ids(manifest)
    ids = {f"{name}_token_id": special.get(name) for name in ("bos", "eos", "pad") if special.get(name) is not None}
    return {"architectures": ["PopeForCausalLM"], "model_type": "pope",
            "auto_map": {"AutoConfig": CONFIG_CLASS, "AutoModelForCausalLM": MODEL_CLASS},
            "torch_dtype": "float32", "tie_word_embeddings": True, **model,
            # The fused Triton kernel (pipeline/kernels) is a training-time option that is not shipped; the
            # reference attention computes the same logits.
            "attention_impl": "sdpa", **ids, "pope_pretrain": record}


def generation_config(manifest: dict[str, Any] | None) -> dict[str, Any]:
    """generation_config.json: the special ids, with EOS only where the corpus ends documents with it (as
    `pope generate` stops)."""
    from pipeline.generate import ENDS_WITH_EOS

    manifest = manifest or {}
    special = special_ids(manifest)
    out: dict[str, Any] = {}
    if special.get("bos") is not None:
        out["bos_token_id"] = special["bos"]
    if special.get("pad") is not None:
        out["pad_token_id"] = special["pad"]
    if special.get("eos") is not None and manifest.get("corpus") in ENDS_WITH_EOS:
        out["eos_token_id"] = special["eos"]
    return out


def write_hf_files(out: Path, model_config: Any, manifest: dict[str, Any] | None, record: dict[str, Any]) -> None:
    """Everything in `out` that transformers reads, but the weights (model_config: a ModelConfig)."""
    model = dataclasses.asdict(model_config)
    (out / "config.json").write_text(json.dumps(hf_config(model, manifest, record), indent=1) + "\n")
    (out / "generation_config.json").write_text(json.dumps(generation_config(manifest), indent=1) + "\n")
    for name in ("configuration_pope.py", "modeling_pope.py"):
        shutil.copyfile(HF_SOURCES / name, out / name)
    for module, shipped in SHIPPED.items():
        (out / f"{shipped}.py").write_text(shipped_source(module))
