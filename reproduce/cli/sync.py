"""``python -m reproduce pipeline``: registry.yaml from the method registry (moving to ``python -m pipeline sync``)."""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from reproduce.cli import COMMANDS, Command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--only", default=None, help="comma-separated subset of methods (quick pipelines, tests)")
    parser.add_argument("--check", action="store_true", help="exit 1 if registry.yaml or params.yaml is out of date")


def run(args: argparse.Namespace) -> int:
    from reproduce.pipeline import REGISTRY_FILE, method_lists, sync

    only = args.only.split(",") if args.only else None
    if args.check:
        with tempfile.TemporaryDirectory() as scratch:
            copy = Path(scratch) / "params.yaml"
            copy.write_text(Path(args.params).read_text())
            stale = sync(copy, Path(scratch) / "registry.yaml", only)
            current = REGISTRY_FILE.exists() and REGISTRY_FILE.read_text() == (Path(scratch) / "registry.yaml").read_text()
        problems = ([] if current else [f"{REGISTRY_FILE} differs from the registry"]) + \
            [item for item in stale if item.startswith(str(args.params))]
        for problem in problems:
            print(f"out of date: {problem}; run `python -m reproduce pipeline`", file=sys.stderr)
        return 1 if problems else 0
    changed = sync(Path(args.params), REGISTRY_FILE, only)
    lists = method_lists(only)["registry"]
    print(f"{REGISTRY_FILE}: {len(lists['standalone'])} methods from scratch, {len(lists['distill'])} distilling "
          f"from the teacher, {len(lists['sweep'])} swept" + (f"; updated {', '.join(changed)}" if changed else ""))
    return 0


COMMANDS.register(Command("pipeline", "write registry.yaml (what dvc.yaml iterates over) from the method registry; "
                                      "`make repro` runs it before `dvc repro`", add_arguments, run))
