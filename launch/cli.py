"""The `pope` command. Thin on purpose: each subcommand parses its arguments and calls one function.

Errors a user can fix (a bad config key, a missing file, corrupt input) are printed as one line,
`pope: error: ...`, with exit status 2. Set POPE_DEBUG=1 to get the full traceback instead.
"""

from __future__ import annotations

import argparse
import os
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

    config = load_config(args.config, args.overrides)
    if config.launch.executor != "local":
        raise UsageError(f"launch.executor={config.launch.executor}: submit it with `pope submit`, or set "
                         "launch.executor=local to train on this machine")
    return launch_local(config, fresh=args.fresh)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pope", description="PoPE/RoPE transformer pretraining pipeline")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("config", help="print a resolved config and its parameter count")
    _add_config_args(p)
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("train", help="train or resume a run on this machine (launch.nproc processes)")
    _add_config_args(p)
    p.add_argument("--fresh", action="store_true", help="start over: drop the run's checkpoints and logs")
    p.set_defaults(func=cmd_train)

    from launch.prep_cli import add_prep_parser

    add_prep_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ConfigError, UsageError, FileNotFoundError, ValueError) as err:
        if os.environ.get("POPE_DEBUG"):
            raise
        print(f"pope: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pope: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
