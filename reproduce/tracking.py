"""A run's W&B and MLflow records, written live from the training process (the engine writes its files).

Each epoch goes out as it happens: W&B's own service logs asynchronously, MLflow gets an asynchronous
``log_batch``. Both are imported only when a run is tracked. A backend that raises is switched off with
one warning; one that does not answer costs a bounded wait (W&B's init and finish timeouts, MLflow's
HTTP timeout and retries, finishing in daemon threads joined with a timeout)."""

from __future__ import annotations

import atexit
import functools
import json
import math
import os
import subprocess
import threading
import time
import uuid
import warnings
from pathlib import Path
from typing import Any

from reproduce.config import TrackingConfig

# W&B and MLflow write into $HOME and /tmp unless told otherwise, and MLflow phones home: keep both
# inside the project and quiet. Users can still point them elsewhere through the environment.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("WANDB_SILENT", "true")
# A tracking server that is down must cost seconds, not MLflow's default minutes of retries.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
# MLflow's queue sends what arrived each second; without a window, ending a run waits a second for it.
os.environ.setdefault("MLFLOW_ASYNC_LOGGING_BUFFERING_SECONDS", "1")

RUN_KEY_TAG = "run_key"  # a run's key names it in both (W&B run id; MLflow tag): a resume finds it again
STATUSES = {"finished": "FINISHED", "pruned": "FINISHED", "failed": "FAILED"}  # MLflow has no "pruned"
# Finishing drains MLflow's queue and uploads the final checkpoint; a remote server may take a while.
CLOSE_TIMEOUT_S = 300.0


def git_commit() -> dict[str, Any]:
    """The commit the code ran at, and whether the work tree had uncommitted changes."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                    text=True, timeout=10, check=True).stdout.strip())
        return {"commit": commit, "dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        return {"commit": "unknown", "dirty": None}


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        flat.update(flatten(value, name) if isinstance(value, dict) else {name: value})
    return flat


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class _Wandb:
    label = "W&B"

    def __init__(self, config: TrackingConfig, tracker: Tracker, tags: dict[str, str], params: dict[str, Any]) -> None:
        import wandb

        self.wandb = wandb
        mode = os.environ.get("WANDB_MODE", config.wandb.mode)
        # Machine probes, requirement scans, code and job capture cost seconds per run and add nothing
        # (the commit is in the config); system metrics are worth it only to a person watching live.
        settings = wandb.Settings(init_timeout=60, finish_timeout=CLOSE_TIMEOUT_S, console="off",
                                  x_disable_stats=mode != "online", x_disable_machine_info=True,
                                  x_save_requirements=False, disable_git=True, save_code=False, disable_job_creation=True)
        self.run = wandb.init(project=config.project, entity=config.wandb.entity, group=tracker.group, name=tracker.name,
                              id=tracker.key, resume="allow", mode=mode, config=params, dir=os.environ["WANDB_DIR"],
                              tags=[f"{k}:{v}"[:64] for k, v in tags.items()], reinit="create_new", settings=settings)

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def image(self, name: str, path: Path) -> None:
        self.run.log({name: self.wandb.Image(str(path))})

    def artifact(self, path: Path, kind: str) -> None:
        artifact = self.wandb.Artifact(name=f"{self.run.name}-{path.stem}".replace("/", "-"), type=kind)
        artifact.add_file(str(path))
        self.run.log_artifact(artifact)

    def finish(self, summary: dict[str, Any], status: str) -> None:
        self.run.summary.update({**summary, "outcome": status})
        self.run.finish(exit_code=1 if status == "failed" else 0)

    def suspend(self) -> None:
        self.run.mark_preempting()
        self.run.finish(exit_code=0)


@functools.lru_cache(maxsize=4)
def _mlflow_client(uri: str) -> Any:
    """One client per tracking URI and process: each new one builds a SQLAlchemy store and checks the
    schema (~0.4 s on 2 cores), which a stage of three runs and a study's trials would pay every run."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


class _Mlflow:
    label = "MLflow"

    def __init__(self, config: TrackingConfig, tracker: Tracker, tags: dict[str, str], params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        uri = os.environ.get("MLFLOW_TRACKING_URI", config.mlflow.tracking_uri)
        self.client, self.pending = _mlflow_client(uri), []
        experiment = self.client.get_experiment_by_name(config.mlflow.experiment)
        # Artifacts of a SQLite store go next to the database (MLflow's default: ./mlruns wherever the process started).
        artifacts = (Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlartifacts").as_uri() \
            if uri.startswith("sqlite:///") else None
        experiment_id = (experiment.experiment_id if experiment else
                         self.client.create_experiment(config.mlflow.experiment, artifact_location=artifacts))
        found = self.client.search_runs([experiment_id], f"tags.{RUN_KEY_TAG} = '{tracker.key}'", max_results=1) \
            if tracker.resuming else []
        if found:  # keep writing into the run this key started
            self.run_id = found[0].info.run_id
            self.client.update_run(self.run_id, status="RUNNING")
            return
        commit = git_commit()
        extra = {"group": tracker.group, RUN_KEY_TAG: tracker.key, "run_dir": str(tracker.run_dir),
                 "git.dirty": str(commit["dirty"]).lower(),
                 "mlflow.source.git.commit": commit["commit"], "mlflow.parentRunId": tracker.parent_id}
        self.run_id = self.client.create_run(experiment_id, start_time=tracker.started_ms, run_name=tracker.name, tags={
            **tags, **{k: v for k, v in extra.items() if v not in (None, "unknown")}}).info.run_id
        self._send("params", [Param(k, str(v)[:6000]) for k, v in flatten(params).items()], 100)

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        # A batch that failed in MLflow's worker switches MLflow off now, not after the last epoch.
        for done in [ops for ops in self.pending if all(f.done() for f in ops._operation_futures)]:
            self.pending.remove(done)
            done.wait()
        now = int(time.time() * 1000)
        self._send("metrics", [Metric(k, float(v), now, step) for k, v in metrics.items() if _is_number(v)], 1000)

    def image(self, name: str, path: Path) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path="figures")

    def artifact(self, path: Path, kind: str) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path=kind)

    def finish(self, summary: dict[str, Any], status: str) -> None:
        from mlflow.entities import Metric, RunTag

        now = int(time.time() * 1000)
        # Numbers as metrics, so that best and last scores sort and plot in the runs table.
        self._send("metrics", [Metric(k, float(v), now, 0) for k, v in summary.items() if _is_number(v)], 1000)
        self._send("tags", [RunTag(f"summary.{k}", str(v)[:5000]) for k, v in summary.items() if not _is_number(v)]
                   + [RunTag("outcome", status)], 100)
        self._close(STATUSES[status], now)

    def suspend(self) -> None:
        self._close("KILLED", int(time.time() * 1000))  # resumed later into the same run

    def _send(self, kind: str, entries: list[Any], size: int) -> None:
        for start in range(0, len(entries), size):
            self.pending.append(self.client.log_batch(self.run_id, **{kind: entries[start:start + size]},
                                                      synchronous=False))

    def _close(self, status: str, end_ms: int) -> None:
        # set_terminated first drains MLflow's queue, so the run ends with every batch stored.
        self.client.set_terminated(self.run_id, status=status, end_time=end_ms)
        for ops in self.pending:
            ops.wait()  # raises if a batch failed


_OPEN: list[Tracker] = []  # runs this process has neither finished nor suspended


class Tracker:
    """One run in W&B and MLflow: per-epoch metrics, images, artefacts, and a final summary."""

    def __init__(self, config: TrackingConfig, *, run_dir: Path, run_name: str, tags: dict[str, str],
                 params: dict[str, Any], resume_key: str | None = None, enabled: bool = True,
                 parent: Tracker | None = None) -> None:
        """``resume_key``: the ``key`` of a run to continue. ``enabled=False`` tracks nothing (DDP ranks
        other than 0, untracked runs). ``parent``: the run this one nests under (a sweep's study)."""
        self.run_dir, self.name, self.started_ms = Path(run_dir), run_name, int(time.time() * 1000)
        self.key = resume_key or uuid.uuid4().hex[:16]  # chosen here, so that a checkpoint holds it at once
        self.resuming, self.group = resume_key is not None, parent.name if parent else config.group
        self.parent_id = next((b.run_id for b in parent._backends if isinstance(b, _Mlflow)), None) if parent else None
        self._backends: list[Any] = []
        kinds = [kind for kind, wanted in ((_Wandb, config.wandb.enabled and config.wandb.mode != "disabled"),
                                           (_Mlflow, config.mlflow.enabled)) if enabled and wanted]
        if not kinds:
            return
        # W&B's state stays in the project (run from its root), not $HOME; not ".wandb": wandb would write
        # its runs into <WANDB_DIR>/.wandb instead of <WANDB_DIR>/wandb if that existed.
        os.environ.setdefault("WANDB_DIR", os.getcwd())
        for variable, sub in (("WANDB_CACHE_DIR", "cache"), ("WANDB_DATA_DIR", "data"), ("WANDB_CONFIG_DIR", "config")):
            os.environ.setdefault(variable, os.path.join(os.getcwd(), ".wandb-state", sub))
        for kind in kinds:
            try:
                self._backends.append(kind(config, self, tags, params))
            except Exception as error:  # noqa: BLE001
                _warn_off(kind.label, "start", error, stacklevel=3)
        _OPEN.append(self)
        # Exit hooks run last first: registered after MLflow's thread pools, this one runs while they still
        # work (atexit would be too late). Python's threading uses the same hook for concurrent.futures.
        getattr(threading, "_register_atexit", atexit.register)(_suspend_open)

    def log_epoch(self, row: dict[str, float]) -> None:
        """One epoch's numbers, at step ``row["epoch"]``; sent now, stored in the background."""
        self._call("log", {k: v for k, v in row.items() if k != "epoch"}, int(row["epoch"]))

    def log_image(self, name: str, path: Path) -> None:
        self._call("image", name, Path(path).resolve())

    def log_artifact(self, path: Path, kind: str = "model") -> None:
        self._call("artifact", Path(path).resolve(), kind)

    def finish(self, summary: dict[str, Any] | None = None, status: str = "finished") -> None:
        """End the run (``finished``, ``failed`` or ``pruned``); the summary's numbers become MLflow
        metrics (``best.test.student.top1``) and W&B summary entries."""
        if status not in STATUSES:
            raise ValueError(f"status {status!r}: use one of {sorted(STATUSES)}")
        self._close("finish", flatten(summary or {}), status)

    def suspend(self) -> None:
        """The process stops before the last epoch (pre-empted); a Tracker with the same key continues the run."""
        self._close("suspend")

    def _call(self, action: str, *args: Any) -> None:
        for backend in list(self._backends):
            if (error := _attempt(backend, action, *args)) is not None:
                self._backends.remove(backend)
                _warn_off(backend.label, action, error)

    def _close(self, action: str, *args: Any) -> None:
        """Each backend stores and closes the run in a daemon thread; together they get CLOSE_TIMEOUT_S."""
        backends, self._backends = self._backends, []
        _OPEN[:] = [tracker for tracker in _OPEN if tracker is not self]
        errors: dict[str, Exception | None] = {}
        threads = [threading.Thread(target=lambda b=b: errors.update({b.label: _attempt(b, action, *args)}),
                                    name=f"tracking-{b.label}", daemon=True) for b in backends]
        deadline = time.monotonic() + CLOSE_TIMEOUT_S
        for thread in threads:
            thread.start()
        for backend, thread in zip(backends, threads):
            thread.join(max(0.0, deadline - time.monotonic()))
            error = TimeoutError(f"no answer within {CLOSE_TIMEOUT_S:g} s") if thread.is_alive() else errors[backend.label]
            if error is not None:
                _warn_off(backend.label, action, error)


def _attempt(backend: Any, action: str, *args: Any) -> Exception | None:
    try:
        getattr(backend, action)(*args)
    except Exception as error:  # noqa: BLE001  (a tracking outage must never end training)
        return error
    return None


def _warn_off(label: str, action: str, error: BaseException, stacklevel: int = 4) -> None:
    warnings.warn(f"{label}: {action} failed ({type(error).__name__}: {error}); {label} logging is off for the "
                  f"rest of this run", stacklevel=stacklevel)


def _suspend_open() -> None:
    """A process that ends without finishing its runs (an error outside the engine, a worker that
    stops) leaves them resumable rather than running forever."""
    for tracker in list(_OPEN):
        tracker.suspend()


def read_wandb_offline_run(run_dir: Path) -> dict[str, Any]:
    """Read back what an offline W&B run recorded (before `wandb sync`): config, history rows and summary.

    The ``run-<id>.wandb`` file is a LevelDB-style log: a 7-byte header, then 32 KiB blocks of records
    (4-byte CRC, 2-byte length, 1-byte kind: 1 full, 2 first, 3 middle, 4 last; zeros pad a block) carrying
    protobuf ``Record`` messages; wandb ships their schema but no reader. ``exit_code`` once the run finished."""
    import struct

    from wandb.proto import wandb_internal_pb2

    (log_file,) = Path(run_dir).glob("run-*.wandb")
    data, position, pending, block = log_file.read_bytes(), 7, b"", 32768
    result: dict[str, Any] = {"config": {}, "history": [], "summary": {}}
    while position + 7 <= len(data):
        if block - position % block < 7:  # too little of the block left for a header: its padding
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        pending, position = pending + data[position + 7:position + 7 + length], position + 7 + length
        if kind not in (1, 4):
            continue
        record, pending = wandb_internal_pb2.Record.FromString(pending), b""
        which = record.WhichOneof("record_type")
        if which == "exit":
            result["exit_code"] = record.exit.exit_code
        updates = {"run": record.run.config.update, "history": record.history.item, "summary": record.summary.update}
        if which in updates:
            values = {(item.key or "/".join(item.nested_key)): json.loads(item.value_json) for item in updates[which]}
            if which == "run":
                result["config"].update({k: v.get("value", v) if isinstance(v, dict) else v for k, v in values.items()})
            elif which == "history":
                result["history"].append(values)
            else:
                result["summary"].update(values)
    return result
