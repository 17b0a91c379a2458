"""A study's results, derived from its storage alone, so ``python -m sweeps report`` can rewrite them
at any time: ``sweeps/results/<method>/``, and the study's run in W&B and MLflow (the parent of every
trial's run) gets the plots and the summary.

Files: ``best_params.yaml`` (an overlay for ``python -m reproduce train --params-from``), ``trials.csv``,
``pareto.csv`` (multi-objective), ``importance.json``, ``metrics.json`` (the summary) and PNG plots.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
from pathlib import Path
from typing import Any

import optuna
import yaml
from matplotlib.figure import Figure  # the object API draws straight to files: no backend, no display
from matplotlib.ticker import MaxNLocator
from optuna.trial import FrozenTrial, TrialState

from reproduce.config import Config
from reproduce.io import atomic_write_text
from sweeps.settings import objectives
from sweeps.study import (EPOCHS_ATTR, RESULTS_ROOT, RETRIED_ATTR, claim_results_dir, close_study_run, failure_reason,
                          open_study_run, redact, take_study_run, uses_budget)


def write_results(study: optuna.Study, method: str, config: Config, *, storage_url: str, track: bool) -> dict[str, Any]:
    """Write every result file of ``study`` and finish the study's tracked run (the one ``run_sweep``
    left open, or the same run reopened); returns the summary."""
    results_dir = RESULTS_ROOT / method
    claim_results_dir(results_dir, study.study_name, storage_url, study.user_attrs.get("identity", {}))
    names = [objective.name for objective in objectives(len(study.directions) > 1)]
    trials = study.get_trials(deepcopy=False)
    write_trials_csv(results_dir / "trials.csv", trials, names)
    importance = param_importances(study, names)
    atomic_write_text(results_dir / "importance.json", json.dumps(importance, indent=2) + "\n")

    figures = {"optimization_history": plot_history(results_dir / "optimization_history.png", trials, names[0],
                                                    study.directions[0])}
    if importance["importances"]:
        figures["param_importances"] = plot_importances(results_dir / "param_importances.png",
                                                        importance["importances"])
    best = best_trial(study)
    if best is not None:
        write_best_params(results_dir / "best_params.yaml", method, study.study_name, best, names)
    if len(names) > 1:
        front = study.best_trials
        write_trials_csv(results_dir / "pareto.csv", front, names)
        if front:
            figures["pareto_front"] = plot_pareto(results_dir / "pareto_front.png", trials, front, names)

    summary = {
        "study": study.study_name, "storage": redact(storage_url), "method": method, "objectives": names,
        "trials": {state.name.lower(): sum(t.state == state for t in trials) for state in TrialState},
        "budget_used": sum(uses_budget(t) for t in trials),
        "best": None if best is None else {"number": best.number, **dict(zip(names, best.values)),
                                           "params": dict(best.params)},
        "importance": importance["importances"],
    }
    atomic_write_text(results_dir / "metrics.json", json.dumps(summary, indent=2, sort_keys=True) + "\n")
    tracker = take_study_run(study.study_name, storage_url)
    if tracker is None and track:
        tracker = open_study_run(config, method, study.study_name, storage_url, study.user_attrs.get("identity", {}),
                                 enabled=True)
    if tracker is not None:
        for figure, path in figures.items():
            tracker.log_image(figure, path)
        close_study_run(tracker, summary, "finished" if best is not None else "failed")
    return summary


def best_trial(study: optuna.Study) -> FrozenTrial | None:
    """The best complete trial; on a Pareto front, its most accurate trial (ties: the better calibrated)."""
    front = study.best_trials  # with one objective: the trials that share the best value
    if not front:
        return None
    return max(front, key=lambda trial: (trial.values[0], *(-value for value in trial.values[1:])))


def write_best_params(path: Path, method: str, name: str, trial: FrozenTrial, names: list[str]) -> None:
    scores = ", ".join(f"{metric} {value:.4g}" for metric, value in zip(names, trial.values))
    header = (f"# Best parameters of study {name}: trial {trial.number} ({scores}).\n"
              f"# Train with them: python -m reproduce train --method {method} --params-from {path}\n")
    atomic_write_text(path, header + yaml.safe_dump({"methods": {method: dict(trial.params)}}, sort_keys=False))


def write_trials_csv(path: Path, trials: list[FrozenTrial], names: list[str]) -> None:
    param_names = list(dict.fromkeys(name for trial in trials for name in trial.params))
    columns = ["number", "state", *names, "epochs_trained", "duration_s", *(f"params_{p}" for p in param_names),
               "retry_of", "error"]
    rows = []
    for trial in trials:
        # A pruned trial's value is the last one it reported: useful, and its state says it is partial.
        values = trial.values if trial.values is not None else [None] * len(names)
        rows.append({
            "number": trial.number, "state": trial.state.name, **dict(zip(names, values)),
            "epochs_trained": trial.user_attrs.get(EPOCHS_ATTR),
            "duration_s": round(trial.duration.total_seconds(), 2) if trial.duration is not None else None,
            **{f"params_{p}": trial.params.get(p) for p in param_names},
            "retry_of": trial.system_attrs.get(RETRIED_ATTR),
            "error": failure_reason(trial) if trial.state == TrialState.FAIL else None,
        })
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, text.getvalue())


def param_importances(study: optuna.Study, names: list[str]) -> dict[str, Any]:
    """fANOVA importances per objective (seeded, so a rewrite gives the same numbers). PED-ANOVA,
    Optuna's default, needs more trials than a small sweep has to tell parameters apart."""
    complete = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    result: dict[str, Any] = {"evaluator": "fanova", "complete_trials": len(complete), "importances": {}, "notes": {}}
    for index, name in enumerate(names):
        if len(complete) < 2:
            result["notes"][name] = "needs at least 2 complete trials"
        elif len({trial.values[index] for trial in complete}) < 2:
            result["notes"][name] = "every complete trial scored the same: nothing to attribute"
        else:
            result["importances"][name] = optuna.importance.get_param_importances(
                study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0),
                target=lambda trial, index=index: trial.values[index])
    return result


# ----------------------------------------------------------------------------------------------
# Plots


def plot_history(path: Path, trials: list[FrozenTrial], name: str, direction: optuna.study.StudyDirection) -> Path:
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    pruned = [t for t in trials if t.state == TrialState.PRUNED and t.value is not None]
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    if complete:
        ax.scatter([t.number for t in complete], [t.values[0] for t in complete], label="complete", zorder=3)
        better = max if direction == optuna.study.StudyDirection.MAXIMIZE else min
        best_so_far = list(itertools.accumulate((t.values[0] for t in complete), better))
        last = max(t.number for t in trials)  # the line runs on past the last improvement
        ax.step([t.number for t in complete] + [last], best_so_far + best_so_far[-1:], where="post", color="C3",
                label="best so far")
    if pruned:
        ax.scatter([t.number for t in pruned], [t.value for t in pruned], marker="x", color="grey",
                   label="pruned (last reported)")
    ax.set(xlabel="trial", ylabel=name, title="optimisation history")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if complete or pruned:
        ax.legend(loc="best")
    return _save(fig, path)


def plot_importances(path: Path, importances: dict[str, dict[str, float]]) -> Path:
    tallest = max(len(values) for values in importances.values())
    fig = Figure(figsize=(5 * len(importances), 1 + 0.5 * tallest))
    axes = fig.subplots(1, len(importances), squeeze=False)[0]
    for ax, (name, values) in zip(axes, importances.items()):
        params = list(values)[::-1]  # most important on top
        ax.barh(params, [values[p] for p in params])
        ax.set(xlabel="importance (fANOVA)", title=name)
    return _save(fig, path)


def plot_pareto(path: Path, trials: list[FrozenTrial], front: list[FrozenTrial], names: list[str]) -> Path:
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    ax.scatter([t.values[1] for t in complete], [t.values[0] for t in complete], color="grey", label="trial")
    ordered = sorted(front, key=lambda trial: trial.values[1])
    ax.plot([t.values[1] for t in ordered], [t.values[0] for t in ordered], "o-", color="C3", label="Pareto front")
    for trial in ordered:
        ax.annotate(str(trial.number), (trial.values[1], trial.values[0]), textcoords="offset points", xytext=(4, 4))
    ax.set(xlabel=names[1], ylabel=names[0], title="Pareto front")
    ax.legend(loc="best")
    return _save(fig, path)


def _save(fig: Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path
