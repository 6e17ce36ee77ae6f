"""`pope eval length`: perplexity as a function of context length, the measurement PoPE exists for.

Protocol (YaRN's "truncate" evaluation; the same text is in README.md and heads length.csv):
for each length L, every sample of the split that holds at least L+1 tokens, in the split's stored order, up to N
samples (--max-samples; 0: all), contributes its first L+1 tokens; the model reads positions 0..L-1 in one forward
pass and all L targets are scored; NLL is the token-weighted mean over those targets and ppl = exp(NLL). Every
token is scored once, with all its preceding context.

The model body runs once per batch of windows; the final hidden states are then projected to the vocabulary and
log-softmaxed a chunk of positions at a time, so L × vocab fp32 logits never exist at once (10,240 × 50,257 would be
2 GB per window). bf16 autocast on CUDA, fp32 on CPU. Per-position losses are summed over the windows, which gives
the loss per band of positions (positions.csv): the rise beyond the training length shows inside one long window.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import shlex
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from data_prep.contract import TOKENIZER_DIR, check_same_tokenizer, read_manifest
from data_prep.mds import TOKENS_COLUMN, import_streaming
from pipeline.model import Transformer

PROTOCOL = ("for each length L, every sample of the split that holds at least L+1 tokens, in the split's stored "
            "order, up to N samples, contributes its first L+1 tokens; the model reads positions 0..L-1 in one "
            "forward pass and all L targets are scored; NLL is the token-weighted mean over those targets and "
            "ppl = exp(NLL)")
LENGTH_COLUMNS = ("run", "position", "scaling", "step", "L", "samples", "tokens", "nll", "ppl")
POSITION_COLUMNS = ("run", "L", "pos_start", "pos_end", "tokens", "nll")
DEFAULT_BATCH_TOKENS = 16384  # positions per forward pass (batch = max(1, this // L)): one 10,240 window at a time
DEFAULT_CHUNK_ROWS = 2048  # positions projected to logits at once: 2048 × 50,257 fp32 = 0.4 GB


@dataclasses.dataclass
class EvalModel:
    """A model to evaluate and what the protocol needs to know about it."""

    name: str  # the run (or export) folder's name, plus what overrides changed (`owt_rope+yarn8`), as shown
    folder: Path  # RUN (or the export folder); its tb/ gets the figures and scalars
    model: Transformer
    position: str  # model.position: pope, rope, rope_half, alibi, alibi_half, sinusoidal, learned, none
    step: int
    train_len: int  # data.seq_len the run trained at
    data_folder: Path  # where its tokenizer is recorded: the run's dataset, or the export folder itself
    scaling: str = "none"  # the RoPE scaling evaluated with: none, or yarn(s=8,L=1024,a=1,b=32)
    variant: str = ""  # what overrides changed, '' or e.g. '+yarn8' (also the end of `name`)

    @property
    def tag(self) -> str:
        """The TensorBoard tag prefix: plain and YaRN evaluations of one run must not overwrite each other."""
        return "length_eval" + self.variant.replace("+", "_")


@dataclasses.dataclass
class LengthResult:
    """One (model, L) measurement: NLL summed per position over `samples` windows of L targets."""

    run: str
    position: str
    scaling: str
    step: int
    length: int
    samples: int
    position_nll_sum: np.ndarray  # (L,) float64: summed NLL of position p's target over the windows

    @property
    def tokens(self) -> int:
        return self.samples * self.length

    @property
    def nll(self) -> float:
        return float(self.position_nll_sum.sum() / self.tokens)

    @property
    def ppl(self) -> float:
        return math.exp(min(self.nll, 700.0))

    def bands(self, width: int) -> list[tuple[int, int, int, float]]:
        """(start, end exclusive, tokens, mean NLL) for positions [0, width), [width, 2·width), ... up to L."""
        out = []
        for start in range(0, self.length, width):
            end = min(start + width, self.length)
            out.append((start, end, self.samples * (end - start),
                        float(self.position_nll_sum[start:end].sum() / (self.samples * (end - start)))))
        return out


# ------------------------------------------------------------------------------------------------ loading


def load_eval_model(path: str | Path, overrides: Sequence[str] = ()) -> EvalModel:
    """A run folder (newest intact checkpoint, verified and weights-only loaded) or a `pope export` folder, with
    `overrides` (model.rope_scaling.*, model.position_base) applied to its model config."""
    from pipeline.config import apply_model_overrides, load_config
    from pipeline.export import build_model, is_export, load_exported
    from pipeline.run import load_run

    path = Path(path)
    if is_export(path):
        import json

        model = load_exported(path, overrides)
        config = load_config(path / "config.yaml")
        step = int(json.loads((path / "model.json").read_text()).get("step", 0))
        trained, data_folder = config.model, path
    else:
        config, state, step = load_run(path)
        model = build_model(apply_model_overrides(config.model, overrides), state).eval()
        trained, data_folder = config.model, Path(config.data.path)
    cfg, variant = model.cfg, variant_suffix(trained, model.cfg)
    return EvalModel(path.resolve().name + variant, path, model, cfg.position, step, config.data.seq_len,
                     data_folder, scaling_label(cfg), variant)


def scaling_label(cfg: Any) -> str:
    """`none`, or the YaRN settings a model runs with, e.g. yarn(s=8,L=1024,a=1,b=32)."""
    y = cfg.rope_scaling
    if y.type == "none":
        return "none"
    return (f"{y.type}(s={y.factor:g},L={y.original_max_seq_len or cfg.max_seq_len},a={y.alpha:g},"
            f"b={y.beta:g})")


def variant_suffix(trained: Any, evaluated: Any) -> str:
    """What overrides changed, for the run's label: '' when nothing, else e.g. '+yarn8' or '+base500000'."""
    suffix = ""
    if evaluated.rope_scaling != trained.rope_scaling:
        y = evaluated.rope_scaling
        suffix += f"+{y.type}{y.factor:g}" if y.type != "none" else "+noscaling"
    if evaluated.position_base != trained.position_base:
        suffix += f"+base{evaluated.position_base:g}"
    return suffix


# ------------------------------------------------------------------------------------------------ samples


def split_lengths(split_dir: Path) -> list[int]:
    """The token count of every sample of a split, in stored order (no shuffling, no shared memory)."""
    if not (split_dir / "index.json").is_file():
        raise ValueError(f"{split_dir} is not a split of a prep folder (no index.json)")
    dataset = import_streaming().LocalDataset(local=str(split_dir))
    return [len(dataset[i][TOKENS_COLUMN]) for i in range(len(dataset))]


def select_samples(lengths: Sequence[int], length: int, max_samples: int) -> list[int]:
    """Indices, in stored order, of the samples holding at least length+1 tokens; the first max_samples (0: all)."""
    chosen = [i for i, n in enumerate(lengths) if n >= length + 1]
    return chosen[:max_samples] if max_samples > 0 else chosen


def prep_command(data: Path, manifest: dict[str, Any], length: int) -> str:
    """The `pope prep` that makes samples of `length`+1 tokens with the same tokenizer, from the manifest's args."""
    corpus, args = manifest.get("corpus", "CORPUS"), manifest.get("args", {})
    out = f"{data}-{length}"
    # JSB samples are whole 4-token time steps, 4·⌊(seq_len+1)/4⌋ tokens: round up so one holds length+1.
    seq_len = 4 * math.ceil((length + 1) / 4) - 1 if corpus == "jsb" else length

    def path_of(value: Any) -> str | None:
        return value.get("path") if isinstance(value, dict) else (value if isinstance(value, str) else None)

    parts = ["pope", "prep", str(corpus)]
    if corpus == "text":
        parts += ["--input", *([path_of(i) or "INPUT" for i in args.get("inputs", [])] or ["INPUT"])]
        if manifest["tokenizer"].get("kind") == "gpt2":
            parts += ["--tokenizer", "gpt2", "--gpt2-vocab", path_of(args.get("gpt2_vocab")) or "vocab.json",
                      "--gpt2-merges", path_of(args.get("gpt2_merges")) or "merges.txt"]
        else:
            parts += ["--tokenizer-model", str(data / TOKENIZER_DIR / "spm.model")]
    elif corpus == "genome":
        parts += ["--fasta", path_of(args.get("fasta")) or "FASTA"]
        if args.get("bed"):
            parts += ["--bed", path_of(args["bed"]) or "BED"]
        parts += ["--tokenizer", str(manifest["tokenizer"].get("kind", "kmer6"))]
    elif corpus in ("jsb", "midi"):
        source = path_of(args.get("input"))
        parts += ["--input", source] if source else ["--from-music21"]
    return shlex.join([*parts, "--out", out, "--seq-len", str(seq_len)])


def no_sample_error(data: Path, split: str, length: int, longest: int) -> ValueError:
    manifest = read_manifest(data)
    return ValueError(f"{data / split} holds no sample of L+1={length + 1} tokens (its longest has {longest}, "
                      f"prepared with --seq-len {manifest.get('seq_len')}); prepare one: "
                      f"{prep_command(data, manifest, length)}")


def windows(split_dir: Path, indices: Sequence[int], length: int, batch: int) -> Iterator[torch.Tensor]:
    """The first length+1 tokens of the chosen samples, `batch` at a time, as (batch, length+1) int64 tensors."""
    dataset = import_streaming().LocalDataset(local=str(split_dir))
    for start in range(0, len(indices), batch):
        rows = [np.asarray(dataset[i][TOKENS_COLUMN][: length + 1], dtype=np.int64)
                for i in indices[start:start + batch]]
        yield torch.from_numpy(np.stack(rows))


# ------------------------------------------------------------------------------------------------ scoring


@torch.no_grad()
def position_nll(model: Transformer, tokens: torch.Tensor, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> torch.Tensor:
    """(batch, L) float32 NLL of every target of (batch, L+1) windows: one body pass over positions 0..L-1, then
    the tied head and log-softmax a chunk of `chunk_rows` positions at a time (bf16 autocast on CUDA)."""
    device = next(model.parameters()).device
    tokens = tokens.to(device)
    inputs, targets = tokens[:, :-1], tokens[:, 1:].reshape(-1)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        hidden = model.hidden(inputs)
        flat = hidden.reshape(-1, hidden.shape[-1])
        out = torch.empty(flat.shape[0], dtype=torch.float32, device=device)
        for start in range(0, flat.shape[0], chunk_rows):
            logits = F.linear(flat[start:start + chunk_rows], model.embed.weight).float()
            out[start:start + chunk_rows] = F.cross_entropy(logits, targets[start:start + chunk_rows],
                                                            reduction="none")
    return out.view(inputs.shape)


def measure(entry: EvalModel, split_dir: Path, indices: Sequence[int], length: int,
            batch_tokens: int = DEFAULT_BATCH_TOKENS, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> LengthResult:
    """Score the chosen samples' windows of `length` targets; sums per position in float64."""
    sums = np.zeros(length, dtype=np.float64)
    for batch in windows(split_dir, indices, length, max(1, batch_tokens // length)):
        sums += position_nll(entry.model, batch, chunk_rows).double().sum(dim=0).cpu().numpy()
    return LengthResult(entry.name, entry.position, entry.scaling, entry.step, length, len(indices), sums)


def check_lengths(entry: EvalModel, lengths: Sequence[int]) -> None:
    """Learned absolute positions have no row past model.max_seq_len: refuse those lengths in one line."""
    if entry.position == "learned":
        beyond = [L for L in lengths if L > entry.model.cfg.max_seq_len]
        if beyond:
            raise ValueError(f"{entry.name} uses learned absolute positions, which stop at model.max_seq_len="
                             f"{entry.model.cfg.max_seq_len}; L={','.join(map(str, beyond))} would need positions "
                             "it never learned (drop them; every other encoding reads any position)")


def evaluate_lengths(runs: Sequence[str | Path], data: str | Path, lengths: Sequence[int], split: str = "val",
                     max_samples: int = 0, batch_tokens: int = DEFAULT_BATCH_TOKENS, device: str | None = None,
                     overrides: Sequence[str] = ()) -> tuple[list[EvalModel], list[LengthResult]]:
    """Every check first (overrides, tokenizers, learned positions, samples long enough), then every run at every
    length. `overrides` (model.rope_scaling.*, model.position_base) apply to every run's model config."""
    from pipeline.config import check_model_override_keys

    check_model_override_keys(overrides)
    data = Path(data)
    read_manifest(data)
    if not lengths or any(L < 1 for L in lengths):
        raise ValueError(f"--lengths must be positive integers; got {','.join(map(str, lengths)) or 'none'}")
    if max_samples < 0:
        raise ValueError(f"--max-samples must be 0 (all) or positive; got {max_samples}")
    target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    entries = [load_eval_model(run, overrides) for run in runs]
    for entry in entries:
        check_same_tokenizer(entry.data_folder, data, entry.name)
        check_lengths(entry, lengths)
    split_dir = data / split
    if not (split_dir / "index.json").is_file():
        raise ValueError(f"{data} has no '{split}' split")
    sizes = split_lengths(split_dir)
    chosen = {L: select_samples(sizes, L, max_samples) for L in lengths}
    for L, indices in chosen.items():
        if not indices:
            raise no_sample_error(data, split, L, max(sizes, default=0))
    results = []
    for entry in entries:
        entry.model.to(target).eval()
        results += [measure(entry, split_dir, chosen[L], L, batch_tokens) for L in lengths]
        entry.model.to("cpu")  # one model on the accelerator at a time
    return entries, results


# ------------------------------------------------------------------------------------------------ outputs


def write_csvs(out: Path, entries: Sequence[EvalModel], results: Sequence[LengthResult], data: Path, split: str,
               max_samples: int, band: int | None) -> tuple[Path, Path]:
    """length.csv and positions.csv, each headed by '#' comment lines stating the protocol."""
    out.mkdir(parents=True, exist_ok=True)
    widths = {e.name: band or e.train_len for e in entries}
    header = [f"# pope eval length, data {data}, split {split}, max samples {max_samples or 'all'}",
              f"# protocol: {PROTOCOL}"]
    length_csv, positions_csv = out / "length.csv", out / "positions.csv"
    with open(length_csv, "w", newline="") as handle:
        handle.write("\n".join(header) + "\n")
        writer = csv.writer(handle)
        writer.writerow(LENGTH_COLUMNS)
        for r in results:
            writer.writerow([r.run, r.position, r.scaling, r.step, r.length, r.samples, r.tokens, f"{r.nll:.6f}",
                             f"{r.ppl:.4f}"])
    with open(positions_csv, "w", newline="") as handle:
        shown = ", ".join(f"{name} {width}" for name, width in widths.items())
        source = "--band" if band else "each run's data.seq_len"
        handle.write("\n".join(header + [f"# band width ({source}): "
                                         f"{shown}; nll: mean over the band's targets (positions "
                                         "pos_start..pos_end-1)"]) + "\n")
        writer = csv.writer(handle)
        writer.writerow(POSITION_COLUMNS)
        for r in results:
            for start, end, tokens, nll in r.bands(widths[r.run]):
                writer.writerow([r.run, r.length, start, end, tokens, f"{nll:.6f}"])
    return length_csv, positions_csv


def read_csv(path: Path) -> list[dict[str, str]]:
    """Rows of a CSV written here, skipping its '#' comment lines."""
    with open(path) as handle:
        return list(csv.DictReader(line for line in handle if not line.startswith("#")))


def plot_figures(entries: Sequence[EvalModel], results: Sequence[LengthResult], band: int | None) -> dict[str, Any]:
    """Two matplotlib figures (Agg): ppl against L, one line per run, log-x (and log-y: extrapolation failures
    span orders of magnitude), training lengths dashed; and NLL per position band of each run's longest L."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures = {}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for entry in entries:
        own = sorted((r for r in results if r.run == entry.name), key=lambda r: r.length)
        line, = ax.plot([r.length for r in own], [r.ppl for r in own], marker="o",
                        label=f"{entry.name} ({_described(entry)})")
        ax.axvline(entry.train_len, color=line.get_color(), linestyle="--", linewidth=1)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("evaluation length L (tokens); dashed: training length")
    ax.set_ylabel("perplexity")
    ax.set_title("perplexity against context length")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    figures["ppl_vs_length"] = fig

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for entry in entries:
        longest = max((r for r in results if r.run == entry.name), key=lambda r: r.length)
        bands = longest.bands(band or entry.train_len)
        line, = ax.plot([(s + e) / 2 for s, e, _, _ in bands], [nll for *_, nll in bands], marker="o",
                        label=f"{entry.name} ({_described(entry)}), L={longest.length}")
        ax.axvline(entry.train_len, color=line.get_color(), linestyle="--", linewidth=1)
    ax.set_xlabel("position (band centre); dashed: training length")
    ax.set_ylabel("NLL per target (nats)")
    ax.set_title("loss per band of positions")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    figures["nll_per_position"] = fig
    return figures


def _described(entry: EvalModel) -> str:
    return entry.position if entry.scaling == "none" else f"{entry.position}, {entry.scaling}"


def save_figures(figures: dict[str, Any], out: Path) -> list[Path]:
    """Each figure as OUT/<name>.png."""
    paths = []
    for name, fig in figures.items():
        paths.append(out / f"{name}.png")
        fig.savefig(paths[-1], dpi=120)
    return paths


def log_tensorboard(entries: Sequence[EvalModel], results: Sequence[LengthResult], figures: dict[str, Any]) -> None:
    """Into each RUN/tb at the checkpoint's step: the figures (length_eval/...) and scalars per L. The step is the
    checkpoint's, not L: a resumed run purges events after its start step, which would drop steps L > start."""
    from torch.utils.tensorboard import SummaryWriter

    from pipeline.run import RunFolder

    for entry in entries:
        writer = SummaryWriter(log_dir=str(RunFolder(entry.folder).tb))  # an export folder gets a tb/ alike
        try:
            for r in (r for r in results if r.run == entry.name):
                writer.add_scalar(f"{entry.tag}/nll_L{r.length}", r.nll, entry.step)
                writer.add_scalar(f"{entry.tag}/ppl_L{r.length}", r.ppl, entry.step)
            for name, fig in figures.items():
                writer.add_figure(f"{entry.tag}/{name}", fig, entry.step, close=False)
        finally:
            writer.close()


def run_length_eval(runs: Sequence[str | Path], data: str | Path, lengths: Sequence[int], split: str = "val",
                    max_samples: int = 0, out: str | Path = "length_eval", band: int | None = None,
                    batch_tokens: int = DEFAULT_BATCH_TOKENS, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """`pope eval length`: measure, write length.csv, positions.csv and the PNGs to `out`, log to each RUN/tb."""
    if band is not None and band < 1:
        raise ValueError(f"--band must be a positive number of positions; got {band}")
    entries, results = evaluate_lengths(runs, data, lengths, split, max_samples, batch_tokens, overrides=overrides)
    out = Path(out)
    length_csv, positions_csv = write_csvs(out, entries, results, Path(data), split, max_samples, band)
    figures = plot_figures(entries, results, band)
    pngs = save_figures(figures, out)
    log_tensorboard(entries, results, figures)
    import matplotlib.pyplot as plt

    for fig in figures.values():
        plt.close(fig)
    return {"results": results, "files": [length_csv, positions_csv, *pngs]}
