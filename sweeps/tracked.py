"""The study's own run in W&B and MLflow: every trial's run nests under it, and it ends with the
study's summary and figures. One run per study and storage, the same on every machine and rerun."""

from __future__ import annotations

import copy
import hashlib
from typing import Any

from reproduce.config import Config
from reproduce.tracking import Tracker
from sweeps.plan import RESULTS_ROOT, budget, describe_budget
from sweeps.storage import redact

_OPEN_STUDY_RUNS: dict[str, Tracker] = {}  # key -> this process's open study run, finished by write_results


def study_run_key(name: str, storage_url: str) -> str:
    """One run per study and storage, the same on every machine and every rerun: they all continue it."""
    return f"{name}-{hashlib.sha256(redact(storage_url).encode()).hexdigest()[:6]}"


def open_study_run(config: Config, method: str, name: str, storage_url: str, identity: dict[str, Any], *,
                   enabled: bool, wandb: bool = True) -> Tracker:
    """The study's run (``run_name`` the study name); reopening continues it. ``wandb=False``: MLflow
    only, for a spawned worker while its parent process holds the run open. A trial nests under an
    MLflow run by its id, and under a W&B study by its group (the study's name), which needs no open
    W&B run; two processes writing one W&B run at once is what W&B does not take."""
    key = study_run_key(name, storage_url)
    if key in _OPEN_STUDY_RUNS:
        return _OPEN_STUDY_RUNS[key]
    tracking = copy.deepcopy(config.tracking)
    tracking.group = name
    tracking.wandb.enabled = tracking.wandb.enabled and wandb
    settings = config.sweep
    tags = {"method": method, "dataset": config.dataset.name, "teacher": config.models.teacher,
            "student": config.models.student, "study": name, "kind": "study",
            "budget": describe_budget(config, method, settings)}
    tracker = Tracker(tracking, run_dir=RESULTS_ROOT / method, run_name=name, tags=tags,
                      params={"sweep": settings.model_dump(), "budget": budget(config, method, settings),
                              "study": identity, "storage": redact(storage_url)},
                      resume_key=key, enabled=enabled, job_type="sweep")
    _OPEN_STUDY_RUNS[key] = tracker
    return tracker


def close_study_run(tracker: Tracker, summary: dict[str, Any] | None = None, status: str | None = None) -> None:
    """``finish`` with a status, or ``suspend`` (workers, interrupted runs: the study run goes on)."""
    for key, open_tracker in list(_OPEN_STUDY_RUNS.items()):
        if open_tracker is tracker:
            del _OPEN_STUDY_RUNS[key]
    if status is None:
        tracker.suspend()
    else:
        tracker.finish(summary or {}, status=status)


def take_study_run(name: str, storage_url: str) -> Tracker | None:
    """The study run this process has open, if any (``run_sweep`` leaves it open for ``write_results``)."""
    return _OPEN_STUDY_RUNS.get(study_run_key(name, storage_url))
