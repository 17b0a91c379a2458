"""Optuna hyper-parameter studies over each method's coefficients (``python -m sweeps``).

- ``space``: params.yaml ``sweep.spaces.<method>`` → Optuna distributions, validated against the method.
- ``settings``: the ``sweep:`` section, the pruners, and the study name (method + hash of what makes
  trials comparable).
- ``study``: storage (SQLite, any RDB URL, or a journal file), the exact shared trial budget, the
  objective (one ``reproduce.engine.train`` run per trial, scored on validation), worker processes.
- ``report``: results from the storage: best_params.yaml, trials.csv, pareto.csv, importance.json, plots,
  and a tracked summary run.
"""

from sweeps.report import write_results
from sweeps.settings import SweepSettings, load_settings, study_name
from sweeps.space import ParamSpec, parse_space
from sweeps.study import SweepJob, plan_job, run_sweep

__all__ = ["ParamSpec", "SweepJob", "SweepSettings", "load_settings", "parse_space", "plan_job", "run_sweep",
           "study_name", "write_results"]
