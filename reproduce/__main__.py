"""Command line: ``python -m reproduce {prepare,train,stage,pipeline,recipe,methods}``; ``--help`` on each."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

from reproduce.config import ConfigError, load_config


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

    train = commands.add_parser("train", help="train one method with one seed (an ad-hoc run, kept apart from "
                                              "the pipeline's runs: runs-adhoc/<method>/seed<k>)")
    _common(train)
    train.add_argument("--method", required=True, help="method name (python -m reproduce methods lists them)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--params-from", type=Path, default=None,
                       help="YAML overlay merged into the parameters, e.g. sweeps/results/bdkd/best_params.yaml")
    train.add_argument("--out", type=Path, default=None, help="run directory (default: runs-adhoc/<method>/seed<k>)")
    _resume_options(train)

    stage = commands.add_parser("stage", help="the DVC stage of one method: every seed of pipeline.seeds into "
                                              "runs/<method>/, headline metrics and curves into dvclive/<method>/")
    _common(stage)
    stage.add_argument("--method", required=True)
    stage.add_argument("--resume", choices=("auto", "always", "never"), default="auto")
    stage.add_argument("--no-track", action="store_true", help="local files only: no W&B, no MLflow")

    pipeline = commands.add_parser("pipeline", help="write registry.yaml (what dvc.yaml iterates over) from the "
                                                    "method registry; `make repro` runs it before `dvc repro`")
    pipeline.add_argument("--params", default="params.yaml")
    pipeline.add_argument("--only", default=None, help="comma-separated subset of methods (quick pipelines, tests)")
    pipeline.add_argument("--check", action="store_true", help="exit 1 if registry.yaml or params.yaml is out of date")

    recipe = commands.add_parser("recipe", help="run a paper's recipe end to end (configs/papers/*.yaml)")
    _common(recipe)
    recipe.add_argument("recipe", type=Path, help="e.g. configs/papers/switokd_cifar100.yaml")
    recipe.add_argument("--download", action="store_true", help="download the raw data where the network allows")
    recipe.add_argument("--dry-run", action="store_true", help="validate and list the runs without training")
    recipe.add_argument("--no-track", action="store_true", help="local files only: no W&B, no MLflow")

    commands.add_parser("methods", help="list the methods, their kind, search space and default parameters")

    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (ConfigError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


def _resume_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--resume", choices=("auto", "always", "never"), default="auto",
                        help="auto: continue a checkpoint written by the same configuration (default)")
    parser.add_argument("--stop-after-epoch", type=int, default=None,
                        help="exit after this epoch (pre-emptible jobs); rerun to resume")
    parser.add_argument("--no-track", action="store_true", help="local files only: no W&B, no MLflow")


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
    extra = yaml.safe_load(args.params_from.read_text()) if args.params_from else None
    if args.params_from and not isinstance(extra, dict):
        raise ConfigError(f"{args.params_from}: expected a mapping like {{methods: {{{args.method}: {{...}}}}}}")
    config = load_config(args.params, args.overrides, extra=extra)
    from reproduce.train import RunSpec, train

    spec = RunSpec.default(args.method, args.seed, runs_root="runs-adhoc", checkpoints_root="checkpoints/adhoc")
    if args.out:
        spec = RunSpec(args.method, args.seed, args.out, Path("checkpoints") / "adhoc" / args.out.name)
    summary = train(config, spec, resume=args.resume, stop_after_epoch=args.stop_after_epoch, track=not args.no_track)
    if "stopped_after_epoch" in summary:
        print(f"stopped after epoch {summary['stopped_after_epoch']}; rerun the same command to resume")
    else:
        print(f"wrote {spec.run_dir}/metrics.json")
    return 0


def run_stage(args: argparse.Namespace) -> int:
    from reproduce.pipeline import run_stage as train_every_seed

    config = load_config(args.params, args.overrides)
    result = train_every_seed(config, args.method, resume=args.resume, track=not args.no_track)
    print(f"wrote runs/{args.method}/seed{{{','.join(map(str, result['seeds']))}}} and dvclive/{args.method}/")
    return 0


def run_pipeline(args: argparse.Namespace) -> int:
    from reproduce.pipeline import REGISTRY_FILE, method_lists, sync

    only = args.only.split(",") if args.only else None
    if args.check:
        import tempfile

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


def run_recipe(args: argparse.Namespace) -> int:
    """Prepare the data, train the teacher if an offline method needs one, then every method x seed.

    Runs land in runs-papers/<recipe>/ (analyse them with `python -m analysis --runs runs-papers/<recipe>`);
    rerunning the command resumes unfinished runs and skips finished ones."""
    from reproduce.data.prepare import prepare
    from reproduce.methods import get_method
    from reproduce.pipeline import run_stage as train_every_seed

    if not args.recipe.exists():
        raise FileNotFoundError(f"{args.recipe}: no such recipe; available: "
                                f"{', '.join(sorted(str(p) for p in Path('configs/papers').glob('*.yaml')))}")
    overlay = yaml.safe_load(args.recipe.read_text()) or {}
    runs_root, checkpoints_root = Path("runs-papers") / args.recipe.stem, Path("checkpoints/papers") / args.recipe.stem
    overlay.setdefault("teacher", {})["runs_root"] = str(runs_root / "teacher")
    overlay.setdefault("tracking", {})["group"] = f"paper-{args.recipe.stem}"
    config = load_config(args.params, args.overrides, extra=overlay)
    methods = list(config.pipeline.methods)
    if not methods:
        raise ConfigError(f"{args.recipe}: pipeline.methods is empty; list the methods the recipe runs")
    classes = [get_method(name) for name in methods]
    for cls in classes:
        cls.parse_params(config.methods.get(cls.name))
    if any(cls.kind.value == "offline" for cls in classes) and "teacher" not in methods:
        methods.insert(0, "teacher")
    protocol = ("the papers' protocol: the whole training set, best epoch on test" if config.dataset.val_fraction == 0
                else f"{config.dataset.val_fraction:.0%} of the training set held out, best epoch on validation")
    print(f"{args.recipe}: {config.dataset.name}, {config.models.teacher} -> {config.models.student}, "
          f"{config.recipe.epochs} epochs, seeds {config.pipeline.seeds}, {protocol}; methods: {', '.join(methods)}")
    if args.dry_run:
        for name in methods:
            for seed in config.pipeline.seeds:
                print(f"  {name:8s} seed {seed} -> {runs_root / name / f'seed{seed}'}")
        return 0
    data = config.dataset
    manifest = data.prepared_dir / "manifest.json"
    if not manifest.exists() or json.loads(manifest.read_text()).get("val_fraction") != data.val_fraction:
        prepare(data.name, Path(data.raw_root), Path(data.prepared_root), val_fraction=data.val_fraction,
                split_seed=data.split_seed, download=args.download or data.download, verify_md5=data.verify_md5)
    for name in methods:
        train_every_seed(config, name, runs_root=runs_root, checkpoints_root=checkpoints_root,
                         live_root=runs_root / "dvclive", track=not args.no_track, sweep=False)
    print(f"done: python -m analysis --runs {runs_root} --out reports/papers/{args.recipe.stem}")
    return 0


def run_methods(args: argparse.Namespace) -> int:
    from reproduce.methods.base import registered

    for cls in registered():
        kind = cls.kind.value
        space = ", ".join(cls.search_space) or "-"
        print(f"{cls.name:9s} {cls.display_name:18s} {kind:10s} search: {space}\n{'':9s} defaults: {cls.default_params()}")
    return 0


COMMANDS = {"prepare": run_prepare, "train": run_train, "stage": run_stage, "pipeline": run_pipeline,
            "recipe": run_recipe, "methods": run_methods}

if __name__ == "__main__":
    sys.exit(main())
