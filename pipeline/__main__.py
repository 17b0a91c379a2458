"""``python -m pipeline {sync,stage,headline}``: the DVC pipeline's commands (``--help`` on each)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from reproduce.cli import run_reporting_errors


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--params", default="params.yaml", help="parameters file (default: params.yaml)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    sync = commands.add_parser("sync", help="write registry.yaml (what dvc.yaml iterates over) and params.yaml's "
                                            "method entries from the method registry; `make repro` runs it first")
    _common(sync)
    sync.add_argument("--only", default=None, help="comma-separated subset of methods (quick pipelines, tests)")
    sync.add_argument("--check", action="store_true", help="exit 1 if registry.yaml or params.yaml is out of date")

    stage = commands.add_parser("stage", help="the DVC stage of one method: every seed of pipeline.seeds into "
                                              "runs/<method>/, its study, its numbers and curves into dvclive/<method>/")
    _common(stage)
    stage.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a parameter, e.g. --set recipe.epochs=5 (repeatable)")
    stage.add_argument("--method", required=True, help="method name (python -m reproduce methods lists them)")
    stage.add_argument("--resume", choices=("auto", "always", "never"), default="auto")
    stage.add_argument("--no-track", action="store_true", help="local files only: no W&B, no MLflow")

    headline = commands.add_parser("headline", help="dvclive/metrics.json, the numbers `dvc exp show` lists, from "
                                                    "reports/summary.json (the experiment's changed methods first)")
    _common(headline)

    args = parser.parse_args(argv)
    from reproduce.numerics import pin_cpu_numerics

    pin_cpu_numerics()  # before torch loads: the same CPU numbers on every x86-64 machine (reproduce/numerics.py)
    return run_reporting_errors(COMMANDS[args.command], args)  # a UserError: one line, exit code 2


def run_sync(args: argparse.Namespace) -> int:
    from pipeline.sync import REGISTRY_FILE, method_lists, stale, sync

    only = args.only.split(",") if args.only else None
    if args.check:
        problems = stale(Path(args.params), REGISTRY_FILE, only)
        for problem in problems:
            print(f"out of date: {problem}; run `python -m pipeline sync`", file=sys.stderr)
        return 1 if problems else 0
    changed = sync(Path(args.params), REGISTRY_FILE, only)
    lists = method_lists(only)["registry"]
    print(f"{REGISTRY_FILE}: {len(lists['standalone'])} methods from scratch, {len(lists['distill'])} distilling "
          f"from the teacher, {len(lists['sweep'])} swept" + (f"; updated {', '.join(changed)}" if changed else ""))
    return 0


def run_stage(args: argparse.Namespace) -> int:
    from reproduce.config import load_config

    from pipeline.stage import run_stage as train_every_seed

    config = load_config(args.params, args.overrides)
    result = train_every_seed(config, args.method, resume=args.resume, track=not args.no_track)
    print(f"wrote runs/{args.method}/seed{{{','.join(map(str, result['seeds']))}}} and dvclive/{args.method}/")
    return 0


def run_headline(args: argparse.Namespace) -> int:
    from pipeline.headline import HEADLINE_FILE, write_headline

    numbers = write_headline(params_path=Path(args.params))
    print(f"wrote {HEADLINE_FILE}: {len(numbers)} methods, {', '.join(list(numbers)[:3])} first")
    return 0


COMMANDS = {"sync": run_sync, "stage": run_stage, "headline": run_headline}

if __name__ == "__main__":
    sys.exit(main())
