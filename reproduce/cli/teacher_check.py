"""``python -m reproduce teacher-check``: the configured teacher on the test split, beside its published accuracy.

Loads the teacher exactly as an offline run would (teacher.checkpoint, else the teacher method's final.pt),
evaluates it on the prepared test split and prints its top-1 and ECE next to the accuracy the checkpoint
is known by (CRD's teacher table, torchvision's weight metadata) and the one it records for itself.
Beyond 0.5 points from the published accuracy it warns and exits with 1: the usual cause is the wrong
normalisation (dataset.normalization) or split. With --recipe FILE it checks that paper recipe's teacher.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from reproduce.cli import COMMANDS, Command, params_options
from reproduce.errors import ConfigError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    params_options(parser, "teacher.checkpoint=download_ckpts/cifar_teachers/resnet56_vanilla/ckpt_epoch_240.pth")
    parser.add_argument("--recipe", type=Path, default=None,
                        help="a paper recipe (configs/papers/*.yaml) whose dataset and teacher to check")
    parser.add_argument("--download", action="store_true",
                        help="fetch a released teacher that is not on disk yet, where the network allows")


def run(args: argparse.Namespace) -> int:
    from reproduce.config import load_config, read_yaml

    overlay = None
    if args.recipe is not None:
        overlay = read_yaml(args.recipe, "recipe") if args.recipe.is_file() else None
        if not isinstance(overlay, dict):
            raise ConfigError(f"--recipe {args.recipe}: not a recipe file (configs/papers/*.yaml)")
        # Where the recipe command keeps the teacher it trains when the recipe names no checkpoint.
        overlay.setdefault("teacher", {}).setdefault("runs_root", str(Path("runs-papers") / args.recipe.stem / "teacher"))
    config = load_config(args.params, args.overrides, extra=overlay)
    from reproduce.models.catalog import ensure_teacher
    from reproduce.train.build import check_teacher

    if config.teacher.checkpoint:
        ensure_teacher(config.teacher.checkpoint, download=args.download)
    check = check_teacher(config)
    print("\n".join(check.report()))
    return 1 if check.disagrees else 0


COMMANDS.register(Command("teacher-check", "evaluate the configured teacher on the test split beside its published "
                                           "accuracy", add_arguments, run, description=__doc__))
