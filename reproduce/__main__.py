"""Command line: ``python -m reproduce {prepare,train,methods}``; ``--help`` on each."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

from reproduce.config import ConfigError, load_config
from reproduce.tracking import start_tracking_service


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--params", default="params.yaml", help="parameters file (default: params.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a parameter, e.g. --set recipe.epochs=5 (repeatable)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reproduce", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    prepare = commands.add_parser("prepare", help="materialise the configured dataset into the prepared cache")
    _common(prepare)
    prepare.add_argument("--download", action="store_true", help="download the raw data where the network allows")
    prepare.add_argument("--no-verify-md5", action="store_true", help="skip the md5 check of raw files")

    train = commands.add_parser("train", help="train one method with one seed")
    _common(train)
    train.add_argument("--method", required=True, help="method name (python -m reproduce methods lists them)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--network", choices=("student", "teacher"), default=None,
                       help="vanilla only: which architecture to train (teacher = the train_teacher stage)")
    train.add_argument("--params-from", type=Path, default=None,
                       help="YAML overlay merged into the parameters, e.g. sweeps/results/bdkd/best_params.yaml")
    train.add_argument("--out", type=Path, default=None, help="run directory (default: runs/<method>/seed<k>)")
    train.add_argument("--resume", choices=("auto", "always", "never"), default="auto",
                       help="auto: continue a checkpoint written by the same configuration (default)")
    train.add_argument("--stop-after-epoch", type=int, default=None,
                       help="exit after this epoch (pre-emptible jobs); rerun to resume")
    train.add_argument("--no-track", action="store_true", help="local files only: no W&B, no MLflow")

    recipe = commands.add_parser("recipe", help="run a paper's recipe end to end (configs/papers/*.yaml)")
    _common(recipe)
    recipe.add_argument("recipe", type=Path, help="e.g. configs/papers/switokd_cifar100.yaml")
    recipe.add_argument("--download", action="store_true", help="download the raw data where the network allows")
    recipe.add_argument("--dry-run", action="store_true", help="validate and list the runs without training")

    commands.add_parser("methods", help="list the methods and their default parameters")

    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (ConfigError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


def run_prepare(args: argparse.Namespace) -> int:
    from reproduce.data.prepare import prepare

    config = load_config(args.params, args.overrides)
    data = config.dataset
    path = prepare(data.name, Path(data.raw_root), Path(data.prepared_root), val_fraction=data.val_fraction,
                   split_seed=data.split_seed, download=args.download or data.download,
                   verify_md5=data.verify_md5 and not args.no_verify_md5, progress=not config.runtime.quiet)
    manifest = json.loads((path / "manifest.json").read_text())
    print(f"prepared {data.name} at {path}: {manifest['counts']}")
    return 0


def run_train(args: argparse.Namespace) -> int:
    overrides = list(args.overrides)
    if args.network:
        if args.method != "vanilla":
            raise ConfigError("--network applies to --method vanilla only")
        overrides.append(f"methods.vanilla.network={args.network}")
    extra = yaml.safe_load(args.params_from.read_text()) if args.params_from else None
    if args.params_from and not isinstance(extra, dict):
        raise ConfigError(f"{args.params_from}: expected a mapping like {{methods: {{{args.method}: {{...}}}}}}")
    config = load_config(args.params, overrides, extra=extra)
    if not args.no_track:
        start_tracking_service(config.tracking)

    from reproduce.engine import RunSpec, train  # imports torch: seconds that the tracking service overlaps

    label = "teacher" if args.network == "teacher" else args.method
    spec = RunSpec.default(args.method, args.seed, label)
    if args.out:
        spec = RunSpec(args.method, args.seed, args.out, Path("checkpoints") / args.out)
    summary = train(config, spec, resume=args.resume, stop_after_epoch=args.stop_after_epoch, track=not args.no_track)
    if "stopped_after_epoch" in summary:
        print(f"stopped after epoch {summary['stopped_after_epoch']}; rerun the same command to resume")
    else:
        print(f"wrote {spec.run_dir}/metrics.json")
    return 0


def run_recipe(args: argparse.Namespace) -> int:
    """Prepare the data, train the teacher if an offline method needs one, then every method x seed.

    Runs land in runs/papers/<recipe>/ (analyse them with `python -m analysis --runs runs/papers/<recipe>`);
    rerunning the command resumes unfinished runs and skips finished ones."""
    from reproduce.data.prepare import prepare
    from reproduce.engine import RunSpec, train
    from reproduce.methods import get_method

    if not args.recipe.exists():
        raise FileNotFoundError(f"{args.recipe}: no such recipe; available: "
                                f"{', '.join(sorted(str(p) for p in Path('configs/papers').glob('*.yaml')))}")
    overlay = yaml.safe_load(args.recipe.read_text()) or {}
    runs_root, checkpoints_root = Path("runs/papers") / args.recipe.stem, Path("checkpoints/papers") / args.recipe.stem
    overlay.setdefault("teacher", {})["runs_root"] = str(runs_root / "teacher")
    overlay.setdefault("tracking", {})["group"] = f"paper-{args.recipe.stem}"
    config = load_config(args.params, args.overrides, extra=overlay)
    seeds = config.pipeline.get("seeds", [0])
    methods = list(config.pipeline.get("standalone", [])) + list(config.pipeline.get("distill", []))
    for name in methods:
        get_method(name).parse_params(config.methods.get(name))
    runs = [RunSpec("vanilla", seed, runs_root / "teacher" / f"seed{seed}", checkpoints_root / "teacher" / f"seed{seed}")
            for seed in seeds if config.pipeline.get("distill")]
    runs += [RunSpec.default(name, seed, runs_root=str(runs_root), checkpoints_root=str(checkpoints_root))
             for name in methods for seed in seeds]
    print(f"{args.recipe}: {config.dataset.name}, {config.models.teacher} -> {config.models.student}, "
          f"{config.recipe.epochs} epochs, {len(runs)} runs")
    if args.dry_run:
        for spec in runs:
            print(f"  {spec.method:8s} seed {spec.seed} -> {spec.run_dir}")
        return 0
    data = config.dataset
    if not data.prepared_dir.exists():
        prepare(data.name, Path(data.raw_root), Path(data.prepared_root), val_fraction=data.val_fraction,
                split_seed=data.split_seed, download=args.download or data.download, verify_md5=data.verify_md5)
    for spec in runs:
        if (spec.run_dir / "metrics.json").exists():
            print(f"  {spec.run_dir}: done")
            continue
        network = ["methods.vanilla.network=teacher"] if spec.run_dir.parent.name == "teacher" else []
        train(load_config(args.params, args.overrides + network, extra=overlay), spec)
    print(f"done: python -m analysis --runs {runs_root}")
    return 0


def run_methods(args: argparse.Namespace) -> int:
    from reproduce.methods import METHODS

    for name, cls in sorted(METHODS.items()):
        kind = "online" if cls.online else ("offline" if cls.uses_pretrained_teacher else "standalone")
        print(f"{name:10s} {kind:10s} {cls.default_params()}")
    return 0


COMMANDS = {"prepare": run_prepare, "train": run_train, "recipe": run_recipe, "methods": run_methods}

if __name__ == "__main__":
    sys.exit(main())
