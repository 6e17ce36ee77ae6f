"""`pope export` as a Hugging Face folder: transformers loads it in a fresh process that cannot import this project,
and its logits, loss and generations are the training model's.

Tiny random-initialised models of every encoding go through the export's own writer (`write_export`, which
`pope export` calls for a run); one real run trained through `pope train` goes through `pope export`. Each
transformers version loads them all in one child process (tests/hf_child.py): the venv's (the newest the project
allows) and the oldest the `hf` extra allows, installed by `make venv` into VENV/oldest-transformers (or the folder
POPE_OLDEST_TRANSFORMERS names).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, run_pope, tiny_train_args
from pipeline.config import Config, ModelConfig, RopeScalingConfig
from pipeline.export import load_exported, read_exported, write_export
from pipeline.generate import Sampling, generate
from pipeline.hf_export import SHIPPED, shipped_source
from pipeline.model import Transformer

pytest.importorskip("transformers")

MAX_SEQ_LEN = 16
LENGTH = 40  # beyond MAX_SEQ_LEN: the logits are compared where the model extrapolates
NEW = 12
YARN = RopeScalingConfig(type="yarn", factor=4.0)
VARIANTS: dict[str, dict] = {
    "pope": {}, "pope_relu": {"pope_magnitude": "relu"}, "pope_identity": {"pope_magnitude": "identity"},
    "pope_no_delta": {"pope_delta": "none"}, "rope": {"position": "rope"}, "rope_half": {"position": "rope_half"},
    "rope_yarn": {"position": "rope", "rope_scaling": YARN},
    "rope_half_yarn": {"position": "rope_half", "rope_scaling": YARN},
    "alibi": {"position": "alibi"}, "alibi_half": {"position": "alibi_half"},
    "sinusoidal": {"position": "sinusoidal"}, "learned": {"position": "learned"}, "none": {"position": "none"},
}


FULL = ("pope", "alibi", "rope_yarn")  # also batched, beam-search and padded generation


def tiny_model(name: str) -> Transformer:
    """A random model; δ uniform in [-2π, 0] and then pushed past the clamp on some entries, and a wide init so
    that greedy decoding does not repeat one token (see tests/test_generate.py)."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=50, d_model=32, n_heads=4, n_layers=2, max_seq_len=MAX_SEQ_LEN,
                      pope_delta_init="uniform", init_std=0.5, **{"position": "pope", **VARIANTS[name]})
    model = Transformer(cfg).eval()
    for block in model.blocks:
        delta = getattr(block.attn.position, "delta", None)
        if delta is not None:
            with torch.no_grad():
                delta[0, :3] = torch.tensor([1.0, -9.0, 0.5])  # outside [-2π, 0]: the forward clamps them
    return model


def oldest_transformers() -> str:
    """The lower bound of transformers in pyproject's `hf` extra."""
    text = (ROOT / "pyproject.toml").read_text()
    match = re.search(r'^hf = \[[^\]]*"transformers>=([\w.]+),<5"', text, flags=re.M | re.S)
    assert match, "pyproject.toml's hf extra must read transformers>=X,<5"
    return match.group(1)


def oldest_folder() -> Path | None:
    folder = Path(os.environ.get("POPE_OLDEST_TRANSFORMERS", Path(sys.prefix) / "oldest-transformers"))
    if (folder / "transformers").is_dir():
        return folder
    if os.environ.get("CI"):
        pytest.fail(f"{folder} holds no transformers: `make venv` installs the oldest allowed one there")
    pytest.skip(f"no oldest transformers at {folder} (make venv installs it; or set POPE_OLDEST_TRANSFORMERS)")
    return None


def run_child(exports: dict[str, dict], folder: Path, extra_path: Path | None) -> dict:
    """tests/hf_child.py in a fresh interpreter: cwd outside the repository, only the given extra path on
    PYTHONPATH, Hugging Face offline with a private cache."""
    spec, out = folder / "spec.json", folder / "out.json"
    spec.write_text(json.dumps({"exports": exports}))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP")}
    env.update(HF_HOME=str(folder / "hf_home"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", PYTHONNOUSERSITE="1")
    if extra_path is not None:
        env["PYTHONPATH"] = str(extra_path)
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("hf_child.py")), str(spec), str(out)],
                          cwd=folder, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, dict]:
    """Every variant written by the export code, with the inputs the child feeds it."""
    root = tmp_path_factory.mktemp("hf_exports")
    tokens = torch.randint(0, 50, (2, LENGTH), generator=torch.Generator().manual_seed(1))
    items = {}
    for name in VARIANTS:
        model = tiny_model(name)
        config = Config()
        config.model = model.cfg
        folder = write_export(root / name, config, model.state_dict(), step=7, run="random", dataset_hash="abc")
        learned = name == "learned"
        items[name] = {"dir": str(folder), "tokens": tokens[:, :MAX_SEQ_LEN if learned else LENGTH].tolist(),
                       "prompt": [[5, 6, 7, 8, 9], [9, 1, 30, 2, 44]], "new": 8 if learned else NEW,
                       "too_long": MAX_SEQ_LEN + 1 if learned else 0, "full": name in FULL}
    return items


@pytest.fixture(scope="module")
def newest(exports, tmp_path_factory) -> dict:
    return run_child(exports, tmp_path_factory.mktemp("hf_newest"), None)


@pytest.fixture(scope="module")
def oldest(exports, tmp_path_factory) -> dict:
    folder = oldest_folder()
    return run_child(exports, tmp_path_factory.mktemp("hf_oldest"), folder)


def check_against_pipeline(item: dict, result: dict) -> None:
    """The child's numbers against the exported model rebuilt by the project (load_exported)."""
    model = load_exported(item["dir"])
    tokens = torch.tensor(item["tokens"])
    with torch.no_grad():
        logits, loss = model(tokens, targets=torch.nn.functional.pad(tokens[:, 1:], (0, 1), value=-100))
    torch.testing.assert_close(torch.tensor(result["logits"]), logits, rtol=0, atol=1e-5)
    assert result["loss"] == pytest.approx(float(loss), abs=1e-5)
    # transformers' check_imports passed in the child; what the shipped files import besides each other:
    assert set(result["imports"]) <= {"__future__", "dataclasses", "math", "types", "typing", "torch", "transformers"}
    assert result["class"] == "PopeForCausalLM" and "pope" in result["module"]
    assert result["parameters"] == sum(p.numel() for p in model.parameters())  # the head is not a second copy
    assert (result["hidden_size"], result["num_hidden_layers"]) == (model.cfg.d_model, model.cfg.n_layers)
    assert result["record"]["dataset_manifest_hash"] == "abc" and result["record"]["step"] == 7
    prompt = item["prompt"]
    ours = [generate(model, p, item["new"], Sampling(temperature=0)) for p in prompt]
    assert result["cached"] == [ours[0]] and result["uncached"] == [ours[0]]
    assert len(set(ours[0])) >= 3  # a model repeating one token would make the comparison weak
    if item["full"]:
        assert result["batch"] == ours
        assert result["dict_sequences"][0] == prompt[0] + ours[0][:2]
        assert result["beam_cached"] == result["beam_uncached"]
        assert "left padding" in result["left_padding_error"]
    if item["too_long"]:
        assert "beyond what learned absolute positions know" in result["too_long_error"]


@pytest.mark.parametrize("name", list(VARIANTS))
def test_newest_transformers(name, exports, newest):
    import transformers

    assert newest["version"] == transformers.__version__
    check_against_pipeline(exports[name], newest["exports"][name])


@pytest.mark.parametrize("name", list(VARIANTS))
def test_oldest_transformers(name, exports, oldest):
    assert oldest["version"] == oldest_transformers()
    check_against_pipeline(exports[name], oldest["exports"][name])


def test_shipped_sources_are_the_pipeline_files():
    """The shipped model is pipeline/model.py and pipeline/positional.py with only their project imports changed."""
    for module, shipped in SHIPPED.items():
        original = (ROOT / "pipeline" / f"{module}.py").read_text().splitlines()
        copy = shipped_source(module).splitlines()
        assert len(original) == len(copy)
        changed = [(a, b) for a, b in zip(original, copy) if a != b]
        kernels = [(a, b) for a, b in changed if a == "from pipeline import kernels"]
        assert all(b.startswith("kernels = None") for _, b in kernels)  # the Triton kernel is not shipped
        changed = [pair for pair in changed if pair not in kernels]
        assert all("from pipeline." in a and "from ." in b and "pipeline" not in b for a, b in changed)
    assert any("from .pope_positional import" in line for line in shipped_source("model").splitlines())


def test_old_exports_still_load(tmp_path, exports):
    """An export of the previous format (weights named as in Transformer, no HF files) reads the same."""
    from safetensors.torch import load_file, save_file

    folder = Path(exports["pope"]["dir"])
    old = tmp_path / "old"
    old.mkdir()
    state = load_file(str(folder / "model.safetensors"))
    assert all(k.startswith("model.") for k in state)
    save_file({k.removeprefix("model."): v for k, v in state.items()}, str(old / "model.safetensors"))
    (old / "model.json").write_text((folder / "model.json").read_text())
    _, new_state, _ = read_exported(folder)
    _, old_state, _ = read_exported(old)
    assert new_state.keys() == old_state.keys() and "embed.weight" in new_state
    assert all(torch.equal(new_state[k], old_state[k]) for k in new_state)


@pytest.mark.slow
def test_trained_run_through_pope_export(text_dataset, tmp_path):
    """A run trained by `pope train`, exported by `pope export`, loaded by transformers in a fresh process."""
    from data_prep.contract import manifest_hash

    run_pope(*tiny_train_args(text_dataset, tmp_path, "run", "launch.nproc=1", "schedule.max_steps=2",
                              "schedule.warmup_steps=1", "eval.every=0", "checkpoint.every=2"))
    out = tmp_path / "export"
    proc = run_pope("export", str(tmp_path / "run"), "--out", str(out))
    assert "config.json" in proc.stdout and "AutoTokenizer.from_pretrained" in proc.stdout
    assert (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file()
    info = json.loads((out / "model.json").read_text())
    assert info["hf_tokenizer"] == "tokenizer.json"
    assert info["dataset_manifest_hash"] == manifest_hash(text_dataset)
    config = json.loads((out / "config.json").read_text())
    assert config["pope_pretrain"]["dataset_manifest_hash"] == manifest_hash(text_dataset)
    assert config["eos_token_id"] == json.loads((out / "manifest.json").read_text())["special_ids"]["eos"]
    # no special ids in the input: transformers' generate reads the pad id in a prompt as padding
    specials = json.loads((out / "manifest.json").read_text())["special_ids"]
    low = 1 + max(i for i in specials.values() if i is not None)
    tokens = torch.randint(low, info["model"]["vocab_size"], (1, 48), generator=torch.Generator().manual_seed(0))
    item = {"dir": str(out), "tokens": tokens.tolist(), "prompt": [tokens[0, :6].tolist(), tokens[0, 6:12].tolist()],
            "new": 6, "too_long": 0, "full": False}
    result = run_child({"run": item}, tmp_path, None)["exports"]["run"]
    model = load_exported(out)
    with torch.no_grad():
        logits, _ = model(tokens)
    torch.testing.assert_close(torch.tensor(result["logits"]), logits, rtol=0, atol=1e-5)
    assert result["record"]["step"] == 2
    # EOS may end a greedy continuation early in HF's generate (generation_config.json), as in `pope generate`
    ours = generate(model, item["prompt"][0], 6, Sampling(temperature=0), stop=[config["eos_token_id"]])
    assert result["cached"][0][:len(ours)] == ours
