"""Starting a run from another run's weights: `init.from=RUN_OR_EXPORT` (`init.step=N` for a given checkpoint).

The source is a run folder (its newest intact checkpoint, or checkpoint `init.step`, verified and loaded weights-only
by pipeline/run.py's `load_run`: a damaged or untrusted checkpoint is refused there) or a `pope export` folder
(safetensors). Its fp32 weights are copied into the freshly built model before DeepSpeed wraps it, so every ZeRO
stage starts from them (ZeRO-3 partitions what it is given). The optimizer state, the step, the learning-rate
schedule and the data position start fresh: it is a new run, with its own seq_len, schedule and data. Once the run
has checkpoints of its own it resumes from those and never reads the source again.

Checks, each a one-line ValueError, before anything trains:
- the new data was prepared with the source's tokenizer (data_prep.contract.check_same_tokenizer);
- every parameter of the new model has the source's name and shape, the first that differs named with both shapes
  (d_model, layers, vocabulary, pope's δ against rope, a learned position table of another length); buffers are
  not copied: they derive from this run's config (such as scaled RoPE frequencies), they are not learned;
- n_heads and position may not change even where no shape does (rope and none have the same parameters; other
  heads cut the same matrices differently). What keeps the meaning of every weight is allowed: max_seq_len (not for
  learned positions), position_base, dropout, the δ initialisation, and keys such as a RoPE scaling.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from data_prep.contract import check_same_tokenizer
from pipeline.config import Config, ModelConfig
from pipeline.model import Transformer

# Model keys whose change leaves every shape alone but gives the weights another meaning.
MEANING_KEYS = ("n_heads", "position", "pope_magnitude")


@dataclasses.dataclass
class Source:
    """The weights a run starts from."""

    path: Path
    kind: str  # "run" or "export"
    step: int
    model: ModelConfig
    state: dict[str, torch.Tensor]  # fp32, on CPU
    data_folder: Path  # where its tokenizer is recorded: the run's data.path, or the export folder itself


def read_source(path: str | Path, step: int = 0) -> Source:
    """A run folder's checkpoint (the newest intact one when step is 0) or an export folder's weights."""
    from pipeline.export import is_export, read_exported
    from pipeline.run import RunFolder, load_run

    path = Path(path)
    if is_export(path):
        if step:
            raise ValueError(f"init.step={step} names a checkpoint, but {path} is a `pope export` folder (one set of "
                             "weights); remove init.step")
        model, state, saved_step = read_exported(path)
        return Source(path, "export", saved_step, model, state, path)
    if not RunFolder(path).is_run():
        raise ValueError(f"init.from={path} is neither a run folder (config.yaml, checkpoints/) nor a `pope export` "
                         "folder (model.json, model.safetensors)")
    config, state, saved_step = load_run(path, step or None)
    return Source(path, "run", saved_step, config.model, state, Path(config.data.path))


def check_fits(source: Source, model: Transformer) -> None:
    """Refuse (one line) weights that the model cannot take as they are."""
    ours, theirs = model.cfg, source.model
    changed = ", ".join(f"model.{f.name} {getattr(theirs, f.name)!r} → {getattr(ours, f.name)!r}"
                        for f in dataclasses.fields(ModelConfig)
                        if hasattr(theirs, f.name) and getattr(theirs, f.name) != getattr(ours, f.name))
    where = f"init.from {source.path} (step {source.step}) does not fit this model"
    if ours.position == "learned" and theirs.position == "learned" and ours.max_seq_len > theirs.max_seq_len:
        raise ValueError(f"{where}: learned positions stop at the source's model.max_seq_len={theirs.max_seq_len}, "
                         f"this run asks for {ours.max_seq_len} (the table has no rows to fine-tune from); use "
                         f"model.max_seq_len={theirs.max_seq_len} or a position encoding that extrapolates")
    target = dict(model.named_parameters())
    buffers = {name for name, _ in model.named_buffers()}
    for name, tensor in target.items():
        if name not in source.state:
            raise ValueError(f"{where}: {name} {tuple(tensor.shape)} is absent there ({changed})")
        if source.state[name].shape != tensor.shape:
            raise ValueError(f"{where}: {name} is {tuple(source.state[name].shape)} there, {tuple(tensor.shape)} "
                             f"here ({changed})")
    extra = [name for name in source.state if name not in target and name not in buffers]
    if extra:
        raise ValueError(f"{where}: {extra[0]} {tuple(source.state[extra[0]].shape)} has no place here ({changed})")
    for key in MEANING_KEYS:
        if getattr(theirs, key) != getattr(ours, key):
            raise ValueError(f"{where}: model.{key} is {getattr(theirs, key)!r} there, {getattr(ours, key)!r} here; "
                             "the shapes agree but the weights would mean something else")


def state_checksum(state: dict[str, torch.Tensor]) -> str:
    """xxh3-128 over every tensor's name, dtype, shape and bytes, in name order: what exactly was loaded."""
    import xxhash

    digest = xxhash.xxh3_128()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def identity(config: Config) -> dict[str, Any] | None:
    """What a resume of this run must match: where its weights were asked to come from (None: random init)."""
    return {"from": config.init.from_, "step": config.init.step} if config.init.from_ else None


def init_weights(config: Config, model: Transformer) -> dict[str, Any]:
    """Check the source of `config.init` against the model and the run's data, then copy its weights into the
    model (before DeepSpeed wraps it). Returns the record kept with the run's checkpoints."""
    source = read_source(config.init.from_, config.init.step)
    check_same_tokenizer(source.data_folder, config.data.path, f"init.from {source.path}")
    check_fits(source, model)
    # Parameters only: buffers are derived from this run's config (e.g. scaled RoPE frequencies), not learned.
    parameters = dict(model.named_parameters())
    with torch.no_grad():
        for name, param in parameters.items():
            param.copy_(source.state[name])
    # Taken from the model after the copy, so it vouches for what the first forward reads; it equals
    # state_checksum of the source's parameters exactly when every one arrived bit for bit.
    return {"from": config.init.from_, "path": str(source.path.resolve()), "kind": source.kind,
            "step": source.step, "tensors": len(parameters), "checksum": state_checksum(parameters)}
