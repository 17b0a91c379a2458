"""``python -m reproduce train``: one method with one seed, an ad-hoc run kept apart from the pipeline's
runs (runs-adhoc/<method>/seed<k>)."""

from __future__ import annotations

import argparse
from pathlib import Path

from reproduce.cli import COMMANDS, Command, params_options
from reproduce.errors import ConfigError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    params_options(parser)
    parser.add_argument("--method", required=True, help="method name (python -m reproduce methods lists them)")
    parser.add_argument("--seed", type=int, default=0, help="training seed, >= 0 (default: 0)")
    parser.add_argument("--params-from", type=Path, default=None,
                        help="YAML overlay merged into the parameters, e.g. sweep-results/bdkd/best_params.yaml")
    parser.add_argument("--out", type=Path, default=None, help="run directory (default: runs-adhoc/<method>/seed<k>)")
    parser.add_argument("--resume", choices=("auto", "always", "never"), default="auto",
                        help="auto: continue a checkpoint written by the same configuration (default)")
    parser.add_argument("--stop-after-epoch", type=int, default=None,
                        help="exit after this epoch (pre-emptible jobs); rerun to resume")
    parser.add_argument("--no-track", action="store_true", help="local files only: no W&B, no MLflow")


def run(args: argparse.Namespace) -> int:
    from reproduce.config import load_config, read_yaml
    from reproduce.methods import get_method

    if args.seed < 0:
        raise ConfigError(f"--seed {args.seed}: a seed must be >= 0 (e.g. --seed 0)")
    if args.stop_after_epoch is not None and args.stop_after_epoch < 1:
        raise ConfigError(f"--stop-after-epoch {args.stop_after_epoch}: must be >= 1")
    extra = read_yaml(args.params_from, "overlay file") if args.params_from else None
    if args.params_from and not isinstance(extra, dict):
        raise ConfigError(f"{args.params_from}: expected a mapping like {{methods: {{{args.method}: {{...}}}}}}")
    config = load_config(args.params, args.overrides, extra=extra)
    get_method(args.method, "--method")
    from reproduce.train import RunSpec, train

    spec = RunSpec.default(args.method, args.seed, runs_root="runs-adhoc", checkpoints_root="checkpoints/adhoc")
    if args.out:
        spec = RunSpec(args.method, args.seed, args.out, Path("checkpoints") / "adhoc" / args.out.name)
    metrics = spec.run_dir / "metrics.json"
    before = metrics.stat().st_mtime_ns if metrics.exists() else None
    summary = train(config, spec, resume=args.resume, stop_after_epoch=args.stop_after_epoch, track=not args.no_track)
    if "stopped_after_epoch" in summary:
        print(f"stopped after epoch {summary['stopped_after_epoch']}; rerun the same command to resume")
    elif not metrics.exists() or metrics.stat().st_mtime_ns != before:  # unchanged: the run was already done
        print(f"wrote {metrics}")
    return 0


COMMANDS.register(Command("train", "train one method with one seed (an ad-hoc run: runs-adhoc/<method>/seed<k>)",
                          add_arguments, run, description=__doc__))
