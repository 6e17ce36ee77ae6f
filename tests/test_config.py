"""Configs: YAML + inherit + overrides, one-line errors, every shipped config valid, RoPE twins."""

from pathlib import Path

import pytest
import yaml

from launch.cli import main as pope_main
from pipeline.config import (CONFIGS_DIR, Config, ConfigError, apply_overrides, from_dict, load_config, resolve,
                             to_dict, to_yaml, validate)

SHIPPED = [p for p in sorted(CONFIGS_DIR.rglob("*.yaml")) if not p.name.startswith("_")]


def write(tmp_path, name, data):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


def test_defaults_round_trip():
    config = Config()
    assert from_dict(to_dict(config)) == config
    assert from_dict(yaml.safe_load(to_yaml(config))) == config


def test_overrides_parse_types():
    config = apply_overrides(Config(), ["optim.lr=3e-4", "model.position=rope", "launch.nproc=2",
                                        "model.bias=true", "schedule.max_steps=1e3", "name=exp1",
                                        "deepspeed.extra.zero_optimization.overlap_comm=false"])
    assert config.optim.lr == 3e-4 and isinstance(config.optim.lr, float)
    assert config.model.position == "rope" and config.launch.nproc == 2 and config.model.bias is True
    assert config.schedule.max_steps == 1000 and isinstance(config.schedule.max_steps, int)
    assert config.deepspeed.extra == {"zero_optimization": {"overlap_comm": False}}


@pytest.mark.parametrize("override,fragment", [
    ("model.nheads=4", "unknown config key 'model.nheads'; valid keys in model: vocab_size, d_model, n_heads"),
    ("modle.n_heads=4", "unknown config key 'modle'; valid keys in the top level: name, seed"),
    ("model.n_heads=four", "config key 'model.n_heads' expects an integer; got 'four'"),
    ("model.n_heads=2.5", "expects an integer"),
    ("optim.lr=fast", "config key 'optim.lr' expects a number"),
    ("model.position=t5", "config key 'model.position' must be one of pope, rope, rope_half, alibi, alibi_half, "
                          "sinusoidal, learned, none; got 't5'"),
    ("model.pope_magnitude=exp", "must be one of softplus, relu, identity"),
    ("model.pope_delta=zero", "must be one of learned, none"),
    ("model.rope_scaling.type=ntk", "config key 'model.rope_scaling.type' must be one of none, yarn"),
    ("model.rope_scaling.scale=4", "unknown config key 'model.rope_scaling.scale'; valid keys in model.rope_scaling"),
    ("model.pope_delta_init=normal", "must be one of zero, uniform"),
    ("deepspeed.precision=fp8", "must be one of fp32, bf16, fp16"),
    ("model.bias=maybe", "expects true or false"),
    ("model=3", "must be a mapping"),
    ("lr", "not of the form section.key=value"),
])
def test_override_errors_are_one_line_and_name_the_key(override, fragment):
    with pytest.raises(ConfigError) as err:
        apply_overrides(Config(), [override])
    assert fragment in str(err.value)
    assert "\n" not in str(err.value)


def test_validation_errors(tmp_path):
    path = write(tmp_path, "c.yaml", {"model": {"d_model": 100, "n_heads": 3}})
    with pytest.raises(ConfigError, match="d_model.*divisible by n_heads"):
        load_config(path)
    with pytest.raises(ConfigError, match="zero_stage.*0, 1, 2, 3"):
        load_config(write(tmp_path, "d.yaml", {"deepspeed": {"zero_stage": 4}}))
    with pytest.raises(ConfigError, match="data.seq_len.*exceeds model.max_seq_len"):
        load_config(write(tmp_path, "e.yaml", {"data": {"seq_len": 4096}}))
    with pytest.raises(ConfigError, match="multiple of data.micro_batch_size"):
        load_config(write(tmp_path, "f.yaml", {"data": {"batch_size": 10, "micro_batch_size": 4}}))


def test_yaml_unknown_key_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="unknown config key 'optim.learning_rate'; valid keys in optim: lr"):
        load_config(write(tmp_path, "a.yaml", {"optim": {"learning_rate": 1}}))
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "b.yaml", "model: {d_model: [1,"))
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")


def test_inherit_merges_and_detects_cycles(tmp_path):
    write(tmp_path, "base.yaml", {"model": {"d_model": 128, "n_heads": 4}, "optim": {"lr": 1e-3}})
    child = write(tmp_path, "child.yaml", {"inherit": "base.yaml", "model": {"n_heads": 8}})
    config = load_config(child, ["optim.beta2=0.99"])
    assert (config.model.d_model, config.model.n_heads, config.optim.lr, config.optim.beta2) == (128, 8, 1e-3, 0.99)
    write(tmp_path, "x.yaml", {"inherit": "y.yaml"})
    write(tmp_path, "y.yaml", {"inherit": "x.yaml"})
    with pytest.raises(ConfigError, match="inherit cycle"):
        load_config(tmp_path / "x.yaml")


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(CONFIGS_DIR)))
def test_every_shipped_config_loads(path):
    config = load_config(path)
    assert config.name and config.run_dir


def test_shipped_configs_never_share_a_run_folder():
    """Two configs with one run folder would resume each other's checkpoints (`pope repro` renames its runs per
    setting and seed on top of this)."""
    folders: dict[Path, Path] = {}
    for path in SHIPPED:
        config = load_config(path)
        folder = Path(config.run_dir) / config.name
        assert folder not in folders, f"{path} and {folders[folder]} both train into {folder}"
        folders[folder] = path


PAPER = {  # experiment: (width, heads, layers, dropout, delta init, batch, seq, lr, beta2, iters, warmup)
    "indirect": (512, 8, 8, 0.0, "uniform", 64, 64, 2e-4, 0.99, 100_000, 4000),
    "owt_124m": (768, 12, 12, 0.0, "zero", 64, 1024, 6e-4, 0.95, 100_000, 1000),
    "owt_253m": (1024, 16, 16, 0.0, "zero", 64, 1024, 6e-4, 0.95, 100_000, 1000),
    "owt_774m": (1280, 20, 36, 0.0, "zero", 64, 1024, 6e-4, 0.95, 100_000, 1000),
    "jsb": (256, 8, 6, 0.2, "uniform", 4, 2048, 6e-4, 0.99, 3000, 10),
    "maestro": (384, 8, 6, 0.1, "uniform", 16, 2048, 6e-4, 0.99, 60_000, 500),
    "genome": (1024, 16, 16, 0.1, "uniform", 64, 1000, 2.5e-4, 0.999, 100_000, 4000),
}


@pytest.mark.parametrize("experiment", PAPER)
def test_paper_configs_match_the_paper_and_twins_differ_only_in_position(experiment):
    pope, rope = load_config(f"paper/{experiment}_pope"), load_config(f"paper/{experiment}_rope")
    m, d, o, s = pope.model, pope.data, pope.optim, pope.schedule
    got = (m.d_model, m.n_heads, m.n_layers, m.dropout, m.pope_delta_init, d.batch_size, d.seq_len, o.lr, o.beta2,
           s.max_steps, s.warmup_steps)
    assert got == PAPER[experiment]
    assert (o.weight_decay, o.grad_clip, s.decay, s.min_lr_ratio, m.position_base) == (0.01, 1.0, "cosine", 0.1, 1e4)
    assert m.position == "pope" and rope.model.position == "rope"
    assert _without_name_and_position(pope) == _without_name_and_position(rope)
    tiny_pope, tiny_rope = load_config(f"tiny/{experiment}_pope"), load_config(f"tiny/{experiment}_rope")
    assert _without_name_and_position(tiny_pope) == _without_name_and_position(tiny_rope)
    assert tiny_pope.deepspeed.precision == "fp32" and tiny_pope.model.pope_delta_init == m.pope_delta_init


@pytest.mark.parametrize("base", ["owt_124m_pope", "owt_124m_rope_yarn"])
def test_length_fine_tune_configs_match_the_paper(base):
    """PoPE+ft and YaRN: the 1024-token run's weights, 500 steps at 4096, warmup 20, batch 64, LR 6e-5, no decay."""
    ft = load_config(f"paper/{base}_ft4096")
    source = load_config(f"paper/{base.removesuffix('_yarn')}")
    assert ft.init.from_ == f"{source.run_dir}/{source.name}" and ft.init.step == 0
    s, d = ft.schedule, ft.data
    assert (d.seq_len, ft.model.max_seq_len, s.max_steps, s.warmup_steps, d.batch_size, ft.optim.lr, s.decay) == \
        (4096, 4096, 500, 20, 64, 6e-5, "constant")
    for key in ("d_model", "n_heads", "n_layers", "vocab_size", "position"):  # what init.from needs to match
        assert getattr(ft.model, key) == getattr(source.model, key), key
    if base.endswith("yarn"):
        scaling = to_dict(ft)["model"]["rope_scaling"]
        assert {k: scaling[k] for k in ("type", "factor", "original_max_seq_len")} == \
            {"type": "yarn", "factor": 4.0, "original_max_seq_len": 1024}


def test_init_from_key_is_from(tmp_path):
    """`from` is a Python keyword: the YAML key and the override are `init.from`, written back as such."""
    config = load_config("tiny/owt_124m_pope", ["init.from=runs/x", "init.step=20"])
    assert (config.init.from_, config.init.step) == ("runs/x", 20)
    assert yaml.safe_load(to_yaml(config))["init"] == {"from": "runs/x", "step": 20}
    assert load_config(write(tmp_path, "c.yaml", to_yaml(config))).init == config.init
    with pytest.raises(ConfigError, match="unknown config key 'init.from_'; valid keys in init: from, step"):
        load_config("tiny/owt_124m_pope", ["init.from_=runs/x"])
    with pytest.raises(ConfigError, match="config key 'init.step' needs init.from"):
        load_config("tiny/owt_124m_pope", ["init.step=3"])


def _without_name_and_position(config):
    data = to_dict(config)
    data.pop("name")
    data["model"].pop("position")
    return data


def test_cli_config_prints_resolved_config_and_params(capsys):
    assert pope_main(["config", "paper/owt_124m_pope", "model.position=rope"]) == 0
    out = capsys.readouterr().out
    printed = yaml.safe_load(out)
    assert printed["model"]["position"] == "rope"
    assert "# parameters: 123," in out  # 124M with tied embeddings (no learned position table)


def test_cli_config_error_is_one_line_exit_2(capsys):
    assert pope_main(["config", "paper/owt_124m_pope", "model.heads=4"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pope: error: unknown config key 'model.heads'; valid keys in model:")
    assert "\n" not in err


@pytest.mark.parametrize("name, why", [
    ("..", "names run_dir itself or its parent"), (".", "names run_dir itself or its parent"), ("", "is empty"),
    ("a/b", "path separator"), ("../escape", "path separator"), ("/abs", "path separator"),
    ("a\\b", "path separator"), ("a\0b", "NUL"), ("-rf", "starts with '-'"), (" x", "leading or trailing spaces"),
])
def test_run_names_that_leave_run_dir_are_refused(name, why, capsys):
    with pytest.raises(ConfigError, match="config key 'name' must be one plain folder name") as err:
        validate(Config(name=name))
    assert why in str(err.value) and "\n" not in str(err.value)
    assert pope_main(["config", "tiny/jsb_pope", f"name={name!r}" if name else "name="]) == 2
    line = capsys.readouterr().err.strip()
    assert line.startswith("pope: error: config key 'name'") and len(line.splitlines()) == 1


@pytest.mark.parametrize("name", ["run", "owt_124m_pope", "a.b", "x-1", "..a", "ümlaut"])
def test_plain_run_names_are_accepted(name):
    validate(Config(name=name))


def test_resolve_fills_the_vocabulary_in_a_copy_and_refuses_what_the_data_cannot_serve():
    manifest = {"vocab_size": 320, "seq_len": 64, "tokenizer": {"kind": "sentencepiece"}}
    config = apply_overrides(Config(), ["data.path=prepared", "model.vocab_size=0", "data.seq_len=64"])
    before = to_dict(config)
    resolved = resolve(config, manifest)
    assert resolved.model.vocab_size == 320 and to_dict(config) == before  # pure: the given config is untouched
    assert to_dict(resolved) == {**before, "model": {**before["model"], "vocab_size": 320}}
    resolved.data.seq_len = 1  # the copy shares nothing with the original
    assert config.data.seq_len == 64
    assert resolve(apply_overrides(config, ["model.vocab_size=320"]), manifest).model.vocab_size == 320
    with pytest.raises(ConfigError, match=r"model.vocab_size=50257 but dataset prepared has a vocabulary of 320 "
                                          r"\(sentencepiece\); set model.vocab_size=320"):
        resolve(apply_overrides(config, ["model.vocab_size=50257"]), manifest)
    with pytest.raises(ConfigError, match="data.seq_len=128 exceeds the prepared seq_len 64 of prepared"):
        resolve(apply_overrides(config, ["data.seq_len=128", "model.max_seq_len=128"]), manifest)
