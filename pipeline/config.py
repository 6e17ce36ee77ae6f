"""Typed experiment configuration: nested dataclasses, loaded from YAML, overridden from the command line.

A config file is a YAML mapping whose top-level keys are the sections below (plus `name`, `seed`, `run_dir`).
It may start with `inherit: other.yaml` (or a list of files, paths relative to the file): those are loaded first
and this file's keys are merged over them, which is how every RoPE twin is "its PoPE config, one key changed".
Overrides on the command line are `section.key=value`, the value read as YAML (`optim.lr=3e-4`,
`model.position=rope`, `launch.nproc=2`).

Every error (unknown key, wrong type, value out of range) is a ConfigError naming the key and, where there is a
closed set, the valid choices. This module imports no torch, so the CLI can validate a config instantly.
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import yaml


class ConfigError(ValueError):
    """A config that cannot be used; the message is one line that names the key."""


@dataclass
class RopeScalingConfig:
    """YaRN on RoPE frequencies (Peng et al. 2023, arXiv 2309.00071; pipeline/positional.py `Yarn` has the
    formulas): rope and rope_half only. Changes no parameter shape, so `pope eval length` can set it on a trained
    RoPE run (`model.rope_scaling.type=yarn model.rope_scaling.factor=8`)."""

    type: Literal["none", "yarn"] = "none"
    factor: float = 1.0  # s: the context is extended about s times (> 1 for yarn)
    original_max_seq_len: int = 0  # L: the context the model was trained at; 0: model.max_seq_len
    alpha: float = 1.0  # frequencies rotating fewer than α times in L are interpolated by s
    beta: float = 32.0  # those rotating more than β times are kept


@dataclass
class ModelConfig:
    """The decoder-only transformer (pipeline/model.py)."""

    vocab_size: int = 50257  # 0: take it from the dataset's manifest at train time
    d_model: int = 768
    n_heads: int = 12
    n_layers: int = 12
    max_seq_len: int = 1024  # longest sequence the model accepts (learned positions are this long)
    dropout: float = 0.0
    bias: bool = False  # biases in the linear layers
    mlp_ratio: int = 4
    # pope | rope | rope_half (rotary on half of each head's channels) | alibi | alibi_half (ALiBi on half the
    # heads) | sinusoidal (fixed, added to the embeddings) | learned (GPT-2 table) | none (causal mask only)
    position: Literal["pope", "rope", "rope_half", "alibi", "alibi_half", "sinusoidal", "learned", "none"] = "pope"
    position_base: float = 10000.0  # base wavelength of PoPE, RoPE and sinusoidal frequencies
    pope_delta_init: Literal["zero", "uniform"] = "zero"  # PoPE's key phase bias δ: 0, or U(-2π, 0)
    pope_magnitude: Literal["softplus", "relu", "identity"] = "softplus"  # PoPE's μ(x); the others are ablations
    pope_delta: Literal["learned", "none"] = "learned"  # none: no δ parameter, key phase s·θ (ablation)
    rope_scaling: RopeScalingConfig = field(default_factory=RopeScalingConfig)
    # How attention is computed, not what: sdpa (the reference: PoPE's 2·head_dim-wide q/k through SDPA) | fused
    # (PoPE only: pipeline/kernels, Triton, CUDA; no attention dropout) | auto (fused on CUDA with Triton where it
    # applies, sdpa otherwise). Not part of a run's identity: a run may resume or be evaluated with another.
    attention_impl: Literal["auto", "sdpa", "fused"] = "auto"
    norm_eps: float = 1e-5
    init_std: float = 0.02


@dataclass
class DataConfig:
    """Where the token shards are and how batches are cut from them (pipeline/data.py)."""

    path: str = ""  # a `pope prep` output folder (holds manifest.json and DONE)
    train_split: str = "train"
    val_split: str = "val"
    seq_len: int = 1024  # tokens fed to the model per sample (targets are shifted by one)
    batch_size: int = 64  # global: sequences per optimizer step, all processes together
    micro_batch_size: int = 8  # sequences per process per forward/backward; the rest is gradient accumulation
    shuffle_seed: int = 1234
    num_workers: int = 1
    num_canonical_nodes: int = 1  # fixed, so the sample order does not depend on the world size
    loss_on: Literal["all", "last"] = "all"  # "last": loss on each sample's final token only (indirect indexing)
    reverse_complement: float = 0.0  # genome: probability of training on a sample's reverse complement
    transpose: bool = False  # music (JSB): random ±3 semitone transposition of train samples


@dataclass
class OptimConfig:
    """AdamW; weight decay applies to matrices only (not norms, δ or embeddings)."""

    lr: float = 6e-4
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0


@dataclass
class ScheduleConfig:
    """Linear warmup, then decay to min_lr_ratio × lr at the last step."""

    max_steps: int = 100_000
    warmup_steps: int = 1000
    decay: Literal["cosine", "linear", "constant"] = "cosine"
    min_lr_ratio: float = 0.1


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 2
    precision: Literal["fp32", "bf16", "fp16"] = "bf16"
    extra: dict = field(default_factory=dict)  # merged into the generated DeepSpeed JSON, for anything else


@dataclass
class CheckpointConfig:
    every: int = 1000  # steps between checkpoints (one is always written at the end)
    keep_last: int = 3


@dataclass
class LoggingConfig:
    log_every: int = 10  # steps between TensorBoard points and console lines (metrics.jsonl gets every step)
    tensorboard: bool = True
    peak_tflops: float = 0.0  # accelerator peak for train/mfu; 0: known GPUs by name, none on CPU


@dataclass
class EvalConfig:
    every: int = 1000  # steps between validation passes (0: only at the end)
    max_batches: int = 50  # micro-batches per process per pass (0: the whole split)


@dataclass
class InitConfig:
    """Start a new run from another run's weights (pipeline/init_from.py); its optimizer, step and data start fresh.

    The YAML key is `from` (`init.from=runs/owt_124m_pope`); the attribute is `from_`, `from` being a Python keyword.
    """

    from_: str = field(default="", metadata={"key": "from"})  # a run folder or a `pope export` folder; "": none
    step: int = 0  # a run folder's checkpoint to start from; 0: its newest intact one


@dataclass
class LaunchConfig:
    nproc: int = 1  # processes on this machine (local launcher), or tasks per node on a CPU cluster
    executor: Literal["slurm", "local"] = "slurm"  # for `pope submit`: SLURM, or submitit's local executor
    backend: Literal["auto", "gloo", "nccl"] = "auto"  # auto: nccl with GPUs, gloo without


@dataclass
class SlurmConfig:
    """`pope submit` and `pope prep ... --slurm` (launch/slurm.py); ignored by local runs."""

    partition: str = ""
    account: str = ""
    qos: str = ""
    nodes: int = 1
    gpus_per_node: int = 0  # one task per GPU; 0: CPU nodes with launch.nproc tasks each
    cpus_per_task: int = 8
    mem: str = ""  # per node, e.g. "64G" ("" leaves it to the cluster)
    time: int = 1440  # minutes
    constraint: str = ""
    exclusive: bool = False
    extra: dict = field(default_factory=dict)  # more sbatch parameters, e.g. {reservation: x, mail-type: END}
    signal_minutes: float = 5.0  # SIGUSR2 this long before the time limit: checkpoint, then requeue
    max_requeues: int = 20  # requeues after a preemption or time limit, before giving up
    array_parallelism: int = 64  # prep job arrays: at most this many tasks at once


@dataclass
class Config:
    name: str = "run"
    seed: int = 1337
    run_dir: str = "runs"  # the run lives in run_dir/name
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    init: InitConfig = field(default_factory=InitConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)


# --------------------------------------------------------------------------------------------------- loading

CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"


def resolve_config_path(name_or_path: str | Path) -> Path:
    """A file path as given, or a name under the project's configs/ folder (`paper/owt_124m_pope`)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    for candidate in (CONFIGS_DIR / path, CONFIGS_DIR / path.with_suffix(".yaml")):
        if candidate.is_file():
            return candidate
    raise ConfigError(f"config file not found: {name_or_path} (looked here and under {CONFIGS_DIR})")


def load_config(name_or_path: str | Path, overrides: Sequence[str] = ()) -> Config:
    """Read a YAML config (following `inherit`), apply `section.key=value` overrides, validate."""
    raw = _read_yaml_tree(resolve_config_path(name_or_path), seen=())
    config = from_dict(raw)
    config = apply_overrides(config, overrides)
    validate(config)
    return config


def _read_yaml_tree(path: Path, seen: tuple[Path, ...]) -> dict:
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: inherit cycle through {' -> '.join(str(p) for p in seen)}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(err).split())}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config must be a YAML mapping, got {type(data).__name__}")
    parents = data.pop("inherit", None) or []
    if isinstance(parents, str):
        parents = [parents]
    merged: dict = {}
    for parent in parents:
        merged = deep_merge(merged, _read_yaml_tree(path.parent / parent, seen + (path,)))
    return deep_merge(merged, data)


def deep_merge(base: dict, top: dict) -> dict:
    """`top` over `base`, recursing into mappings present in both."""
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def from_dict(data: Mapping[str, Any]) -> Config:
    """Build a Config from nested plain data, checking every key and type."""
    return _build(Config, data, prefix="")


def to_dict(config: Config) -> dict:
    """Nested plain data under the YAML keys (`init.from`, not the attribute `from_`): what from_dict reads."""
    return _plain(config)


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {_key(f): _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _key(f: dataclasses.Field) -> str:
    """A field's YAML key: its name, or metadata["key"] where the name cannot be it (`from`, a Python keyword)."""
    return f.metadata.get("key", f.name)


def _fields_by_key(cls: type) -> dict[str, dataclasses.Field]:
    return {_key(f): f for f in dataclasses.fields(cls)}


def to_yaml(config: Config) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)


def apply_overrides(config: Config, overrides: Sequence[str]) -> Config:
    """Apply `section.key=value` strings (value read as YAML) and return a new Config."""
    data = to_dict(config)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        try:
            value = yaml.safe_load(text) if text != "" else ""
        except yaml.YAMLError:
            value = text
        _set_dotted(data, key.strip(), value)
    return from_dict(data)


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node: Any = data
    cls: Any = Config
    for depth, part in enumerate(parts):
        names = _fields_by_key(cls) if dataclasses.is_dataclass(cls) else None
        here = ".".join(parts[: depth + 1])
        if names is not None and part not in names:
            where = ".".join(parts[:depth]) or "the top level"
            raise ConfigError(f"unknown config key '{here}'; valid keys in {where}: {', '.join(names)}")
        if depth == len(parts) - 1:
            node[part] = value
            return
        if names is not None:
            cls = _hints(cls)[names[part].name]
            if not isinstance(node.get(part), dict):
                raise ConfigError(f"config key '{here}' is not a section; set it as {here}=value")
            node = node[part]
        else:  # inside a free-form dict such as deepspeed.extra
            node = node.setdefault(part, {})
            cls = dict


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, Mapping):
        raise ConfigError(f"config section '{prefix.rstrip('.') or 'top level'}' must be a mapping")
    hints = _hints(cls)
    fields = _fields_by_key(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            where = prefix.rstrip(".") or "the top level"
            raise ConfigError(f"unknown config key '{prefix}{key}'; valid keys in {where}: {', '.join(fields)}")
        name = fields[key].name
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value, prefix=f"{prefix}{key}.")
        else:
            kwargs[name] = _coerce(value, hint, f"{prefix}{key}")
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check (and gently convert) one value against its annotation."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise ConfigError(f"config key '{key}' must be one of {', '.join(map(str, choices))}; got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        return _coerce(value, next(a for a in args if a is not type(None)), key)
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off", "1", "0"):
            return value.lower() in ("true", "yes", "on", "1")
        raise ConfigError(f"config key '{key}' expects true or false; got {value!r}")
    if hint is int:
        number = _as_number(value)
        if number is None or number != int(number):
            raise ConfigError(f"config key '{key}' expects an integer; got {value!r}")
        return int(number)
    if hint is float:
        number = _as_number(value)
        if number is None:
            raise ConfigError(f"config key '{key}' expects a number; got {value!r}")
        return float(number)
    if hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"config key '{key}' expects a string; got {value!r}")
    if hint is dict or origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"config key '{key}' expects a mapping; got {value!r}")
        return dict(value)
    if hint is list or origin is list:
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
            raise ConfigError(f"config key '{key}' expects a list; got {value!r}")
        return list(value)
    raise ConfigError(f"config key '{key}' has an unsupported type {hint!r}")  # a bug in this module


def _as_number(value: Any) -> float | int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, str):  # PyYAML reads 6e-4 and 1e5 as strings (YAML 1.1)
        try:
            return int(value.replace("_", ""))
        except ValueError:
            pass
        try:
            return float(value)
        except ValueError:
            return None
    return None


# ------------------------------------------------------------------------------------------------ validation


def validate(config: Config) -> None:
    """Cross-field checks that types alone cannot express."""
    m, d = config.model, config.data
    validate_model(m)
    _check(d.seq_len > 0, "data.seq_len", "must be > 0")
    _check(d.seq_len <= m.max_seq_len, "data.seq_len", f"({d.seq_len}) exceeds model.max_seq_len ({m.max_seq_len})")
    _check(d.batch_size > 0 and d.micro_batch_size > 0, "data.batch_size", "and micro_batch_size must be > 0")
    _check(d.batch_size % d.micro_batch_size == 0, "data.batch_size",
           f"({d.batch_size}) must be a multiple of data.micro_batch_size ({d.micro_batch_size})")
    _check(d.num_workers >= 0, "data.num_workers", "must be >= 0")
    _check(d.num_canonical_nodes > 0, "data.num_canonical_nodes", "must be > 0")
    _check(0.0 <= d.reverse_complement <= 1.0, "data.reverse_complement", "is a probability in [0, 1]")
    o, s = config.optim, config.schedule
    _check(o.lr > 0, "optim.lr", "must be > 0")
    _check(o.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
    _check(0 <= o.beta1 < 1 and 0 <= o.beta2 < 1, "optim.beta1", "and beta2 must be in [0, 1)")
    _check(o.grad_clip >= 0, "optim.grad_clip", "must be >= 0 (0: no clipping)")
    _check(s.max_steps > 0, "schedule.max_steps", "must be > 0")
    _check(0 <= s.warmup_steps <= s.max_steps, "schedule.warmup_steps", "must be in [0, max_steps]")
    _check(0.0 <= s.min_lr_ratio <= 1.0, "schedule.min_lr_ratio", "must be in [0, 1]")
    _check(config.deepspeed.zero_stage in (0, 1, 2, 3), "deepspeed.zero_stage",
           f"must be one of 0, 1, 2, 3; got {config.deepspeed.zero_stage}")
    _check(config.checkpoint.every > 0, "checkpoint.every", "must be > 0")
    _check(config.checkpoint.keep_last > 0, "checkpoint.keep_last", "must be > 0")
    _check(config.logging.log_every > 0, "logging.log_every", "must be > 0")
    _check(config.eval.every >= 0 and config.eval.max_batches >= 0, "eval.every", "and eval.max_batches must be >= 0")
    _check(config.init.step >= 0, "init.step", "must be >= 0 (0: the newest intact checkpoint)")
    _check(config.init.step == 0 or bool(config.init.from_), "init.step", "needs init.from (the run to start from)")
    _check(config.launch.nproc > 0, "launch.nproc", "must be > 0")
    sl = config.slurm
    _check(sl.nodes > 0 and sl.cpus_per_task > 0 and sl.time > 0, "slurm.nodes",
           "slurm.cpus_per_task and slurm.time must be > 0")
    _check(sl.gpus_per_node >= 0 and sl.max_requeues >= 0, "slurm.gpus_per_node", "and max_requeues must be >= 0")
    _check(0 <= sl.signal_minutes * 60 < sl.time * 60, "slurm.signal_minutes", "must be >= 0 and below slurm.time")
    _check_name(config.name)


def validate_model(m: ModelConfig) -> None:
    """The model section's cross-field checks (also run on `pope eval length` overrides of a trained model)."""
    _check(m.vocab_size >= 0, "model.vocab_size", "must be >= 0 (0: from the dataset)")
    for key in ("d_model", "n_heads", "n_layers", "max_seq_len", "mlp_ratio"):
        _check(getattr(m, key) > 0, f"model.{key}", "must be > 0")
    _check(m.d_model % m.n_heads == 0, "model.d_model", f"({m.d_model}) must be divisible by n_heads ({m.n_heads})")
    head_dim = m.d_model // m.n_heads
    _check(m.position != "rope" or head_dim % 2 == 0, "model.position", f"rope needs an even head dim, got {head_dim}")
    _check(m.position != "rope_half" or head_dim % 4 == 0, "model.position",
           f"rope_half rotates head_dim/2 channels in pairs, so head dim must be divisible by 4; got {head_dim}")
    _check(0.0 <= m.dropout < 1.0, "model.dropout", "must be in [0, 1)")
    _check(m.position_base > 1.0, "model.position_base", "must be > 1")
    if m.attention_impl == "fused":
        _check(m.position == "pope", "model.attention_impl",
               f"fused is a PoPE kernel; model.position={m.position} uses sdpa (set attention_impl to sdpa or auto)")
        _check(head_dim >= 16 and head_dim & (head_dim - 1) == 0, "model.attention_impl",
               f"fused needs a power-of-two head dim >= 16; got {head_dim} (use sdpa or auto)")
        _check(m.dropout == 0.0, "model.attention_impl",
               f"fused has no attention dropout; model.dropout={m.dropout} (set it to 0, or use sdpa or auto)")
    y = m.rope_scaling
    if y.type == "yarn":
        _check(m.position in ("rope", "rope_half"), "model.rope_scaling.type",
               f"yarn scales RoPE frequencies; model.position={m.position} has none (use rope or rope_half)")
        _check(y.factor > 1.0, "model.rope_scaling.factor", f"must be > 1 for yarn (1 changes nothing); got {y.factor}")
        _check(y.original_max_seq_len >= 0, "model.rope_scaling.original_max_seq_len",
               "must be >= 0 (0: model.max_seq_len)")
        _check(0.0 <= y.alpha < y.beta, "model.rope_scaling.alpha",
               f"({y.alpha}) must be >= 0 and below beta ({y.beta})")


def resolve(config: Config, manifest: Mapping[str, Any]) -> Config:
    """The config a run trains with on the prepared data described by `manifest` (data.path's manifest.json): a
    copy with model.vocab_size taken from the data when it is 0, refused (one line) where the config and the data
    disagree. Pure: `config` is left as it is. Everything that builds a model or a loader uses its result."""
    path, vocab, prepared = Path(config.data.path), int(manifest["vocab_size"]), int(manifest["seq_len"])
    resolved = copy.deepcopy(config)
    if resolved.model.vocab_size == 0:
        resolved.model.vocab_size = vocab
    elif resolved.model.vocab_size != vocab:
        raise ConfigError(f"model.vocab_size={resolved.model.vocab_size} but dataset {path} has a vocabulary of "
                          f"{vocab} ({manifest['tokenizer']['kind']}); set model.vocab_size={vocab} (or 0 to follow "
                          "the data)")
    # data.seq_len <= model.max_seq_len is the config's own rule (validate); this one needs the data.
    if resolved.data.seq_len > prepared:
        raise ConfigError(f"data.seq_len={resolved.data.seq_len} exceeds the prepared seq_len {prepared} of {path}; "
                          f"prepare again with --seq-len {resolved.data.seq_len} or lower data.seq_len")
    return resolved


def model_config_from_dict(data: Mapping[str, Any]) -> ModelConfig:
    """A ModelConfig from plain data (a checkpoint's or export's record), type-checked; keys that an older version
    did not write (pope_magnitude, pope_delta, rope_scaling, ...) take their defaults, which is what it ran."""
    return _build(ModelConfig, data, prefix="model.")


# Keys `pope eval length` and `pope generate` may change on a trained model: none changes a parameter's shape.
MODEL_EVAL_OVERRIDES = ("model.rope_scaling.", "model.position_base", "model.attention_impl")
# Model keys that choose how, not what, the model computes: left out of a run's identity (model_identity).
MODEL_RUNTIME_KEYS = ("attention_impl",)


def model_identity(model: ModelConfig) -> dict[str, Any]:
    """The model config as a run's checkpoints record and compare it: without MODEL_RUNTIME_KEYS, so a run can
    resume with another attention implementation."""
    data = dataclasses.asdict(model)
    for key in MODEL_RUNTIME_KEYS:
        data.pop(key, None)
    return data


def check_model_override_keys(overrides: Sequence[str]) -> None:
    """Refuse, in one line, any override of a trained model other than model.rope_scaling.*, model.position_base
    and model.attention_impl (the others would change the weights' shapes or meaning)."""
    for item in overrides:
        key = item.partition("=")[0].strip()
        if not any(key == allowed or (allowed.endswith(".") and key.startswith(allowed))
                   for allowed in MODEL_EVAL_OVERRIDES):
            raise ConfigError(f"override {item!r}: only model.rope_scaling.* and model.position_base can change "
                              "on a trained model (and model.attention_impl, which picks the attention kernel)")


def apply_model_overrides(model: ModelConfig, overrides: Sequence[str]) -> ModelConfig:
    """A trained model's config with `model.rope_scaling.*=` / `model.position_base=` overrides, validated."""
    check_model_override_keys(overrides)
    config = apply_overrides(dataclasses.replace(Config(), model=model), overrides)
    validate_model(config.model)
    return config.model


def _check_name(name: str) -> None:
    """`name` becomes the folder run_dir/name, which `--fresh` empties: it must be one plain folder name that stays
    inside run_dir (no '..', no separator), one the OS accepts (no NUL), and not one a shell command takes for an
    option (a leading '-')."""
    why = ("is empty" if not name
           else "names run_dir itself or its parent" if name in (".", "..")
           else "holds a path separator ('/' or '\\')" if "/" in name or "\\" in name
           else "holds a NUL character" if "\0" in name
           else "starts with '-', which commands would read as an option" if name.startswith("-")
           else "has leading or trailing spaces" if name != name.strip()
           else None)
    _check(why is None, "name", f"must be one plain folder name inside run_dir; {name!r} {why}")


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"config key '{key}' {message}")
