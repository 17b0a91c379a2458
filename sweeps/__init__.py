"""Optuna hyper-parameter studies over each method's coefficients (``python -m sweeps``).

- ``space``: a method's ``search_space`` (or params.yaml ``sweep.spaces.<method>``, which replaces it)
  → Optuna distributions, validated against the method.
- ``settings``: the ``sweep:`` section, the pruners, which methods ``--method all`` runs, and the study
  name (method + hash of what makes trials comparable).
- ``study``: storage (SQLite, PostgreSQL or any RDB URL, or a journal file), the exact shared trial
  budget, interrupted trials (heartbeat, process id, retried), the objective (one
  ``reproduce.train.train`` run per trial, scored on validation, nested under the study's tracked
  run), worker processes.
- ``report``: results from the storage: best_params.yaml, trials.csv, pareto.csv, importance.json, plots,
  and the study run's summary.
"""

from sweeps.report import write_results
from sweeps.settings import SweepSettings, load_settings, study_name
from sweeps.space import ParamSpec, parse_space
from sweeps.study import SweepJob, plan_job, run_study, run_sweep

__all__ = ["ParamSpec", "SweepJob", "SweepSettings", "load_settings", "parse_space", "plan_job", "run_study", "run_sweep",
           "study_name", "write_results"]
