"""Command line: ``python -m sweeps {run,report}``; ``--help`` on each."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

from reproduce.errors import ConfigError

if TYPE_CHECKING:  # the config's pydantic models are loaded by a command, not by --help
    from reproduce.config import Config

DESCRIPTION = """\
Optuna studies over a method's coefficients (search spaces: each method's own, `python -m reproduce
methods` lists them; params.yaml sweep.spaces.<method> replaces one), scored on the validation split,
never on test. Results go to sweep-results/<method>/ (summary.json, best_params.yaml, trials.csv,
figures/), each saying what budget produced it.

examples:
  python -m sweeps run --method kd                        # SQLite study in studies/kd.db
  python -m sweeps run --method all                       # every method with a space, one after the other
  python -m sweeps run --method kd,dkd                    # these two, in this order, in one process
  python -m sweeps run --method bdkd --workers 4          # 4 processes share the study and its budget
  python -m sweeps run --method bdkd --workers 4 --devices 0,1   # workers 0 and 2 on GPU 0, 1 and 3 on GPU 1
  python -m sweeps run --method bdkd --storage postgresql+psycopg://user:pw@host/optuna   # same line on every machine
  python -m sweeps run --method bdkd --storage journal:studies/bdkd.log    # journal file, no database
  python -m sweeps run --method kd --multi-objective      # val top-1 vs val ECE: a Pareto front
  python -m sweeps run --method kd --set sweep.n_trials=20 --set sweep.epochs_per_trial=8 \\
      --set sweep.pruner.name=none --workers 2            # a study, not a smoke test, on the embedded digits
  python -m sweeps report --method kd                     # rewrite the results from the storage
  optuna-dashboard sqlite:///studies/kd.db                # watch studies live (pip install optuna-dashboard)

A worker that dies mid-trial (killed, pre-empted) leaves a failed trial that does not count; its parameters
are queued again at once on the same machine, after sweep.heartbeat.grace_s from another one (database
storages). `run` returns once the study's budget is complete. Rerunning `run` resumes the study and runs
only the missing trials. Changing the search space, epochs per trial, dataset, model pair, recipe or
fixed coefficients starts a new study (its name carries a hash of them); changing the budget, pruner,
heartbeat or workers continues the same one. A trial is the run in miniature: epoch-counted settings
(DKD's warm-up, the learning-rate milestones) shrink with it, and the pruner waits past half of it.
Fewer than 10 complete trials make a smoke test: no importances, and best_params.yaml says so.
"""


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--method", required=True,
                        help="method to tune (python -m reproduce methods lists them), a comma list, or `all` "
                             "(sweep.methods; by default every method with a search space)")
    parser.add_argument("--params", default="params.yaml", help="parameters file (default: params.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a parameter, e.g. --set sweep.n_trials=20 (repeatable)")
    parser.add_argument("--storage", default=None,
                        help="database URL or journal:PATH, shared by every worker on every machine "
                             "(default: sweep.storage, sqlite:///studies/<method>.db)")
    parser.add_argument("--multi-objective", action="store_true",
                        help="maximise val top-1 and minimise val ECE (Pareto front; no pruning)")
    parser.add_argument("--no-track", action="store_true", help="no W&B or MLflow runs, local files only")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sweeps", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="create or resume a method's study and run its missing trials, "
                                          "then write the results")
    _common(run)
    run.add_argument("--workers", type=int, default=None,
                     help="worker processes on this machine (default: sweep.workers)")
    run.add_argument("--devices", default=None,
                     help="pin worker i to devices[i %% len]: GPU indices 0,1,..., cpu (threads split between "
                          "the workers), or auto (every visible GPU, else cpu); default: runtime.device for all")
    run.add_argument("--quiet", action="store_true", help="no line per finished trial")

    report = commands.add_parser("report", help="rewrite sweep-results/<method>/ from an existing study")
    _common(report)
    report.add_argument("--study", default=None,
                        help="study name (default: the study of the current settings, as `run` would use)")

    args = parser.parse_args(argv)
    from reproduce.cli import run_reporting_errors
    from reproduce.numerics import pin_cpu_numerics

    pin_cpu_numerics()  # before torch loads (workers inherit it): the same CPU numbers on any x86-64 machine
    return run_reporting_errors(COMMANDS[args.command], args)  # a UserError: one line, exit code 2


def _load_config(args: argparse.Namespace) -> Config:
    from reproduce.config import load_config

    overrides = list(args.overrides)
    if getattr(args, "workers", None) is not None:
        overrides.append(f"sweep.workers={args.workers}")
    if args.storage is not None:
        overrides.append(f"sweep.storage={json.dumps(args.storage)}")  # quoted: a URL is not YAML to parse
    if args.multi_objective:
        overrides.append("sweep.multi_objective=true")
    return load_config(args.params, overrides)


def run_command(args: argparse.Namespace) -> int:
    config = _load_config(args)
    methods = _methods(config, args.method)
    # Imported here, not at the top: torch and optuna take seconds, which `--help` need not wait for.
    from sweeps.study import run_study

    status = 0
    for method in methods:
        summary = run_study(config, method, track=not args.no_track, quiet=args.quiet, devices=args.devices)
        if summary is None:
            print(f"{method}: its search space is empty, so there is nothing to tune; no study created")
            continue
        _print_outcome(summary)
        if summary["best"] is None:
            print(f"error: no trial of {summary['study']} completed; see {summary['results_dir']}/trials.csv "
                  f"(column error)", file=sys.stderr)
            status = 1
    return status


def report_command(args: argparse.Namespace) -> int:
    from sweeps.plan import plan_job
    from sweeps.report import write_results
    from sweeps.settings import storage_url
    from sweeps.storage import load_existing_study, storage_errors

    config = _load_config(args)
    methods = _methods(config, args.method)
    if args.study is not None and len(methods) > 1:
        raise ConfigError("--study names one study: give one --method with it")
    for method in methods:
        url = storage_url(config.sweep, method)
        name = args.study
        if name is None:
            job = plan_job(config, method)
            if job is None:
                raise ConfigError(f"{method}: its search space is empty, so no study has these settings; name one "
                                  f"with --study")
            name = job.study_name
        with storage_errors(url):
            study = load_existing_study(name, url)
            summary = write_results(study, method, config, storage_url=url, track=not args.no_track)
        _print_outcome(summary)
    return 0


def _methods(config: Config, selector: str) -> list[str]:
    from sweeps.settings import select_methods

    return select_methods(config.sweep, selector)


def _print_outcome(summary: dict) -> None:
    """What the study found, always with the budget that found it."""
    study, counts = summary["study"], summary["counts"]
    listed = ", ".join(f"{count} {state}" for state, count in counts.items() if count)
    print(f"[{study}] {listed or 'no trials'} in {summary['storage']}; budget {summary['budget']['text']}")
    best = summary["best"]
    if best is not None:
        scores = " ".join(f"{name} {value:.4g}" for name, value in best["values"].items())
        verdict = (f"a smoke test ({counts['complete']} complete trials, fewer than "
                   f"{summary['budget']['min_complete_trials']}): not a tuning result" if summary["smoke"] else "")
        print(f"[{study}] best: trial {best['trial']} {scores} {best['params']}" + (f"; {verdict}" if verdict else ""))
    if "kept" in summary:
        print(f"[{study}] {summary['kept']}")
    print(f"[{study}] wrote {summary['results_dir']}/")


COMMANDS = {"run": run_command, "report": report_command}

if __name__ == "__main__":
    sys.exit(main())
