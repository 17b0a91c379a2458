"""MLflow: one run per key in the configured experiment (a SQLite file by default, or a server)."""

from __future__ import annotations

import fcntl
import functools
import logging
import os
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, TypeVar

from reproduce.config import TrackingConfig
from reproduce.tracking.backend import BACKENDS, RUN_KEY_TAG, STATUSES, RunInfo, flatten, metric_values
from reproduce.tracking.provenance import git_commit, source_name

T = TypeVar("T")
# The UI opens an experiment of this kind on its runs table (model training), not on the GenAI pages;
# the values are those of the UI's experiment-type selector ("mlflow.experimentKind").
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
# SQLite lets one writer in at a time and makes the others wait up to its busy timeout (5 s); a writer
# that still finds it locked retries after these pauses, then gives up (see the README on servers).
LOCKED_RETRY_PAUSES_S = (0.5, 1.0, 2.0, 4.0)
BATCH = {"metrics": 1000, "params": 100, "tags": 100}  # MLflow's per-request limits


@functools.lru_cache(maxsize=4)
def _client(uri: str) -> Any:
    """One client per tracking URI and process: each new one builds a SQLAlchemy store and checks the
    schema (~0.4 s on 2 cores), which a stage of three runs and a study's trials would pay every run."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


class StoreLockedError(RuntimeError):
    """SQLite stayed locked through every retry: too many writers for one file."""


def _retry_locked(call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    for pause in (*LOCKED_RETRY_PAUSES_S, None):
        try:
            return call(*args, **kwargs)
        except Exception as error:  # noqa: BLE001  (MLflow wraps SQLite's OperationalError in its own)
            if "database is locked" not in str(error):
                raise
            if pause is None:
                raise StoreLockedError(
                    f"the SQLite store stayed locked through {len(LOCKED_RETRY_PAUSES_S)} retries over "
                    f"{sum(LOCKED_RETRY_PAUSES_S):g} s: too many writers for one file; run `mlflow server` and set "
                    f"MLFLOW_TRACKING_URI=http://<host>:5000 (README, Tracking)") from None
            time.sleep(pause)
    raise AssertionError("unreachable")


@contextmanager
def _first_use_lock(uri: str) -> Iterator[None]:
    """Several processes opening one new SQLite store at once race to create its tables (measured: 3 of 4
    failed) and its experiment; an exclusive lock on the database file serialises the first use. SQLite
    itself locks with fcntl byte ranges, which flock does not touch."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    database = Path(uri.removeprefix("sqlite:///"))
    database.parent.mkdir(parents=True, exist_ok=True)
    with open(database, "ab") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@BACKENDS.register("mlflow")
class MlflowBackend:
    label = "MLflow"

    @classmethod
    def wanted(cls, config: TrackingConfig) -> bool:
        return config.mlflow.enabled

    @classmethod
    def destination(cls, config: TrackingConfig) -> str:
        return os.environ.get("MLFLOW_TRACKING_URI", config.mlflow.tracking_uri)

    def __init__(self, config: TrackingConfig, run: RunInfo) -> None:
        self.config, self.run, self.uri = config, run, self.destination(config)
        self.run_id: str | None = None
        self.held: dict[str, set[int]] = {}  # metric -> steps the run holds

    def open(self) -> None:
        from mlflow.entities import Param

        # The SQLite store logs a traceback for every database error before raising it (~80 lines for a
        # full disk); the Tracker reports the error raised, in one line.
        logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
        with _first_use_lock(self.uri):
            self.client = _client(self.uri)
            experiment_id = self._experiment()
        self.run_id = self._find(self.run.key, experiment_id) if self.run.resuming else None
        if self.run_id is not None:  # keep writing into the run this key started
            self.held = {name: {m.step for m in _retry_locked(self.client.get_metric_history, self.run_id, name)}
                         for name in _retry_locked(self.client.get_run, self.run_id).data.metrics}
            _retry_locked(self.client.update_run, self.run_id, status="RUNNING")
            return
        commit = git_commit()
        parent = self._find(self.run.parent_key, experiment_id) if self.run.parent_key else None
        extra = {"group": self.run.group, "job_type": self.run.job_type, RUN_KEY_TAG: self.run.key,
                 "run_dir": str(self.run.run_dir), "git.dirty": str(commit["dirty"]).lower(),
                 "mlflow.source.git.commit": commit["commit"], "mlflow.parentRunId": parent,
                 "mlflow.source.name": source_name(), "mlflow.source.type": "LOCAL",
                 "mlflow.user": self.run.tags.get("user")}
        tags = {**self.run.tags, **{k: v for k, v in extra.items() if v not in (None, "unknown", "none")}}
        self.run_id = _retry_locked(self.client.create_run, experiment_id, start_time=self.run.started_ms,
                                    run_name=self.run.name, tags=tags).info.run_id
        self._send("params", [Param(k, str(v)[:6000]) for k, v in flatten(self.run.params).items()])

    def log(self, rows: list[dict[str, float]]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(name, value, now, int(row["epoch"])) for row in rows
                   for name, value in metric_values(row, finite=True).items()
                   if int(row["epoch"]) not in self.held.get(name, ())]
        self._send("metrics", metrics)
        for metric in metrics:
            self.held.setdefault(metric.key, set()).add(metric.step)

    def image(self, name: str, path: Path) -> None:
        _retry_locked(self.client.log_artifact, self.run_id, str(path), artifact_path="figures")

    def artifact(self, path: Path, kind: str) -> None:
        _retry_locked(self.client.log_artifact, self.run_id, str(path), artifact_path=kind)

    def finish(self, summary: dict[str, Any], status: str) -> None:
        from mlflow.entities import Metric, RunTag

        now = int(time.time() * 1000)
        numbers = metric_values(summary, finite=True)
        stored = _retry_locked(self.client.get_run, self.run_id).data.metrics
        # Numbers as metrics, so that best and last scores sort and plot in the runs table; a repair
        # that finishes the run again does not store them twice.
        self._send("metrics", [Metric(k, v, now, 0) for k, v in numbers.items() if stored.get(k) != v])
        self._send("tags", [RunTag(f"summary.{k}", str(v)[:5000]) for k, v in summary.items() if k not in numbers]
                   + [RunTag("outcome", status)])
        _retry_locked(self.client.set_terminated, self.run_id, status=STATUSES[status], end_time=now)

    def suspend(self) -> None:
        _retry_locked(self.client.set_terminated, self.run_id, status="KILLED", end_time=int(time.time() * 1000))

    def _experiment(self) -> str:
        experiment = self.client.get_experiment_by_name(self.config.mlflow.experiment)
        if experiment is None:
            # Artifacts of a SQLite store go next to the database (MLflow's default: ./mlruns wherever the process started).
            artifacts = (Path(self.uri.removeprefix("sqlite:///")).resolve().parent / "mlartifacts").as_uri() \
                if self.uri.startswith("sqlite:///") else None
            try:
                return self.client.create_experiment(self.config.mlflow.experiment, artifact_location=artifacts,
                                                     tags=EXPERIMENT_KIND)
            except Exception:  # noqa: BLE001  (another process created it first: use theirs)
                experiment = self.client.get_experiment_by_name(self.config.mlflow.experiment)
                if experiment is None:
                    raise
        for key, value in EXPERIMENT_KIND.items():
            if key not in experiment.tags:  # an experiment made before; a kind a user chose stays
                self.client.set_experiment_tag(experiment.experiment_id, key, value)
        return experiment.experiment_id

    def _find(self, key: str, experiment_id: str) -> str | None:
        found = _retry_locked(self.client.search_runs, [experiment_id], f"tags.{RUN_KEY_TAG} = '{key}'", max_results=1)
        return found[0].info.run_id if found else None

    def _send(self, kind: str, entries: list[Any]) -> None:
        size = BATCH[kind]
        for start in range(0, len(entries), size):
            _retry_locked(self.client.log_batch, self.run_id, **{kind: entries[start:start + size]})
