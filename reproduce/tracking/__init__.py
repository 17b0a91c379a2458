"""A run's W&B and MLflow records, written live from the training process (the engine writes its files).

- backend.py: the protocol a tracking service implements and its registry (``BACKENDS``); backends/
  holds one file per service (W&B, MLflow). Neither library is imported until a run is tracked.
- tracker.py: ``Tracker``, one run in every configured backend, each backend on a thread of its own;
  an outage costs one bounded wait per process.
- ledger.py, repair.py: which runs a backend may lack something of, and completing them from the
  run's files (on resume, on "already done", and `python -m reproduce.tracking sync`).
- provenance.py: commit and dirty flag, config fingerprint, experiment/user/command tags.
- wandb_file.py: reading a W&B run back from its local file."""

from reproduce.tracking.backend import BACKENDS, RUN_KEY_TAG, Backend, RunInfo, flatten
from reproduce.tracking.provenance import fingerprint, git_commit, training_params
from reproduce.tracking.repair import repair_finished_run, sync
from reproduce.tracking.tracker import CLOSE_TIMEOUT_S, Tracker, forget_outages
from reproduce.tracking.wandb_file import read_wandb_offline_run

__all__ = ["BACKENDS", "CLOSE_TIMEOUT_S", "RUN_KEY_TAG", "Backend", "RunInfo", "Tracker", "fingerprint", "flatten", "forget_outages",
           "git_commit", "read_wandb_offline_run", "repair_finished_run", "sync", "training_params"]
