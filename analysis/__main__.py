"""Command line: ``python -m analysis [--runs runs] [--sweeps sweep-results] [--out reports] [--params params.yaml]
[--no-track]``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from reproduce.errors import UserError
from reproduce.numerics import pin_cpu_numerics


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m analysis", description="Tables, reliability diagrams, curves and an HTML report from the runs.")
    parser.add_argument("--runs", type=Path, default=Path("runs"), help="run directories: <runs>/<method>/seed<k>/")
    parser.add_argument("--sweeps", type=Path, default=Path("sweep-results"),
                        help="Optuna sweep results, one folder per method (optional input)")
    parser.add_argument("--out", type=Path, default=Path("reports"), help="output folder (default: reports)")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="parameters file")
    parser.add_argument("--no-track", action="store_true", help="do not log the figures to W&B and MLflow")
    args = parser.parse_args(argv)
    pin_cpu_numerics()  # before torch loads: the same calibration numbers on every x86-64 machine
    from analysis.report import run_analysis  # torch, matplotlib, the trackers: only past --help

    try:
        report = run_analysis(args.runs, args.sweeps, args.out, args.params, track=not args.no_track)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for note in report.notes:
        print(f"note: {note}", file=sys.stderr)
    for warning in report.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(f"wrote {args.out}/index.html, {len(report.tables)} tables, {len(report.figures)} figures, "
          f"{len(report.plots)} curves under {args.out}/plots ({len(report.notes)} input note(s), "
          f"{len(report.warnings)} calibration warning(s))")
    return 0


if __name__ == "__main__":
    sys.exit(main())
