"""``python -m reproduce recipe FILE``: a paper's recipe (configs/papers/*.yaml) end to end: prepare the
data, train the teacher if an offline method needs one, then every method x seed.

Runs land in runs-papers/<recipe>/ (analyse them with `python -m analysis --runs runs-papers/<recipe>`);
rerunning the command resumes unfinished runs and skips finished ones. By default the runs train one
after the other in this process; `--devices 0,1,2,3 --runs-per-device 2` trains eight at once, each in a
process of its own (the offline methods' runs wait for the teacher's), with one progress line per run and
each run's output in runs-papers/<recipe>/launch/logs/; `--launcher slurm` submits them as SLURM job
arrays instead (logs in runs-papers/<recipe>/launch/submitit/)."""

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
    fanout = parser.add_argument_group("fan-out (the pipeline section of the parameters)")
    for flag, key, metavar, text in FANOUT_OPTIONS:
        fanout.add_argument(flag, dest=key, default=None, metavar=metavar, help=f"{text} ({key})")


# Options that set a key of the pipeline section, as --set KEY=VALUE would (validated with the config).
FANOUT_OPTIONS = (
    ("--devices", "pipeline.devices", "DEVICES", "auto (every GPU, else the CPU), cpu, or GPU indices 0,1,2,3"),
    ("--runs-per-device", "pipeline.runs_per_device", "N", "runs training on one device at the same time"),
    ("--launcher", "pipeline.launcher", "{local,slurm}", "slurm: submit SLURM job arrays through submitit"),
    ("--partition", "pipeline.slurm.partition", "NAME", "SLURM partition (default: the cluster's)"),
    ("--time-min", "pipeline.slurm.time_min", "MINUTES", "SLURM time limit of one run"),
    ("--gpus-per-task", "pipeline.slurm.gpus_per_task", "N", "GPUs of one SLURM task (one run)"),
    ("--cpus-per-task", "pipeline.slurm.cpus_per_task", "N", "CPUs of one SLURM task (its torch threads)"),
    ("--array-parallelism", "pipeline.slurm.array_parallelism", "N", "SLURM array tasks running at once"),
)


def run(args: argparse.Namespace) -> int:
    from reproduce.config import load_config, read_yaml
    from reproduce.launch import Launch, launch_runs, runs_for, with_teacher_dependencies
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
    fanout = [f"{key}={getattr(args, key)}" for _, key, _, _ in FANOUT_OPTIONS if getattr(args, key) is not None]
    config = load_config(args.params, [*args.overrides, *fanout], extra=overlay)
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
    runs = with_teacher_dependencies(runs_for(methods, config.pipeline.seeds, runs_root, checkpoints_root), config)
    if args.dry_run:
        for run in runs:
            after = f" (after {run.needs})" if run.needs else ""
            print(f"  {run.method:8s} seed {run.seed} -> {run.run_dir}{after}")
        return 0
    from reproduce.data.prepare import prepare

    if offline and config.teacher.checkpoint:  # fetched (--download) or a clear error before any data work
        from reproduce.models.catalog import ensure_teacher

        ensure_teacher(config.teacher.checkpoint, download=args.download)

    data = config.dataset
    manifest = data.prepared_dir / "manifest.json"
    if not manifest.exists() or json.loads(manifest.read_text()).get("val_fraction") != data.val_fraction:
        prepare(data.name, Path(data.raw_root), Path(data.prepared_root), val_fraction=data.val_fraction,
                split_seed=data.split_seed, download=args.download or data.download, verify_md5=data.verify_md5)
    report = launch_runs(Launch(f"recipe-{args.recipe.stem}", config, runs, runs_root / "launch",
                                track=not args.no_track))
    for line in report.lines():
        print(line)
    if report.exit_code == 0:
        print(f"done: python -m analysis --runs {runs_root} --out reports/papers/{args.recipe.stem}")
    return report.exit_code


COMMANDS.register(Command("recipe", "run a paper's recipe end to end (configs/papers/*.yaml)", add_arguments, run,
                          description=__doc__))
