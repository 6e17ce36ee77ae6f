"""The GPU path in one command: kernel tests, attention and training-step benchmarks, a killed-and-resumed bf16
ZeRO-2 run; one summary table at the end.

    python bench/gpu_check.py [--out DIR] [--skip tests,attention,train_step,resume]

On a machine with CUDA (target: one GPU, under 8 minutes):
1. tests/test_pope_kernel.py natively on the GPU: full-size shapes (batch 2, 12 heads, L 1000/1024, head_dim
   32/64/128) in fp32, fp16 and bf16 against the float64 reference.
2. bench/attention.py --device cuda --dtype bf16: PoPE reference, PoPE fused, RoPE (flash) at L = 1K, 2K, 4K.
3. bench/train_step.py --sizes 124m --dtype bf16, micro-batch 16: PoPE (attention_impl auto, i.e. fused) and
   RoPE step time and MFU; then PoPE with attention_impl=sdpa for comparison.
4. `pope train` of a tiny model, bf16, ZeRO-2, NCCL, 2 processes (1 where the machine has one GPU, said in the
   table), straight to step 12 and killed after step 6 then resumed; the losses of the two are compared.
Each stage's full output is kept in DIR (default: a temporary folder, printed). Exit status 1 if any stage failed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def run(cmd: list[str], log: Path, timeout: float, env: dict | None = None) -> tuple[int, str, float]:
    """Run cmd from the repository root; (exit status, output, seconds). Output also goes to `log`."""
    start = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})
        code, out = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as err:
        code, out = 124, f"{err.stdout or ''}{err.stderr or ''}\nTIMEOUT after {timeout:.0f} s"
        out = out if isinstance(out, str) else out.decode(errors="replace")
    log.write_text(out)
    return code, out, time.monotonic() - start


def stage_tests(out: Path) -> tuple[str, str]:
    cmd = [sys.executable, "-m", "pytest", "tests/test_pope_kernel.py", "-q", "-p", "no:cacheprovider"]
    code, text, secs = run(cmd, out / "tests.log", 300)
    summary = re.findall(r"\d+ (?:passed|failed|skipped|error)", text)
    return ("ok" if code == 0 else f"FAILED ({code})"), f"{', '.join(summary) or 'no summary'}; {secs:.0f} s"


def stage_attention(out: Path) -> tuple[str, str]:
    cmd = [sys.executable, "bench/attention.py", "--device", "cuda", "--dtype", "bf16", "--reps", "10"]
    code, text, secs = run(cmd, out / "attention.log", 240)
    rows = [line.split() for line in text.splitlines() if re.match(r"\s*\d+\s+\d", line)]
    # columns: L, 3 times, 3 MiB, pope_sdpa/rope t, pope_fused/rope t, pope_sdpa/rope mem, pope_fused/rope mem
    detail = "; ".join(f"L={r[0]}: fused/RoPE time {r[8]}, mem {r[10]}" for r in rows if len(r) >= 11)
    return ("ok" if code == 0 and rows else f"FAILED ({code})"), f"{detail or 'no rows'}; {secs:.0f} s"


def stage_train_step(out: Path) -> tuple[str, str]:
    details, status = [], "ok"
    for impl in ("auto", "sdpa"):
        code, text, secs = run([sys.executable, "bench/train_step.py", "--sizes", "124m", "--device", "cuda",
                                "--dtype", "bf16", "--micro-batch", "16", "--steps", "10", "--attention-impl", impl],
                               out / f"train_step_{impl}.log", 240)
        row = next((line.split() for line in text.splitlines() if line.startswith("124m")), None)
        if code or row is None:
            status = f"FAILED ({code})"
            continue
        # 124m, B, x, T, PoPE s, RoPE s, PoPE tok/s, RoPE tok/s, ratio[, PoPE MFU, RoPE MFU]
        mfu = f", MFU PoPE {row[9]} RoPE {row[10]}" if len(row) >= 11 else ", MFU n/a (unknown GPU peak)"
        details.append(f"PoPE[{impl}]/RoPE {row[8]}, PoPE {row[6]} tok/s{mfu}")
    return status, "; ".join(details)


def stage_resume(out: Path) -> tuple[str, str]:
    import torch
    from conftest import kill_after_step, metrics, synthetic_documents, tiny_train_args
    from data_prep.parallel import PrepOptions
    from data_prep.text import prep_text

    nproc = min(2, torch.cuda.device_count())
    root = out / "resume"
    root.mkdir(exist_ok=True)
    (root / "docs.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in synthetic_documents(300, 0)))
    prep_text([root / "docs.jsonl"], root / "data", vocab_size=320, val_fraction=0.1, seq_len=32,
              options=PrepOptions(workers=1, progress=False))
    common = ["deepspeed.precision=bf16", "deepspeed.zero_stage=2", f"launch.nproc={nproc}", "launch.backend=nccl",
              "schedule.max_steps=12", "checkpoint.every=4", "eval.every=6", "logging.log_every=1",
              "model.d_model=64", "model.n_heads=4"]  # head_dim 16: the fused kernel applies
    straight = tiny_train_args(root / "data", root, "straight", *common)
    code, text, _ = run([sys.executable, "-m", "launch.cli", *straight], out / "resume_straight.log", 240)
    if code:
        return f"FAILED ({code})", f"straight run: see {out / 'resume_straight.log'}"
    killed = tiny_train_args(root / "data", root, "killed", *common)
    kill_after_step(killed, root / "killed", 6)
    code, text, _ = run([sys.executable, "-m", "launch.cli", *killed], out / "resume_killed.log", 240)
    if code or "resumed from step" not in text:
        return f"FAILED ({code})", f"resume: see {out / 'resume_killed.log'}"

    def losses(name: str) -> dict[int, float]:
        return {m["step"]: m["train/loss"] for m in metrics(root / name) if "train/loss" in m}

    a, b = losses("straight"), losses("killed")
    gap = max((abs(a[s] - b[s]) for s in a if s in b), default=float("nan"))
    where = "2 processes, NCCL" if nproc == 2 else "1 process (this machine has one GPU)"
    ok = sorted(a) == list(range(1, 13)) and sorted(b) == sorted(a)
    return ("ok" if ok else "FAILED"), f"{where}; steps 1-12 both; max |loss gap| straight vs resumed {gap:.2e}"


STAGES = {"tests": stage_tests, "attention": stage_attention, "train_step": stage_train_step, "resume": stage_resume}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="", help="folder for the logs (default: a new temporary one)")
    parser.add_argument("--skip", default="", help=f"comma-separated stages to skip: {','.join(STAGES)}")
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; this script checks the GPU path (on CPU run tests/test_pope_kernel.py "
              "and bench/attention.py directly)")
        return 2
    os.environ["PYTHONPATH"] = str(ROOT)  # every process started here, also by conftest.kill_after_step, runs this tree
    out = Path(args.out or tempfile.mkdtemp(prefix="gpu_check_"))
    out.mkdir(parents=True, exist_ok=True)
    skip = {s for s in args.skip.split(",") if s}
    unknown = skip - set(STAGES)
    if unknown:
        print(f"gpu_check: unknown stage(s) {', '.join(sorted(unknown))}; stages: {', '.join(STAGES)}")
        return 2
    print(f"gpu_check: {torch.cuda.device_count()} x {torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"logs in {out}", flush=True)
    results, start = {}, time.monotonic()
    for name, stage in STAGES.items():
        if name in skip:
            results[name] = ("skipped", "")
            continue
        t0 = time.monotonic()
        try:
            results[name] = stage(out)
        except Exception as err:  # a stage's failure must not hide the others' results
            results[name] = (f"FAILED ({type(err).__name__})", " ".join(str(err).split())[:200])
        print(f"  {name}: {results[name][0]} ({time.monotonic() - t0:.0f} s)", flush=True)
    print(f"\n{'stage':<12}{'result':<14}details   (total {time.monotonic() - start:.0f} s)")
    for name, (status, detail) in results.items():
        print(f"{name:<12}{status:<14}{detail}")
    return 0 if all(s in ("ok", "skipped") for s, _ in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
