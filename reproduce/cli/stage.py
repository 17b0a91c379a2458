"""``python -m reproduce stage --method M``: the DVC stage of one method (moving to ``python -m pipeline stage``)."""

from __future__ import annotations

import argparse

from reproduce.cli import COMMANDS, Command, params_options


def add_arguments(parser: argparse.ArgumentParser) -> None:
    params_options(parser)
    parser.add_argument("--method", required=True, help="method name (python -m reproduce methods lists them)")
    parser.add_argument("--resume", choices=("auto", "always", "never"), default="auto")
    parser.add_argument("--no-track", action="store_true", help="local files only: no W&B, no MLflow")


def run(args: argparse.Namespace) -> int:
    from reproduce.config import load_config
    from reproduce.pipeline import run_stage

    config = load_config(args.params, args.overrides)
    result = run_stage(config, args.method, resume=args.resume, track=not args.no_track)
    print(f"wrote runs/{args.method}/seed{{{','.join(map(str, result['seeds']))}}} and dvclive/{args.method}/")
    return 0


COMMANDS.register(Command("stage", "the DVC stage of one method: every seed of pipeline.seeds into runs/<method>/, "
                                   "headline metrics and curves into dvclive/<method>/", add_arguments, run))
