"""A study's results, derived from its storage alone (``python -m sweeps report`` rewrites them at any
time): ``sweep-results/<method>/`` (the format: the package docstring), and the study's tracked run,
which gets the figures and the summary.

The folder shows one study. A study with no complete trial does not take it over from one with
results: its summary and trials.csv go to its own ``trials/<study>/`` folder, and the results of the
study shown stay, per-trial folders included. A study with results takes the folder over and only
then removes what the previous study left.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
import yaml
from optuna.trial import FrozenTrial, TrialState

from reproduce.config import Config
from reproduce.io import atomic_savefig, atomic_write_text
from sweeps.budget import EPOCHS_ATTR, ERROR_ATTR, failure_reason, retried_from, uses_budget
from sweeps.plan import MIN_COMPLETE_TRIALS, RESULTS_ROOT, budget, is_smoke
from sweeps.settings import objectives
from sweeps.storage import redact
from sweeps.tracked import close_study_run, open_study_run, take_study_run

SUMMARY = "summary.json"
FORMAT = 1  # summary.json's format version, for readers (analysis)
FIGURES = "figures"


def write_results(study: optuna.Study, method: str, config: Config, *, storage_url: str, track: bool,
                  root: Path = RESULTS_ROOT) -> dict[str, Any]:
    """Write every result file of ``study`` into ``root/<method>/`` and finish the study's tracked run
    (the one ``run_sweep`` left open, or the same run reopened); returns the summary
    (``summary["results_dir"]``: where the files went). Any Optuna study will do: ``storage_url`` only
    names it in the summary and keys its tracked run."""
    trials = study.get_trials(deepcopy=False)
    names = [objective.name for objective in objectives(len(study.directions) > 1)]
    summary = summarise(study, method, config, trials, names)
    summary["storage"] = redact(storage_url)
    method_dir = root / method
    shown = _shown_study(method_dir)
    takes_over = shown in (None, study.study_name) or summary["counts"]["complete"] > 0
    target = method_dir if takes_over else method_dir / "trials" / study.study_name
    summary["results_dir"] = str(target)
    if not takes_over:
        summary["kept"] = f"{method_dir} still shows study {shown}: this study has no complete trial"

    table = trials_table(study, trials, names)
    _write_csv(target / "trials.csv", table)
    if len(names) > 1:
        _write_csv(target / "pareto.csv", table[table["number"].isin([t.number for t in study.best_trials])])
    figures = draw_figures(study, trials, names, summary, target / FIGURES)
    summary["files"] = {"trials": "trials.csv", "pareto": "pareto.csv" if len(names) > 1 else None,
                        "best_params": "best_params.yaml" if summary["best"] else None,
                        "figures": [str(path.relative_to(target)) for path in figures.values()]}
    if summary["best"]:
        write_best_params(target / "best_params.yaml", method, summary, config)
    atomic_write_text(target / SUMMARY, json.dumps(summary, indent=2, sort_keys=True, default=str) + "\n")
    if takes_over:
        _remove_leftovers(method_dir, study.study_name, summary["files"])

    tracker = take_study_run(study.study_name, storage_url)
    if tracker is None and track:
        tracker = open_study_run(config, method, study.study_name, storage_url, study.user_attrs.get("identity", {}),
                                 enabled=True)
    if tracker is not None:
        for name, path in figures.items():
            tracker.log_image(name, path)
        close_study_run(tracker, _flat(summary), "finished" if summary["best"] else "failed")
    return summary


def summarise(study: optuna.Study, method: str, config: Config, trials: list[FrozenTrial],
              names: list[str]) -> dict[str, Any]:
    settings = config.sweep
    failed = [t for t in trials if t.state == TrialState.FAIL]
    counts = {"complete": sum(t.state == TrialState.COMPLETE for t in trials),
              "pruned": sum(t.state == TrialState.PRUNED for t in trials),
              "failed": sum(ERROR_ATTR in t.user_attrs for t in failed),  # by their own error: counted
              "interrupted": sum(ERROR_ATTR not in t.user_attrs for t in failed),  # no verdict: not counted
              "running": sum(t.state == TrialState.RUNNING for t in trials),
              "waiting": sum(t.state == TrialState.WAITING for t in trials)}
    best = best_trial(study)
    importance, why_not = param_importances(study, names, counts["complete"])
    directions = [d.name.lower() for d in study.directions]
    return {
        "format": FORMAT, "method": method, "study": study.study_name,
        "identity": study.user_attrs.get("identity", {}),
        "objectives": [{"name": o.name, "metric": o.metric, "direction": o.direction}
                       for o in objectives(len(names) > 1)],
        "metric": names[0], "direction": directions[0],
        "budget": budget(config, method, settings),
        "smoke": is_smoke(counts["complete"]),
        "counts": counts, "budget_used": sum(uses_budget(t) for t in trials),
        "best": None if best is None else {"trial": best.number, "value": best.values[0],
                                           "values": dict(zip(names, best.values)), "params": dict(best.params)},
        "importance": importance, "importance_note": why_not,
    }


def best_trial(study: optuna.Study) -> FrozenTrial | None:
    """The best complete trial; on a Pareto front, its most accurate trial (ties: the better calibrated)."""
    front = study.best_trials  # with one objective: the trials that share the best value
    if not front:
        return None
    return max(front, key=lambda trial: (trial.values[0], *(-value for value in trial.values[1:])))


def param_importances(study: optuna.Study, names: list[str], complete: int) -> tuple[dict | None, str | None]:
    """fANOVA importances per objective (seeded, so a rewrite gives the same numbers), or None and
    why: fewer than MIN_COMPLETE_TRIALS complete trials, or nothing to attribute."""
    if complete < MIN_COMPLETE_TRIALS:
        return None, (f"{complete} complete trial(s); importances need at least {MIN_COMPLETE_TRIALS} "
                      f"(sweeps/plan.py, MIN_COMPLETE_TRIALS)")
    result = {}
    for index, name in enumerate(names):
        values = {t.values[index] for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))}
        if len(values) < 2:
            return None, f"every complete trial scored the same {name}: nothing to attribute"
        result[name] = optuna.importance.get_param_importances(
            study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0),
            target=lambda trial, index=index: trial.values[index])
    return result, None


def write_best_params(path: Path, method: str, summary: dict[str, Any], config: Config) -> None:
    """An overlay for ``python -m reproduce train --params-from``, whose header says what budget found it:
    a smoke test's best is not offered for training."""
    best = summary["best"]
    scores = ", ".join(f"{name} {value:.4g}" for name, value in best["values"].items())
    complete = summary["counts"]["complete"]
    found = (f"# Best of study {summary['study']}: trial {best['trial']} ({scores}); budget "
             f"{summary['budget']['text']}; {complete} complete trial(s).\n")
    if summary["smoke"]:
        advice = (f"# A smoke test, not a tuning result: fewer than {MIN_COMPLETE_TRIALS} complete trials. Do not "
                  f"report or train these as tuned values.\n# A study (complete trials count; pruned ones do not): "
                  f"python -m sweeps run --method {method} --set sweep.n_trials={2 * MIN_COMPLETE_TRIALS} --set "
                  f"sweep.epochs_per_trial={config.recipe.epochs} --set sweep.pruner.name=none --workers 2\n")
    else:
        advice = f"# Train with them: python -m reproduce train --method {method} --params-from {path}\n"
    atomic_write_text(path, found + advice + yaml.safe_dump({"methods": {method: best["params"]}}, sort_keys=False))


def trials_table(study: optuna.Study, trials: list[FrozenTrial], names: list[str]) -> pd.DataFrame:
    """``study.trials_dataframe()`` with the objectives' names as value columns, the duration in
    seconds, how far each trial trained, which trial a retry replaces, and why a trial failed."""
    frame = study.trials_dataframe(attrs=("number", "state", "value", "duration", "params", "user_attrs"),
                                   multi_index=False)
    if frame.empty:
        return pd.DataFrame(columns=["number", "state", *names, "epochs_trained", "duration_s", "retry_of", "error"])
    value_columns = [c for c in frame.columns if c == "value" or c.startswith(("value_", "values_"))]
    frame = frame.rename(columns=dict(zip(value_columns, names)))
    frame["duration_s"] = pd.to_timedelta(frame["duration"]).dt.total_seconds().round(2)  # NaT while running
    by_number = {t.number: t for t in trials}
    frame["epochs_trained"] = [by_number[n].user_attrs.get(EPOCHS_ATTR) for n in frame["number"]]
    frame["retry_of"] = [retried_from(by_number[n]) for n in frame["number"]]
    frame["error"] = [failure_reason(by_number[n]) if by_number[n].state == TrialState.FAIL else None
                      for n in frame["number"]]
    params = sorted(c for c in frame.columns if c.startswith("params_"))
    columns = ["number", "state", *names, "epochs_trained", "duration_s", *params, "retry_of", "error"]
    frame = frame[columns]
    frame["retry_of"] = frame["retry_of"].astype("Int64")
    frame["epochs_trained"] = frame["epochs_trained"].astype("Int64")
    return frame


def _write_csv(path: Path, frame: pd.DataFrame) -> None:
    atomic_write_text(path, frame.to_csv(index=False, lineterminator="\n"))


# ----------------------------------------------------------------------------------------------
# Figures: Optuna's own matplotlib visualisations


def draw_figures(study: optuna.Study, trials: list[FrozenTrial], names: list[str], summary: dict[str, Any],
                 directory: Path) -> dict[str, Path]:
    """PNG files by name; each only where it has something to show."""
    import matplotlib
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as plots

    complete = summary["counts"]["complete"] > 0
    primary = {"target": (lambda t: t.values[0]) if len(names) > 1 else None, "target_name": names[0]}
    wanted: dict[str, Any] = {}
    if complete:
        wanted["optimization_history"] = lambda: plots.plot_optimization_history(study, **primary)
        wanted["slice"] = lambda: plots.plot_slice(study, **primary)
    if any(t.intermediate_values for t in trials):
        wanted["intermediate_values"] = lambda: plots.plot_intermediate_values(study)
    if summary["importance"]:
        wanted["param_importances"] = lambda: plots.plot_param_importances(
            study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0), **primary)
    if len(names) > 1 and complete:
        wanted["pareto_front"] = lambda: plots.plot_pareto_front(study, target_names=names)
    written = {}
    for name, draw in wanted.items():
        # Optuna's plots switch the process's style (plt.style.use): keep that to the plot.
        with warnings.catch_warnings(), matplotlib.rc_context():
            warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
            axes = draw()
            figure = (axes.flat[0] if hasattr(axes, "flat") else axes).figure
            figure.suptitle(f"{study.study_name}: {summary['budget']['text']}", fontsize=8, y=0.995)
            path = directory / f"{name}.png"
            atomic_savefig(figure, path, dpi=120, bbox_inches="tight")
            plt.close(figure)
        written[name] = path
    return written


# ----------------------------------------------------------------------------------------------
# Which study the folder shows


def _shown_study(method_dir: Path) -> str | None:
    try:
        return json.loads((method_dir / SUMMARY).read_text()).get("study")
    except (OSError, ValueError, AttributeError):
        return None  # nothing shown yet, or unreadable: taken over


def _remove_leftovers(method_dir: Path, study: str, files: dict[str, Any]) -> None:
    """What another study (or this one's earlier results) left beside the files just written."""
    trials_dir = method_dir / "trials"
    for path in trials_dir.iterdir() if trials_dir.is_dir() else []:
        if path.name != study:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    kept = {method_dir / name for name in (files["trials"], files["pareto"], files["best_params"], SUMMARY) if name}
    for name in ("trials.csv", "pareto.csv", "best_params.yaml"):
        if method_dir / name not in kept:
            (method_dir / name).unlink(missing_ok=True)
    figures = {method_dir / name for name in files["figures"]}
    for path in (method_dir / FIGURES).glob("*.png"):
        if path not in figures:
            path.unlink()


def _flat(summary: dict[str, Any]) -> dict[str, Any]:
    """The summary's numbers for the tracked run (trackers take flat scalars)."""
    flat: dict[str, Any] = {f"trials/{state}": count for state, count in summary["counts"].items()}
    flat["budget_used"] = summary["budget_used"]
    if summary["best"]:
        flat.update({f"best/{name}": value for name, value in summary["best"]["values"].items()})
        flat["best/trial"] = summary["best"]["trial"]
    return flat
