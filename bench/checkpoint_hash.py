"""What checksumming costs a checkpoint: DeepSpeed's save against hashing and verifying the same files.

    python bench/checkpoint_hash.py [--config paper/owt_124m_pope] [--zero 2] [--repeats 3]

One process (gloo), fp32: builds the config's model at the GPT-2 vocabulary, takes one AdamW step so the optimizer
holds its moments, then, `--repeats` times, saves a checkpoint through pipeline.checkpoint.Checkpointer (which
hashes every file with xxh3-128 and writes COMPLETE.json) and times its parts side by side: DeepSpeed's
`save_checkpoint` alone, the hashing of the written files, and the verification that a resume does
(`Checkpointer.damage`: sizes and checksums). Files are read back from the page cache, as right after a save; a
resume after a reboot reads them from disk and is bound by the disk instead.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from launch.local import free_port  # noqa: E402
from pipeline import distributed  # noqa: E402
from pipeline.checkpoint import Checkpointer, hash_file  # noqa: E402
from pipeline.config import load_config, model_identity  # noqa: E402
from pipeline.engine import build_engine  # noqa: E402
from pipeline.model import Transformer  # noqa: E402
from pipeline.state import RunIdentity, TrainState  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="paper/owt_124m_pope")
    parser.add_argument("--zero", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1")
    config = load_config(args.config, ["model.vocab_size=50257", "deepspeed.precision=fp32",
                                       f"deepspeed.zero_stage={args.zero}", "data.batch_size=1",
                                       "data.micro_batch_size=1", "launch.backend=gloo"])
    env = distributed.init("gloo")
    torch.manual_seed(0)
    model = Transformer(config.model)
    engine, _ = build_engine(model, config, env)
    inputs = torch.randint(0, config.model.vocab_size, (1, 64))
    _, loss = engine(inputs, inputs)
    engine.backward(loss)
    engine.step()
    print(f"{args.config}: {model.num_params():,} parameters, ZeRO-{args.zero}, fp32, 1 process", flush=True)
    save_s, hash_s, verify_s = [], [], []
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as tmp:
        identity = RunIdentity(model=model_identity(config.model), dataset="bench", world_size=1,
                               zero_stage=args.zero, windows_per_sample=1, init=None)
        checkpoints = Checkpointer(Path(tmp), env, keep_last=1, identity=identity)
        for step in range(1, args.repeats + 1):
            started = time.perf_counter()
            engine.save_checkpoint(tmp, tag=f"raw{step}", client_state={}, save_latest=False)
            save_s.append(time.perf_counter() - started)
            files = [p for p in (Path(tmp) / f"raw{step}").rglob("*") if p.is_file()]
            started = time.perf_counter()
            for file in files:
                hash_file(file)
            hash_s.append(time.perf_counter() - started)
            path = checkpoints.save(engine, TrainState(step))
            started = time.perf_counter()
            assert checkpoints.damage(step) is None
            verify_s.append(time.perf_counter() - started)
        size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    distributed.shutdown()
    save, hashing, verify = (statistics.median(x) for x in (save_s, hash_s, verify_s))
    print(f"checkpoint size       {size / 1e9:8.3f} GB")
    print(f"DeepSpeed save        {save:8.3f} s  (median of {args.repeats})")
    print(f"hash at save          {hashing:8.3f} s  ({size / hashing / 1e9:.2f} GB/s)  {hashing / save:.3f}× the save")
    print(f"verify before a load  {verify:8.3f} s  ({size / verify / 1e9:.2f} GB/s)")


if __name__ == "__main__":
    main()
