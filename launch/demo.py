"""`pope demo`: what PoPE is for, on a laptop-class CPU in a few minutes — length extrapolation.

1. prepares the Bach chorales bundled with music21 twice with the same tokenizer: whole pieces (one sample a
   chorale, up to 2,048 tokens: the long held-out windows) and short windows of data.seq_len tokens (training and
   the in-distribution validation NLL); both skipped when present,
2. trains a small PoPE model and its RoPE twin on the short windows, each with 2 processes (gloo, ZeRO-2, fp32) —
   re-running resumes or reuses them,
3. states their in-distribution validation NLL, then runs `pope eval length` (pipeline/length_eval.py) on the
   held-out whole chorales at 1×, 2×, 4× and 8× the training length and prints the table, the figure and a closing
   sentence computed from the measured numbers.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

from data_prep.parallel import PrepOptions
from launch.local import launch_local
from pipeline.config import Config, load_config
from pipeline.run import RunFolder

DEMO_CONFIGS = ("demo/jsb_pope", "demo/jsb_rope")
MULTIPLES = (1, 2, 4, 8)  # evaluation lengths, in units of the training length
WHOLE_SEQ_LEN = 2047  # whole chorales: a sample holds 2,048 tokens, more than the longest held-out piece (1,888)


def prepare(data_dir: Path, seq_len: int) -> tuple[Path, Path]:
    """(whole-piece folder, training-window folder): music21's chorales → JSB raster order, vocab 90. The second
    prep reads the chorale JSON the first one built, so both hold the same pieces in the same splits."""
    from data_prep.jsb import prep_jsb
    from data_prep.music21_chorales import cache_path

    whole, short = data_dir / "jsb-whole", data_dir / f"jsb-{seq_len}"
    if prep_jsb(None, whole, from_music21=True, seq_len=WHOLE_SEQ_LEN, options=PrepOptions()) is None:
        print(f"   {whole}: already prepared")
    if prep_jsb(cache_path(whole), short, from_music21=False, seq_len=seq_len, options=PrepOptions()) is None:
        print(f"   {short}: already prepared")
    return whole, short


def change(before: float, after: float) -> str:
    """'rose by 0.123 nats (0.80 → 0.92)' or 'fell by ...': the sign in words."""
    verb = "rose" if after >= before else "fell"
    return f"{verb} by {abs(after - before):.3f} nats ({before:.3f} → {after:.3f})"


def summary(seq_len: int, val: dict[str, float], lengths: Sequence[int],
            nll: dict[str, dict[int, float]]) -> list[str]:
    """The closing sentences, computed from the measurements (never a scripted claim)."""
    first, last = lengths[0], lengths[-1]
    pope, rope = change(nll["pope"][first], nll["pope"][last]), change(nll["rope"][first], nll["rope"][last])
    lines = [f"From {first // seq_len}× (L={first}) to {last // seq_len}× (L={last}): PoPE's NLL {pope}, "
             f"RoPE's {rope}."]
    at_last = nll["pope"][last] - nll["rope"][last]
    lines.append(f"At {last // seq_len}× the training length PoPE's NLL is {abs(at_last):.3f} nats "
                 f"{'lower' if at_last < 0 else 'higher'} than RoPE's.")
    gap = val["pope"] - val["rope"]
    lines.append(f"In distribution (every {seq_len}-token window of the validation chorales) "
                 f"{'PoPE' if gap < 0 else 'RoPE'} is better by {abs(gap):.3f} nats "
                 f"(PoPE {val['pope']:.4f}, RoPE {val['rope']:.4f}).")
    return lines


def run_demo(data_dir: Path, run_dir: Path, steps: int | None = None, fresh: bool = False) -> int:
    from pipeline.evaluate import evaluate_run
    from pipeline.length_eval import run_length_eval

    overrides = [f"run_dir={run_dir}"]
    if steps is not None:
        overrides += [f"schedule.max_steps={steps}", f"checkpoint.every={steps}", f"eval.every={steps}",
                      f"schedule.warmup_steps={min(20, steps)}"]
    configs: list[Config] = [load_config(name, overrides) for name in DEMO_CONFIGS]
    seq_len = configs[0].data.seq_len
    print(f"== 1/4  Bach chorales from music21 → {data_dir} (JSB raster order, vocab 90): whole pieces for the "
          f"long evaluation, {seq_len}-token windows for training", flush=True)
    whole, short = prepare(data_dir, seq_len)

    runs: dict[str, Path] = {}
    val: dict[str, float] = {}
    for index, config in enumerate(configs, start=2):
        config.data.path = str(short)
        print(f"\n== {index}/4  training {config.name}: {config.model.position}, {config.model.d_model} wide, "
              f"{config.model.n_layers} layers, {seq_len}-token windows, {config.schedule.max_steps} steps, "
              "2 processes on CPU", flush=True)
        started = time.monotonic()
        code = launch_local(config, fresh=fresh)
        if code != 0:
            print(f"pope demo: training {config.name} failed (exit {code})")
            return code
        runs[config.model.position] = RunFolder.of(config).path
        val[config.model.position] = evaluate_run(str(runs[config.model.position]))["val/loss"]
        print(f"   {config.name}: {time.monotonic() - started:.0f} s; validation NLL "
              f"{val[config.model.position]:.4f}", flush=True)

    lengths = [seq_len * m for m in MULTIPLES]
    out = run_dir / "length_eval"
    print(f"\n== 4/4  pope eval length {runs['pope']} {runs['rope']} --data {whole} "
          f"--lengths {','.join(map(str, lengths))} --out {out}", flush=True)
    report = run_length_eval([runs["pope"], runs["rope"]], whole, lengths, split="val", out=out)
    nll: dict[str, dict[int, float]] = {"pope": {}, "rope": {}}
    samples: dict[int, int] = {}
    for r in report["results"]:
        nll[r.position][r.length] = r.nll
        samples[r.length] = r.samples
    print_table(seq_len, lengths, samples, nll, val)
    print("\n" + "\n".join(summary(seq_len, val, lengths, nll)))
    pngs = [str(p) for p in report["files"] if p.suffix == ".png"]
    print(f"\nFigure: {pngs[0]}  (perplexity against L; loss per band of positions: {pngs[1]})")
    print(f"Numbers: {out / 'length.csv'}, {out / 'positions.csv'}")
    print(f"TensorBoard:  pope tb {run_dir}    (then open the printed http://127.0.0.1:PORT/ address)")
    print(f"Checkpoints, logs and metrics.jsonl: {run_dir}/<run>/ ; the same command again resumes or reuses them.")
    return 0


def print_table(seq_len: int, lengths: Sequence[int], samples: dict[int, int], nll: dict[str, dict[int, float]],
                val: dict[str, float]) -> None:
    """In-distribution NLL, then NLL against evaluation length (nats per token; lower is better)."""
    print(f"\nin distribution: validation NLL over every {seq_len}-token window of the held-out chorales")
    print(f"{'':<12}{'PoPE':>10}{'RoPE':>10}")
    print(f"{'val NLL':<12}{val['pope']:>10.4f}{val['rope']:>10.4f}")
    print(f"\nlength extrapolation: the first L+1 tokens of every held-out chorale that long, all L targets scored "
          f"(trained on {seq_len})")
    print(f"{'L':>6}{'× train':>9}{'chorales':>10}{'PoPE NLL':>11}{'RoPE NLL':>11}")
    for L in lengths:
        print(f"{L:>6}{L // seq_len:>8}×{samples[L]:>10}{nll['pope'][L]:>11.4f}{nll['rope'][L]:>11.4f}")
