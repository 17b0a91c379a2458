"""One ``Tracker`` that fans out to W&B, MLflow and local files.

Local files (``history.tsv`` per epoch, ``metrics.json`` at the end) are what DVC reads and are
always written. W&B runs offline unless configured otherwise (``wandb sync`` uploads later); MLflow
writes to ``sqlite:///mlflow.db`` unless given another tracking URI. A tracking backend that fails
(no network, no login, a locked database) is switched off with one warning: tracking never fails
or hangs a training run.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import warnings
from pathlib import Path
from typing import Any

from reproduce.config import TrackingConfig
from reproduce.io import atomic_write_text

# W&B and MLflow write into $HOME and /tmp unless told otherwise, and MLflow phones home: keep both
# inside the project and quiet. Users can still point them elsewhere through the environment.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("WANDB_SILENT", "true")
# A tracking server that is down must cost seconds, not MLflow's default minutes of retries.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


def keep_wandb_local(root: Path) -> None:
    # Not ".wandb": wandb writes its runs into <WANDB_DIR>/.wandb instead of <WANDB_DIR>/wandb when that exists.
    os.environ.setdefault("WANDB_DIR", str(root))
    for variable, sub in (("WANDB_CACHE_DIR", "cache"), ("WANDB_DATA_DIR", "data"), ("WANDB_CONFIG_DIR", "config")):
        os.environ.setdefault(variable, str(root / ".wandb-state" / sub))


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
        if isinstance(value, dict):
            flat.update(flatten(value, name))
        else:
            flat[name] = value
    return flat


class _Backend:
    """A tracking service; any exception switches it off for the rest of the run."""

    label = "backend"

    def __init__(self) -> None:
        self.active = True

    def call(self, action: str, *args: Any, **kwargs: Any) -> None:
        if not self.active:
            return
        try:
            getattr(self, action)(*args, **kwargs)
        except Exception as error:  # noqa: BLE001  (a tracking outage must never end training)
            self.active = False
            warnings.warn(f"{self.label}: {action} failed ({type(error).__name__}: {error}); "
                          f"{self.label} logging is off for the rest of this run", stacklevel=2)


class WandbBackend(_Backend):
    label = "W&B"

    def __init__(self, config: TrackingConfig, *, run_name: str, run_id: str | None, tags: dict[str, str],
                 params: dict[str, Any], root: Path) -> None:
        super().__init__()
        self.run = None
        self.call("_start", config, run_name, run_id, tags, params, root)

    def _start(self, config: TrackingConfig, run_name: str, run_id: str | None, tags: dict[str, str],
               params: dict[str, Any], root: Path) -> None:
        keep_wandb_local(root)
        import wandb

        mode = os.environ.get("WANDB_MODE", config.wandb.mode)
        self.run = wandb.init(project=config.project, entity=config.wandb.entity, group=config.group,
                              name=run_name, id=run_id, resume="allow", mode=mode, config=params,
                              tags=[f"{k}:{v}" for k, v in tags.items()], dir=os.environ["WANDB_DIR"], reinit="create_new",
                              # The git commit is logged with the config; machine probes, requirement
                              # scans and job creation cost seconds per run and add nothing here.
                              settings=wandb.Settings(init_timeout=60, x_disable_stats=True, console="off",
                                                      x_disable_machine_info=True, x_save_requirements=False,
                                                      disable_git=True, save_code=False, disable_job_creation=True))

    @property
    def run_id(self) -> str | None:
        return self.run.id if self.run is not None else None

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def image(self, name: str, path: Path) -> None:
        import wandb

        self.run.log({name: wandb.Image(str(path))})

    def artifact(self, path: Path, kind: str) -> None:
        import wandb

        artifact = wandb.Artifact(name=f"{self.run.name}-{path.stem}".replace("/", "-"), type=kind)
        artifact.add_file(str(path))
        self.run.log_artifact(artifact)

    def summary(self, values: dict[str, Any]) -> None:
        self.run.summary.update(values)

    def finish(self, failed: bool) -> None:
        self.run.finish(exit_code=1 if failed else 0)

    def suspend(self) -> None:
        self.run.mark_preempting()
        self.run.finish(exit_code=0)


class MlflowBackend(_Backend):
    label = "MLflow"

    def __init__(self, config: TrackingConfig, *, run_name: str, run_id: str | None, tags: dict[str, str],
                 params: dict[str, Any]) -> None:
        super().__init__()
        self.client = None
        self.run_id: str | None = None
        self.call("_start", config, run_name, run_id, tags, params)

    def _start(self, config: TrackingConfig, run_name: str, run_id: str | None, tags: dict[str, str],
               params: dict[str, Any]) -> None:
        from mlflow.entities import Param, RunTag
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI", config.mlflow.tracking_uri)
        self.client = MlflowClient(uri)
        if run_id is not None:  # resuming: keep writing into the same run
            self.run_id = run_id
            self.client.update_run(run_id, status="RUNNING")
            return
        experiment = self.client.get_experiment_by_name(config.mlflow.experiment)
        experiment_id = (experiment.experiment_id if experiment else
                         self.client.create_experiment(config.mlflow.experiment, artifact_location=_artifact_root(uri)))
        all_tags = {**tags, "group": config.group, "mlflow.runName": run_name}
        run = self.client.create_run(experiment_id, run_name=run_name, tags=all_tags)
        self.run_id = run.info.run_id
        flat = flatten(params)
        # MLflow caps a param value at 6,000 characters and a batch at 100 params.
        entries = [Param(key, str(value)[:6000]) for key, value in flat.items()]
        for start in range(0, len(entries), 100):
            self.client.log_batch(self.run_id, params=entries[start:start + 100])
        self.client.log_batch(self.run_id, tags=[RunTag("mlflow.note.content", f"{run_name} ({config.group})")])

    def log(self, metrics: dict[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        # One log_batch per epoch: ~50x faster than per-metric calls on SQLite; NaN is not storable.
        entries = [Metric(key, float(value), now, step) for key, value in metrics.items() if math.isfinite(value)]
        for start in range(0, len(entries), 1000):
            self.client.log_batch(self.run_id, metrics=entries[start:start + 1000])

    def image(self, name: str, path: Path) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path="figures")

    def artifact(self, path: Path, kind: str) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path=kind)

    def summary(self, values: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(f"summary.{k}", str(v)) for k, v in values.items()])

    def finish(self, failed: bool) -> None:
        self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")

    def suspend(self) -> None:
        self.client.set_terminated(self.run_id, status="KILLED")  # resumed later into the same run


def _artifact_root(tracking_uri: str) -> str | None:
    """Artifacts of a SQLite store go next to the database file (MLflow's default is ./mlruns in
    whatever directory the process started in); a server decides for itself."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    return (Path(tracking_uri.removeprefix("sqlite:///")).resolve().parent / "mlartifacts").as_uri()


class Tracker:
    """Per-epoch metrics, images, artefacts and a final summary, to every configured destination."""

    def __init__(self, config: TrackingConfig, *, run_dir: Path, run_name: str, tags: dict[str, str],
                 params: dict[str, Any], history: list[dict[str, float]] | None = None,
                 resume_ids: dict[str, str | None] | None = None, root: Path | None = None,
                 services: bool = True) -> None:
        """``services=False`` writes only the local files (DDP ranks other than 0, quick tests)."""
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.history: list[dict[str, float]] = list(history or [])
        if self.history:  # resumed: DVC may have deleted the outputs of the interrupted run
            write_history(self.run_dir / "history.tsv", self.history)
        ids = resume_ids or {}
        root = Path(root or os.getcwd())
        self.backends: list[_Backend] = []
        if services and config.wandb.enabled and config.wandb.mode != "disabled":
            self.backends.append(WandbBackend(config, run_name=run_name, run_id=ids.get("wandb"), tags=tags,
                                              params=params, root=root))
        if services and config.mlflow.enabled:
            self.backends.append(MlflowBackend(config, run_name=run_name, run_id=ids.get("mlflow"), tags=tags,
                                               params=params))

    @property
    def ids(self) -> dict[str, str | None]:
        """Run ids to store in the checkpoint, so a resumed run continues the same tracked runs."""
        ids: dict[str, str | None] = {}
        for backend in self.backends:
            if isinstance(backend, WandbBackend):
                ids["wandb"] = backend.run_id
            elif isinstance(backend, MlflowBackend):
                ids["mlflow"] = backend.run_id
        return ids

    def log_epoch(self, row: dict[str, float]) -> None:
        """Record one epoch (``row["epoch"]`` is the step) everywhere, and rewrite history.tsv."""
        self.history.append(dict(row))
        write_history(self.run_dir / "history.tsv", self.history)
        for backend in self.backends:
            backend.call("log", {k: v for k, v in row.items() if k != "epoch"}, int(row["epoch"]))

    def log_image(self, name: str, path: Path) -> None:
        for backend in self.backends:
            backend.call("image", name, Path(path))

    def log_artifact(self, path: Path, kind: str = "model") -> None:
        for backend in self.backends:
            backend.call("artifact", Path(path), kind)

    def suspend(self) -> None:
        """The process stops before the last epoch (``--stop-after-epoch``); a resume continues these runs."""
        for backend in self.backends:
            backend.call("suspend")

    def finish(self, summary: dict[str, Any], failed: bool = False) -> None:
        if not failed:
            atomic_write_text(self.run_dir / "metrics.json", json.dumps(summary, indent=2, sort_keys=True) + "\n")
        flat = {k: v for k, v in flatten(summary).items() if isinstance(v, (int, float, str))}
        for backend in self.backends:
            backend.call("summary", flat)
            backend.call("finish", failed)


def write_history(path: Path, rows: list[dict[str, float]]) -> None:
    """Per-epoch table for ``dvc plots``: one row per epoch, a column per metric (union of keys)."""
    columns: list[str] = []
    for row in rows:
        columns.extend(key for key in row if key not in columns)
    lines = ["\t".join(columns)]
    lines += ["\t".join(_cell(row.get(column)) for column in columns) for row in rows]
    atomic_write_text(path, "\n".join(lines) + "\n")


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def read_wandb_offline_run(run_dir: Path) -> dict[str, Any]:
    """Read back what an offline W&B run recorded (before `wandb sync`): config, history rows and summary.

    The ``run-<id>.wandb`` file is a LevelDB-style log: a 7-byte header, then 32 KiB blocks of records
    (4-byte CRC, 2-byte length, 1-byte kind: 1 full, 2 first, 3 middle, 4 last) carrying protobuf
    ``Record`` messages. wandb ships the protobuf schema but no public reader for the log."""
    import struct

    from wandb.proto import wandb_internal_pb2

    (log_file,) = Path(run_dir).glob("run-*.wandb")
    data = log_file.read_bytes()
    block, position, pending = 32768, 7, b""
    result: dict[str, Any] = {"config": {}, "history": [], "summary": {}}

    def items(updates: Any) -> dict[str, Any]:
        return {(item.key or "/".join(item.nested_key)): json.loads(item.value_json) for item in updates}

    while position + 7 <= len(data):
        remaining = block - position % block
        if remaining < 7:  # block trailer padding
            position += remaining
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        position += 7
        if kind == 0:  # zero-filled rest of a block
            position += remaining - 7
            continue
        pending += data[position:position + length]
        position += length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            which = record.WhichOneof("record_type")
            if which == "run":
                result["config"].update({k: v.get("value", v) if isinstance(v, dict) else v
                                         for k, v in items(record.run.config.update).items()})
            elif which == "history":
                result["history"].append(items(record.history.item))
            elif which == "summary":
                result["summary"].update(items(record.summary.update))
    return result
