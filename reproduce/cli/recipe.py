"""``python -m reproduce recipe FILE``: a paper's recipe (configs/papers/*.yaml) end to end: prepare the
data, train the teacher if an offline method needs one, then every method x seed.

Runs land in runs-papers/<recipe>/ (analyse them with `python -m analysis --runs runs-papers/<recipe>`);
rerunning the command resumes unfinished runs and skips finished ones."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from reproduce.cli import COMMANDS, Command, params_options
from reproduce.errors import ConfigError

RECIPES = Path("configs/papers")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    params_options(parser)
    parser.add_argument("recipe", type=Path, help="e.g. configs/papers/switokd_cifar100.yaml")
    parser.add_argument("--download", action="store_true",
                        help="download the raw data and the recipe's released teacher where the network allows")
    parser.add_argument("--dry-run", action="store_true", help="validate and list the runs without training")
    parser.add_argument("--no-track", action="store_true", help="local files only: no W&B, no MLflow")


def run(args: argparse.Namespace) -> int:
    from reproduce.config import load_config, read_yaml
    from reproduce.methods import get_method

    if not args.recipe.is_file():
        known = sorted(str(path) for path in RECIPES.glob("*.yaml"))
        raise ConfigError(f"{args.recipe}: no such recipe; " + (f"available: {', '.join(known)}" if known else
                          f"{RECIPES}/ is not here: run from the project root"))
    overlay = read_yaml(args.recipe, "recipe") or {}
    if not isinstance(overlay, dict):
        raise ConfigError(f"{args.recipe}: expected a mapping of sections (dataset:, models:, recipe: ...)")
    runs_root, checkpoints_root = Path("runs-papers") / args.recipe.stem, Path("checkpoints/papers") / args.recipe.stem
    overlay.setdefault("teacher", {})["runs_root"] = str(runs_root / "teacher")
    overlay.setdefault("tracking", {})["group"] = f"paper-{args.recipe.stem}"
    config = load_config(args.params, args.overrides, extra=overlay)
    methods = list(config.pipeline.methods)  # registered names, checked at load
    if not methods:
        raise ConfigError(f"{args.recipe}: pipeline.methods is empty; list the methods the recipe runs")
    offline = any(get_method(name).kind.value == "offline" for name in methods)
    if offline and "teacher" not in methods and not config.teacher.checkpoint:  # a released teacher needs no run
        methods.insert(0, "teacher")
    protocol = ("the papers' protocol: the whole training set, best epoch on test" if config.dataset.val_fraction == 0
                else f"{config.dataset.val_fraction:.0%} of the training set held out, best epoch on validation")
    print(f"{args.recipe}: {config.dataset.name}, {config.models.teacher} -> {config.models.student}, "
          f"{config.recipe.epochs} epochs, seeds {config.pipeline.seeds}, {protocol}; methods: {', '.join(methods)}")
    runs = [(name, seed) for name in methods for seed in config.pipeline.seeds]
    if args.dry_run:
        for name, seed in runs:
            print(f"  {name:8s} seed {seed} -> {runs_root / name / f'seed{seed}'}")
        return 0
    from reproduce.data.prepare import prepare
    from reproduce.train import RunSpec, train

    if offline and config.teacher.checkpoint:  # fetched (--download) or a clear error before any data work
        from reproduce.models.catalog import ensure_teacher

        ensure_teacher(config.teacher.checkpoint, download=args.download)

    data = config.dataset
    manifest = data.prepared_dir / "manifest.json"
    if not manifest.exists() or json.loads(manifest.read_text()).get("val_fraction") != data.val_fraction:
        prepare(data.name, Path(data.raw_root), Path(data.prepared_root), val_fraction=data.val_fraction,
                split_seed=data.split_seed, download=args.download or data.download, verify_md5=data.verify_md5)
    for name, seed in runs:  # the teacher first: the offline methods distil from it
        spec = RunSpec.default(name, seed, runs_root=str(runs_root), checkpoints_root=str(checkpoints_root))
        summary = train(config, spec, track=not args.no_track)
        primary = summary["primary"]
        print(f"[{name}] seed {seed}: {primary} test top-1 {summary['last']['test'][primary]['top1']:.2f} at the "
              f"last epoch -> {spec.run_dir}", flush=True)
    print(f"done: python -m analysis --runs {runs_root} --out reports/papers/{args.recipe.stem}")
    return 0


COMMANDS.register(Command("recipe", "run a paper's recipe end to end (configs/papers/*.yaml)", add_arguments, run,
                          description=__doc__))
