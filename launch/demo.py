"""`pope demo`: the whole product on a laptop-class CPU in a few minutes.

1. prepares the Bach chorales bundled with music21 into JSB-style shards (once; skipped when present),
2. trains a small PoPE model and its RoPE twin, each with 2 processes (gloo, ZeRO-2, fp32) — re-running resumes,
3. evaluates both on the validation split and prints the table, then how to open TensorBoard.
"""

from __future__ import annotations

import time
from pathlib import Path

from data_prep.parallel import PrepOptions
from launch.local import launch_local
from pipeline.config import load_config

DEMO_CONFIGS = ("demo/jsb_pope", "demo/jsb_rope")


def run_demo(data_dir: Path, run_dir: Path, steps: int | None = None, fresh: bool = False) -> int:
    from data_prep.music import prep_jsb
    from pipeline.evaluate import evaluate_run

    overrides = [f"data.path={data_dir / 'jsb'}", f"run_dir={run_dir}"]
    if steps is not None:
        overrides += [f"schedule.max_steps={steps}", f"checkpoint.every={steps}", f"eval.every={steps}",
                      f"schedule.warmup_steps={min(20, steps)}"]
    configs = [load_config(name, overrides) for name in DEMO_CONFIGS]

    print(f"== 1/3  Bach chorales from music21 → {data_dir / 'jsb'} (JSB raster order, vocab 90)", flush=True)
    prepared = prep_jsb(None, data_dir / "jsb", from_music21=True, seq_len=configs[0].data.seq_len,
                        options=PrepOptions())
    if prepared is None:
        print("   already prepared")

    results = {}
    for index, config in enumerate(configs, start=2):
        print(f"\n== {index}/3  training {config.name}: {config.model.position}, {config.model.d_model} wide, "
              f"{config.model.n_layers} layers, {config.schedule.max_steps} steps, 2 processes on CPU", flush=True)
        started = time.monotonic()
        code = launch_local(config, fresh=fresh)
        if code != 0:
            print(f"pope demo: training {config.name} failed (exit {code})")
            return code
        run = Path(config.run_dir) / config.name
        results[config.model.position] = (evaluate_run(str(run)), time.monotonic() - started)

    print("\nvalidation NLL on held-out chorales (nats per token; lower is better)")
    print(f"{'position':<10}{'val NLL':>10}{'val ppl':>10}{'steps':>8}{'time':>9}")
    for position, (result, seconds) in results.items():
        print(f"{position:<10}{result['val/loss']:>10.4f}{result['val/ppl']:>10.3f}{result['step']:>8}"
              f"{seconds:>8.0f}s")
    print(f"\nTensorBoard:  pope tb {run_dir}    (then open the printed http://127.0.0.1:PORT/ address)")
    print(f"Checkpoints, logs and metrics.jsonl: {run_dir}/<run>/ ; the same command again resumes or reuses them.")
    return 0
