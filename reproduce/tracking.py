"""One ``Tracker`` that fans out to W&B, MLflow and local files.

Local files (``history.tsv`` per epoch, ``metrics.json`` at the end) are what DVC reads and are
always written. W&B runs offline unless configured otherwise (``wandb sync`` uploads later); MLflow
writes to ``sqlite:///mlflow.db`` unless given another tracking URI. Both run in a child process,
the tracking service, so that their start-up overlaps training. A tracking backend that fails
(no network, no login, a locked database) is switched off with one warning, and a service that does
not answer within a bounded time is abandoned: tracking never fails or hangs a training run.
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import math
import os
import queue
import subprocess
import sys
import threading
import uuid
import warnings
from pathlib import Path
from typing import IO, Any, Callable

from reproduce.config import TrackingConfig, config_from_dict
from reproduce.io import atomic_write_text

# W&B and MLflow write into $HOME and /tmp unless told otherwise, and MLflow phones home: keep both
# inside the project and quiet. Users can still point them elsewhere through the environment.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("WANDB_SILENT", "true")
# A tracking server that is down must cost seconds, not MLflow's default minutes of retries.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


# A run's key names it in both services (W&B run id; MLflow tag): a resumed run finds its runs again.
RUN_KEY_TAG = "run_key"


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
    """A tracking destination; any exception switches it off for the rest of the run."""

    label = "backend"

    def __init__(self, report: Callable[[str], None] | None) -> None:
        self.active = True
        self.report = report or (lambda message: warnings.warn(message, stacklevel=4))

    def call(self, action: str, *args: Any, **kwargs: Any) -> None:
        if not self.active:
            return
        try:
            getattr(self, action)(*args, **kwargs)
        except Exception as error:  # noqa: BLE001  (a tracking outage must never end training)
            self.active = False
            self.report(f"{self.label}: {action} failed ({type(error).__name__}: {error}); "
                        f"{self.label} logging is off for the rest of this run")


class WandbBackend(_Backend):
    label = "W&B"

    def __init__(self, config: TrackingConfig, *, run_name: str, run_key: str, resuming: bool, tags: dict[str, str],
                 params: dict[str, Any], root: Path, report: Callable[[str], None] | None = None) -> None:
        super().__init__(report)
        self.run = None
        self.call("_start", config, run_name, run_key, tags, params, root)

    def _start(self, config: TrackingConfig, run_name: str, run_key: str, tags: dict[str, str],
               params: dict[str, Any], root: Path) -> None:
        keep_wandb_local(root)
        import wandb

        mode = os.environ.get("WANDB_MODE", config.wandb.mode)
        self.run = wandb.init(project=config.project, entity=config.wandb.entity, group=config.group,
                              name=run_name, id=run_key, resume="allow", mode=mode, config=params,
                              tags=[f"{k}:{v}" for k, v in tags.items()], dir=os.environ["WANDB_DIR"], reinit="create_new",
                              # The git commit is logged with the config; machine probes, requirement
                              # scans and job creation cost seconds per run and add nothing here.
                              settings=wandb.Settings(init_timeout=60, x_disable_stats=True, console="off",
                                                      x_disable_machine_info=True, x_save_requirements=False,
                                                      disable_git=True, save_code=False, disable_job_creation=True))

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

    def __init__(self, config: TrackingConfig, *, run_name: str, run_key: str, resuming: bool, tags: dict[str, str],
                 params: dict[str, Any], report: Callable[[str], None] | None = None) -> None:
        super().__init__(report)
        self.client = None
        self.run_id: str | None = None
        self.call("_start", config, run_name, run_key, resuming, tags, params)

    def _start(self, config: TrackingConfig, run_name: str, run_key: str, resuming: bool, tags: dict[str, str],
               params: dict[str, Any]) -> None:
        from mlflow.entities import Param, RunTag
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI", config.mlflow.tracking_uri)
        self.client = MlflowClient(uri)
        experiment = self.client.get_experiment_by_name(config.mlflow.experiment)
        experiment_id = (experiment.experiment_id if experiment else
                         self.client.create_experiment(config.mlflow.experiment, artifact_location=_artifact_root(uri)))
        if resuming:  # keep writing into the run this key started
            found = self.client.search_runs([experiment_id], filter_string=f"tags.{RUN_KEY_TAG} = '{run_key}'",
                                            max_results=1)
            if found:
                self.run_id = found[0].info.run_id
                self.client.update_run(self.run_id, status="RUNNING")
                return
        all_tags = {**tags, "group": config.group, "mlflow.runName": run_name, RUN_KEY_TAG: run_key}
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
    """Per-epoch metrics, images, artefacts and a final summary, to every configured destination.

    Local files are written here; W&B and MLflow calls go to this process's tracking service and
    return at once, except ``finish``/``suspend``, which wait until everything logged is stored, so
    that the next process or a test can read it back."""

    def __init__(self, config: TrackingConfig, *, run_dir: Path, run_name: str, tags: dict[str, str],
                 params: dict[str, Any], history: list[dict[str, float]] | None = None,
                 resume_key: str | None = None, root: Path | None = None, services: bool = True) -> None:
        """``resume_key``: the ``key`` of the run to continue. ``services=False`` writes only the local
        files (DDP ranks other than 0, quick tests)."""
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.history: list[dict[str, float]] = list(history or [])
        if self.history:  # resumed: DVC may have deleted the outputs of the interrupted run
            write_history(self.run_dir / "history.tsv", self.history)
        # Chosen here, not by the services, so that a checkpoint can hold it without waiting for them.
        self.key = resume_key or uuid.uuid4().hex[:16]
        self._service: TrackingService | None = None
        self._handle = -1
        if services and wants_services(config):
            self._service = tracking_service()
            self._handle = self._service.open(
                config=dataclasses.asdict(config), run_name=run_name, run_key=self.key, resuming=resume_key is not None,
                tags=tags, params=params, root=str(Path(root or os.getcwd()).resolve()))

    @property
    def tracked(self) -> bool:
        """Whether W&B or MLflow receive this run (the local files always do)."""
        return self._service is not None

    def log_epoch(self, row: dict[str, float]) -> None:
        """Record one epoch (``row["epoch"]`` is the step) everywhere, and rewrite history.tsv."""
        self.history.append(dict(row))
        write_history(self.run_dir / "history.tsv", self.history)
        self._send("log", metrics={k: v for k, v in row.items() if k != "epoch"}, step=int(row["epoch"]))

    def log_image(self, name: str, path: Path) -> None:
        self._send("image", name=name, path=str(Path(path).resolve()))

    def log_artifact(self, path: Path, kind: str = "model") -> None:
        self._send("artifact", path=str(Path(path).resolve()), kind=kind)

    def suspend(self) -> None:
        """The process stops before the last epoch (``--stop-after-epoch``); a resume continues these runs."""
        self._close("suspend")

    def finish(self, summary: dict[str, Any], failed: bool = False) -> None:
        if not failed:
            atomic_write_text(self.run_dir / "metrics.json", json.dumps(summary, indent=2, sort_keys=True) + "\n")
        flat = {k: v for k, v in flatten(summary).items() if isinstance(v, (int, float, str))}
        self._close("finish", summary=flat, failed=failed)

    def _send(self, op: str, **fields: Any) -> None:
        if self._service is not None:
            self._service.send({"op": op, "run": self._handle, **fields})
            self._service.raise_warnings()

    def _close(self, op: str, **fields: Any) -> None:
        if self._service is None:
            return
        self._send(op, **fields)
        self._service.wait_closed(self._handle, CLOSE_TIMEOUT_S)
        self._service.raise_warnings()
        self._service = None


# ----------------------------------------------------------------------------------------------
# The tracking service: W&B and MLflow run in a child process.
#
# Importing and starting them costs about 9 s per process on a 2-core CPU (MLflow's SQLAlchemy
# store, W&B's service), as long as a whole run of the embedded default. In a child
# process that work overlaps the parent's torch import and training, and a stuck backend can make
# the parent wait only for a bounded time. One service per process serves every run the process
# tracks (a sweep's trials); it speaks JSON lines over its stdin and stdout.

# Opening a run (W&B's init_timeout is 60 s, MLflow's HTTP retries are bounded) and storing a large
# final checkpoint on a remote artifact server both fit in this.
CLOSE_TIMEOUT_S = 600.0


def wants_services(config: TrackingConfig) -> bool:
    return (config.wandb.enabled and config.wandb.mode != "disabled") or config.mlflow.enabled


class TrackingService:
    """The parent's end: a writer thread feeds the child, so logging never blocks training; a reader
    thread collects which runs the child has closed, and its warnings."""

    def __init__(self) -> None:
        project = str(Path(__file__).resolve().parent.parent)
        environment = {**os.environ, "PYTHONPATH": os.pathsep.join(
            filter(None, [project, os.environ.get("PYTHONPATH")]))}
        self.process = subprocess.Popen([sys.executable, "-m", "reproduce.tracking"], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True, env=environment)
        self.alive = True
        self.closed: set[int] = set()
        self.warnings: list[str] = []
        self.changed = threading.Condition()
        self.outbox: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self.runs_opened = 0
        threading.Thread(target=self._write, name="tracking-writer", daemon=True).start()
        threading.Thread(target=self._read, name="tracking-reader", daemon=True).start()
        atexit.register(self.close)

    def open(self, **fields: Any) -> int:
        handle = self.runs_opened
        self.runs_opened += 1
        # The child applies this process's W&B/MLflow environment, which may have changed since it started.
        environment = {k: v for k, v in os.environ.items() if k.startswith(("WANDB_", "MLFLOW_"))}
        self.send({"op": "open", "run": handle, "environment": environment, **fields})
        return handle

    def send(self, message: dict[str, Any]) -> None:
        if self.alive:
            self.outbox.put(json.dumps(message, default=str))

    def wait_closed(self, handle: int, timeout: float) -> None:
        """Wait until the child has stored and closed run ``handle``; a child that died or is stuck
        switches tracking off."""
        with self.changed:
            self.changed.wait_for(lambda: handle in self.closed or not self.alive, timeout)
            if handle in self.closed:
                return
            if self.alive:
                self.warnings.append(f"tracking service: no answer within {timeout:.0f} s; "
                                     f"W&B and MLflow logging is off for the rest of this process")
                self.alive = False
                self.process.kill()
            elif not any(message.startswith("tracking service") for message in self.warnings):
                self.warnings.append(f"tracking service exited (code {self.process.poll()}); "
                                     f"W&B and MLflow logging is off for the rest of this process")

    def raise_warnings(self) -> None:
        """Re-issue the child's warnings in the calling thread, where the caller (and pytest) sees them."""
        with self.changed:
            pending, self.warnings = self.warnings, []
        for message in pending:
            warnings.warn(message, stacklevel=3)

    def close(self) -> None:
        """End of input lets the child finish and exit on its own; nobody waits for its teardown."""
        self.outbox.put(None)

    def _write(self) -> None:
        try:
            while (line := self.outbox.get()) is not None:
                self.process.stdin.write(line + "\n")
                self.process.stdin.flush()
            self.process.stdin.close()
        except (OSError, ValueError):
            self._mark_dead()

    def _read(self) -> None:
        for line in self.process.stdout:
            try:
                message = json.loads(line)
            except json.JSONDecodeError:
                continue
            with self.changed:
                if "warning" in message:
                    self.warnings.append(message["warning"])
                else:
                    self.closed.add(message["closed"])
                self.changed.notify_all()
        self._mark_dead()

    def _mark_dead(self) -> None:
        with self.changed:
            self.alive = False
            self.changed.notify_all()


_service: TrackingService | None = None


def tracking_service() -> TrackingService:
    global _service
    if _service is None or not _service.alive:
        _service = TrackingService()
    return _service


def start_tracking_service(config: TrackingConfig) -> None:
    """Start the service before importing torch, so that the two imports overlap."""
    if wants_services(config):
        tracking_service()


def serve(commands: IO[str], replies: IO[str]) -> None:
    """The child's loop: open, log to and close runs as the parent asks, until its input ends."""
    runs: dict[int, list[_Backend]] = {}

    def answer(**message: Any) -> None:
        replies.write(json.dumps(message, default=str) + "\n")
        replies.flush()

    for line in commands:
        message = json.loads(line)
        handle, op = message["run"], message["op"]
        backends = runs.get(handle, [])
        if op == "open":
            _apply_environment(message["environment"])
            runs[handle] = _open_backends(message, report=lambda text: answer(warning=text))
        elif op == "log":
            for backend in backends:
                backend.call("log", message["metrics"], message["step"])
        elif op == "image":
            for backend in backends:
                backend.call("image", message["name"], Path(message["path"]))
        elif op == "artifact":
            for backend in backends:
                backend.call("artifact", Path(message["path"]), message["kind"])
        elif op == "finish":
            for backend in runs.pop(handle, []):
                backend.call("summary", message["summary"])
                backend.call("finish", message["failed"])
            answer(closed=handle)
        elif op == "suspend":
            for backend in runs.pop(handle, []):
                backend.call("suspend")
            answer(closed=handle)
    for backends in runs.values():  # the parent died mid-run: leave its runs resumable
        for backend in backends:
            backend.call("suspend")


def _apply_environment(environment: dict[str, str]) -> None:
    for key in [k for k in os.environ if k.startswith(("WANDB_", "MLFLOW_")) and k not in environment]:
        del os.environ[key]
    os.environ.update(environment)


def _open_backends(message: dict[str, Any], report: Callable[[str], None]) -> list[_Backend]:
    config = config_from_dict({"tracking": message["config"]}).tracking
    common = {"run_name": message["run_name"], "run_key": message["run_key"], "resuming": message["resuming"],
              "tags": message["tags"], "params": message["params"], "report": report}
    backends: list[_Backend] = []
    if config.wandb.enabled and config.wandb.mode != "disabled":
        backends.append(WandbBackend(config, root=Path(message["root"]), **common))
    if config.mlflow.enabled:
        backends.append(MlflowBackend(config, **common))
    return backends


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


if __name__ == "__main__":
    # Training keeps every core busy; the service's start-up should fill the gaps, not slow it down.
    os.nice(10)
    # The reply channel is a private copy of stdout; whatever W&B or MLflow print goes to stderr.
    reply_channel = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    serve(sys.stdin, reply_channel)
    # Every run is finished or suspended and stored; the interpreter's teardown of MLflow and W&B
    # (about a second of CPU) would only compete with the next stage's start.
    sys.stderr.flush()
    os._exit(0)
