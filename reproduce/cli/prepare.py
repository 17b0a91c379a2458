"""``python -m reproduce prepare``: the configured dataset into the prepared cache (data/prepared/<name>/)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from reproduce.cli import COMMANDS, Command, params_options


def add_arguments(parser: argparse.ArgumentParser) -> None:
    params_options(parser, "dataset.name=cifar100")
    parser.add_argument("--download", action="store_true", help="download the raw data where the network allows")
    parser.add_argument("--no-verify-md5", action="store_true", help="skip the md5 check of raw files")


def run(args: argparse.Namespace) -> int:
    from reproduce.config import load_config
    from reproduce.data.prepare import prepare

    config = load_config(args.params, args.overrides)
    data = config.dataset
    path = prepare(data.name, Path(data.raw_root), Path(data.prepared_root), val_fraction=data.val_fraction,
                   split_seed=data.split_seed, download=args.download or data.download,
                   verify_md5=data.verify_md5 and not args.no_verify_md5, progress=not config.runtime.quiet)
    manifest = json.loads((path / "manifest.json").read_text())
    print(f"prepared {data.name} at {path}: {manifest['counts']}")
    return 0


COMMANDS.register(Command("prepare", "materialise the configured dataset into the prepared cache", add_arguments, run))
