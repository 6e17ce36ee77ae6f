"""What each `pope repro` suite trains and measures: settings, profiles (budgets), and the paper's figures.

Pure data and small pure functions; no torch, no I/O. A *run* is one (setting, seed) of a suite; its config is

    configs/repro/<suite config>.yaml  +  the profile's overrides  +  the setting's  +  seed  +  the user's --set

A setting either trains (its overrides change `model.*`), fine-tunes another setting's run of the same seed
(`init_from`, through `init.from`), or only evaluates another setting's run with evaluation overrides
(`eval_of`: the zero-shot YaRN evaluation of the RoPE run).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

SUITES = ("extrapolation", "indirect", "jsb", "ablations")
PROFILES = ("cpu", "gpu", "smoke")


@dataclass(frozen=True)
class Setting:
    name: str
    overrides: tuple[str, ...] = ()  # config overrides of its training run
    init_from: str | None = None  # fine-tune: start from this setting's run (same seed) via init.from
    eval_of: str | None = None  # evaluation only: score this setting's run with `eval_overrides`
    eval_overrides: tuple[str, ...] = ()  # trailing key=value of `pope eval length` (shape-preserving model keys)
    label: str = ""  # as the tables show it

    @property
    def trains(self) -> bool:
        return self.eval_of is None


@dataclass(frozen=True)
class Profile:
    """A budget: the suite config, overrides on it, and the evaluation's sizes."""

    config: str  # a name under configs/
    overrides: tuple[str, ...] = ()
    seq_len: int = 64  # training length L (text suites)
    length_multiples: tuple[int, ...] = (1, 2, 4, 10, 20)  # extrapolation: evaluated at L × these
    eval_samples: int = 64  # extrapolation: windows per length (--max-samples)
    eval_batches: int = 0  # other suites: micro-batches of the test split (0: all)
    finetune_steps: int = 150  # extrapolation: the YaRN fine-tune at 4 L
    finetune_overrides: tuple[str, ...] = ()
    prep: dict = field(default_factory=dict)  # the suite's data: sizes for its `pope prep`
    note: str = ""  # what this budget can and cannot show


@dataclass(frozen=True)
class Claim:
    """One row of RESULTS.md: a statement of the paper, its figure, and how ours is judged.

    kind "lower"/"higher": `setting`'s metric is lower/higher than `other`'s (reproduced when the gap exceeds
    2 × the larger of the two standard deviations over seeds); "match": `setting`'s mean lies within
    2 × max(paper sd, our sd) of `paper` (absolute agreement); "flat": |metric| ≤ `tolerance`.
    """

    text: str
    kind: str
    setting: str
    metric: str
    other: str | None = None
    paper: str = ""  # the paper's figure(s), as text
    paper_mean: float | None = None
    paper_sd: float | None = None
    tolerance: float = 0.0


@dataclass(frozen=True)
class Suite:
    name: str
    description: str
    metrics: tuple[str, ...]  # summary.csv's metric columns, the headline first (extrapolation: its L's added)
    settings: tuple[Setting, ...]
    profiles: dict
    claims: tuple[Claim, ...]
    lower_is_better: bool = True

    def setting(self, name: str) -> Setting:
        for s in self.settings:
            if s.name == name:
                return s
        raise ValueError(f"suite {self.name} has no setting {name!r}; settings: "
                         f"{', '.join(s.name for s in self.settings)}")

    def profile(self, name: str) -> Profile:
        if name not in self.profiles:
            raise ValueError(f"suite {self.name} has no profile {name!r}; profiles: {', '.join(self.profiles)}")
        return self.profiles[name]


SMOKE_MODEL = ("model.d_model=32", "model.n_heads=2", "model.n_layers=2", "schedule.max_steps=2",
               "schedule.warmup_steps=1", "checkpoint.every=1", "eval.every=0", "eval.max_batches=2",
               "logging.log_every=1", "data.batch_size=4", "data.micro_batch_size=4")

# ------------------------------------------------------------------------------------------ extrapolation

# YaRN as the paper uses it: scale factor 4 over the training length L ({L} is filled in per profile).
_YARN = ("model.rope_scaling.type=yarn", "model.rope_scaling.factor=4", "model.rope_scaling.original_max_seq_len={L}")
EXTRAPOLATION = Suite(
    name="extrapolation",
    description=("PoPE, RoPE and RoPE+YaRN trained on text at a short context L and scored with `pope eval length` "
                 "on held-out text from L to 20 L; metric: the rise of the mean NLL from L to 10 L (nats)."),
    metrics=("nll_rise_10x", "nll_rise_20x", "nll_rise_4x_10x"),
    settings=(
        Setting("pope", ("model.position=pope",), label="PoPE"),
        Setting("rope", ("model.position=rope",), label="RoPE"),
        Setting("yarn", ("model.position=rope", *_YARN), init_from="rope", label="RoPE + YaRN (fine-tuned at 4 L)"),
        Setting("yarn_zeroshot", eval_of="rope", label="RoPE + YaRN (zero-shot, factor 4)", eval_overrides=_YARN),
    ),
    profiles={
        "cpu": Profile("repro/text", seq_len=64, eval_samples=64, finetune_steps=100,
                       prep={"vocab_size": 2000},
                       note="1.0M parameters, L = 64, 1,500 steps of 16 windows (1.5M tokens), one process"),
        "gpu": Profile("repro/text", ("model.d_model=512", "model.n_heads=8", "model.n_layers=8",
                                      "data.batch_size=64", "data.micro_batch_size=64", "schedule.max_steps=10000",
                                      "schedule.warmup_steps=500", "optim.lr=6e-4", "deepspeed.precision=bf16",
                                      "checkpoint.every=2000", "eval.every=2000"),
                       seq_len=256, eval_samples=100, finetune_steps=500, prep={"vocab_size": 8000},
                       note="25M parameters, L = 256, 10,000 steps of 64 windows; untested here"),
        "smoke": Profile("repro/text", SMOKE_MODEL, seq_len=16, eval_samples=2,
                         finetune_steps=2, prep={"vocab_size": 300}, note="2 steps: plumbing only"),
    },
    claims=(
        Claim("RoPE's NLL rises from L to 10 L more than PoPE's", "higher", "rope", "nll_rise_10x", other="pope",
              paper="Fig. 2: RoPE explodes past the training length, PoPE stays flat to 10×"),
        Claim("PoPE stays flat to 10 L (|rise| ≤ 0.1 nats)", "flat", "pope", "nll_rise_10x", tolerance=0.1,
              paper="Fig. 2: flat to 10×"),
        Claim("YaRN (fine-tuned at 4 L) degrades past 4 L more than PoPE", "higher", "yarn", "nll_rise_4x_10x",
              other="pope", paper="Fig. 2: YaRN fine up to 4×, then degrades"),
    ),
)

# ------------------------------------------------------------------------------------------ indirect

# The encodings of item 1 (branch enc) with the paper's Table 9 accuracies where it has them.
_INDIRECT_PAPER = {"pope": (94.82, 2.91), "rope": (11.16, 2.45), "rope_half": (28.50, 6.10),
                   "alibi_half": (27.35, 10.77), "learned": (10.08, 0.19), "sinusoidal": (1.90, 0.04)}
_INDIRECT_LABELS = {"pope": "PoPE", "rope": "RoPE", "rope_half": "RoPE (half the channels)", "alibi": "ALiBi",
                    "alibi_half": "ALiBi (half the heads)", "sinusoidal": "sinusoidal", "learned": "learned",
                    "none": "none (NoPE)"}
INDIRECT = Suite(
    name="indirect",
    description="Indirect indexing (`pope prep indirect`), every position encoding; metric: final-token test "
                "accuracy (%).",
    metrics=("accuracy", "test_nll"),
    settings=tuple(Setting(p, (f"model.position={p}",), label=_INDIRECT_LABELS[p]) for p in _INDIRECT_LABELS),
    profiles={
        "cpu": Profile("repro/indirect", eval_batches=0, prep={"train": 200_000, "val": 2_000, "test": 2_000},
                       note=("3.2M parameters, 3,000 steps of 64 examples: far below the paper's 25M × 100k steps; "
                             "expect every encoding near chance — the comparison needs `--profile gpu`")),
        "gpu": Profile("paper/indirect_pope", ("data.path=data/repro/indirect", "data.num_workers=2"),
                       eval_batches=0, prep={"train": 1_000_000, "val": 10_000, "test": 10_000},
                       note="the paper's model and schedule (512/8/8, 100k steps of 64, bf16): one GPU-day each"),
        "smoke": Profile("repro/indirect", SMOKE_MODEL, eval_batches=1, prep={"train": 200, "val": 16, "test": 16},
                         note="2 steps: plumbing only"),
    },
    claims=tuple(
        Claim(f"{_INDIRECT_LABELS[p]} accuracy matches the paper", "match", p, "accuracy",
              paper=f"{m:.2f} ± {s:.2f}", paper_mean=m, paper_sd=s) for p, (m, s) in _INDIRECT_PAPER.items()
    ) + (Claim("PoPE beats RoPE", "higher", "pope", "accuracy", other="rope", paper="94.82 vs 11.16"),),
    lower_is_better=False,
)

# ------------------------------------------------------------------------------------------ jsb

JSB = Suite(
    name="jsb",
    description="Bach chorales (music21's, JSB raster order), PoPE and RoPE; metric: test NLL (nats per token).",
    metrics=("test_nll", "test_accuracy"),
    settings=(Setting("pope", ("model.position=pope",), label="PoPE"),
              Setting("rope", ("model.position=rope",), label="RoPE")),
    profiles={
        "cpu": Profile("repro/jsb", note="0.3M parameters at 256 tokens, 600 steps of 16 windows"),
        "gpu": Profile("paper/jsb_pope", ("data.path=data/repro/jsb",),
                       note="the paper's model and schedule (256/8/6, 3,000 steps of 4 × 2048)"),
        "smoke": Profile("repro/jsb", SMOKE_MODEL, eval_batches=1, prep={"music21_limit": 12},
                         note="2 steps: plumbing only"),
    },
    claims=(
        Claim("PoPE's test NLL is lower than RoPE's", "lower", "pope", "test_nll", other="rope",
              paper="0.4889 vs 0.5081"),
        Claim("PoPE's test NLL matches the paper", "match", "pope", "test_nll", paper="0.4889", paper_mean=0.4889),
        Claim("RoPE's test NLL matches the paper", "match", "rope", "test_nll", paper="0.5081", paper_mean=0.5081),
    ),
)

# ------------------------------------------------------------------------------------------ ablations

_ABLATION_PAPER = {"pope_no_softplus": 21.57, "pope_relu": 21.55, "pope_no_delta": 21.42}
ABLATIONS = Suite(
    name="ablations",
    description=("The four PoPE variants of the paper's Table 5 on the text model at L; metric: perplexity on the "
                 "held-out text."),
    metrics=("ppl", "nll"),
    settings=(
        Setting("pope", ("model.position=pope",), label="PoPE"),
        Setting("pope_no_softplus", ("model.position=pope", "model.pope_magnitude=identity"), label="no softplus"),
        Setting("pope_relu", ("model.position=pope", "model.pope_magnitude=relu"), label="ReLU for softplus"),
        Setting("pope_no_delta", ("model.position=pope", "model.pope_delta=none"), label="no δ"),
    ),
    profiles=EXTRAPOLATION.profiles,
    claims=tuple(Claim(f"full PoPE beats {name.removeprefix('pope_').replace('_', ' ')}", "lower", "pope", "ppl",
                       other=name, paper=f"21.33 vs {ppl:.2f} (OWT 124M)") for name, ppl in _ABLATION_PAPER.items()),
)

_BY_NAME = {s.name: s for s in (EXTRAPOLATION, INDIRECT, JSB, ABLATIONS)}


def get_suite(name: str) -> Suite:
    if name not in _BY_NAME:
        raise ValueError(f"unknown suite {name!r}; suites: {', '.join(SUITES)}")
    return _BY_NAME[name]


def eval_lengths(profile: Profile) -> list[int]:
    """The extrapolation suite's evaluation lengths: L × each multiple."""
    return [profile.seq_len * k for k in profile.length_multiples]


def with_overrides(profile: Profile, extra: tuple[str, ...]) -> Profile:
    return dataclasses.replace(profile, overrides=profile.overrides + tuple(extra))
