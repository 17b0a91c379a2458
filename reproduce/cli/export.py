"""``python -m reproduce export RUN_DIR --format crd|torchvision|torchscript``: a network trained here, for the
ecosystem's own code.

crd: RepDistiller / mdistiller's checkpoint {"epoch", "model": state_dict, "accuracy"} in their key names;
torchvision: a state_dict in torchvision's key names (resnet18/34/50); torchscript: the compiled network
for torch.jit.load, any architecture. By default the run's student from final.pt, written to
RUN_DIR/export/<network>-<arch>-<format>.pth|.pt.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from reproduce.cli import COMMANDS, Command

FORMATS = ("crd", "torchvision", "torchscript")  # reproduce.models.export.FORMATS, kept here so --help stays instant


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", type=Path, help="a finished run, e.g. runs/kd/seed0")
    parser.add_argument("--format", required=True, choices=FORMATS, help="the layout to write")
    parser.add_argument("--network", default=None, help="which network of the run (default: the student)")
    parser.add_argument("--checkpoint", default="final.pt", choices=("final.pt", "best.pt"),
                        help="the last epoch (final.pt, default) or the best one (best.pt)")
    parser.add_argument("--out", type=Path, default=None, help="output file (default: RUN_DIR/export/...)")


def run(args: argparse.Namespace) -> int:
    from reproduce.models.export import export_network

    path = export_network(args.run_dir, args.format, network=args.network, checkpoint=args.checkpoint, out=args.out)
    print(f"wrote {path}")
    return 0


COMMANDS.register(Command("export", "write a trained network in CRD's or torchvision's key layout, or as TorchScript",
                          add_arguments, run, description=__doc__))
