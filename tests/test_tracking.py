"""Tracking: what a run logs can be read back from MLflow and the W&B offline directory, runs resume
and nest, and a tracking backend that fails or hangs never fails or hangs a run. No test touches the
network: W&B runs offline and MLflow writes to SQLite under tmp_path."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest

from conftest import PROJECT, tiny_config
from reproduce.config import TrackingConfig, config_from_dict
from reproduce.tracking import Tracker, git_commit, read_wandb_offline_run
from reproduce.tracking.wandb_file import offline_parts


def _tracking_raw(tmp_path: Path, wandb: bool = True, mlflow: bool = True, uri: str | None = None) -> dict:
    return {"group": "test-group", "wandb": {"enabled": wandb, "mode": "offline"}, "mlflow": {
        "enabled": mlflow, "tracking_uri": uri or f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "tests"}}


def _tracking(tmp_path: Path, **choices) -> TrackingConfig:
    return config_from_dict({"tracking": _tracking_raw(tmp_path, **choices)}).tracking


@pytest.fixture
def mlflow_store(tmp_path: Path, empty_mlflow_store: Path) -> Path:
    shutil.copyfile(empty_mlflow_store, tmp_path / "mlflow.db")
    return tmp_path / "mlflow.db"


@pytest.fixture
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mlflow_store: Path) -> Path:
    """The config's MLflow URI (not the session's), W&B runs under tmp_path/wandb, the ledger in tmp_path."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("REPRODUCE_TRACKING_DIR", str(tmp_path / "tracking-state"))
    return tmp_path


def _mlflow_runs(tmp_path: Path) -> dict:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("tests")
    return {run.info.run_name: run for run in client.search_runs([experiment.experiment_id])} if experiment else {}


def _wandb_runs(tmp_path: Path, key: str) -> list[dict]:
    return [read_wandb_offline_run(path) for path in offline_parts(tmp_path / "wandb", key)]


def _tracker(config: TrackingConfig, tmp_path: Path, name: str = "r", **kwargs) -> Tracker:
    return Tracker(config, run_dir=tmp_path / "run", run_name=name, tags={"method": "kd"},
                   params={"recipe": {"epochs": 2}}, **kwargs)


# Through the engine


@pytest.mark.slow
def test_a_trained_run_can_be_read_back_from_mlflow_and_wandb(prepared_root: Path, isolated: Path) -> None:
    from mlflow.tracking import MlflowClient

    from reproduce.train import RunSpec, train

    tmp_path = isolated
    config = tiny_config(prepared_root, tmp_path, tracking=_tracking_raw(tmp_path))
    started = time.time() * 1000
    summary = train(config, RunSpec("vanilla", 1, tmp_path / "runs" / "vanilla" / "seed1", tmp_path / "ckpt"))

    run = _mlflow_runs(tmp_path)["vanilla-seed1"]
    assert run.info.status == "FINISHED" and run.data.tags["outcome"] == "finished"
    assert started <= run.info.start_time <= run.info.end_time <= time.time() * 1000
    assert run.data.tags["method"] == "vanilla" and run.data.tags["group"] == "test-group-vanilla"
    assert run.data.tags["run_dir"] == str(tmp_path / "runs" / "vanilla" / "seed1")
    assert run.data.tags["mlflow.source.git.commit"] == git_commit()["commit"]
    assert run.data.params["recipe.epochs"] == "2" and run.data.params["run.commit"]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    history = client.get_metric_history(run.info.run_id, "test/student/top1")
    assert [m.step for m in history] == [1, 2]
    assert history[-1].value == pytest.approx(summary["last"]["test"]["student"]["top1"])
    # Best and last numbers are metrics (sortable in the runs table), not only tags.
    assert run.data.metrics["best.test.student.top1"] == pytest.approx(summary["best"]["test"]["student"]["top1"])
    assert run.data.metrics["best.epoch"] == summary["best"]["epoch"]
    assert [a.path for a in client.list_artifacts(run.info.run_id, "model")] == ["model/final.pt"]

    (logged,) = [read_wandb_offline_run(path) for path in (tmp_path / "wandb").glob("offline-run-*")]
    assert logged["config"]["recipe"]["epochs"] == 2 and logged["config"]["run"]["method"] == "vanilla"
    assert [row["_step"] for row in logged["history"]] == [1, 2]
    assert logged["history"][-1]["test/student/top1"] == pytest.approx(summary["last"]["test"]["student"]["top1"])
    assert logged["summary"]["best.epoch"] == summary["best"]["epoch"] and logged["exit_code"] == 0
    assert (logged["group"], logged["job_type"]) == ("test-group-vanilla", "train")  # seeds of one method together


@pytest.mark.slow
def test_a_pre_empted_training_run_continues_the_same_tracked_runs(prepared_root: Path, isolated: Path) -> None:
    from mlflow.tracking import MlflowClient

    from reproduce.train import RunSpec, train

    tmp_path = isolated
    config = tiny_config(prepared_root, tmp_path, tracking=_tracking_raw(tmp_path), recipe={"epochs": 2})
    spec = RunSpec("vanilla", 0, tmp_path / "runs" / "vanilla" / "seed0", tmp_path / "ckpt")
    train(config, spec, stop_after_epoch=1)
    assert _mlflow_runs(tmp_path)["vanilla-seed0"].info.status == "KILLED"
    train(config, spec)
    (run,) = _mlflow_runs(tmp_path).values()
    assert run.info.status == "FINISHED"
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/student/top1")] == [1, 2]
    # Each call wrote a part of one W&B run, whose id is the MLflow run's key: `wandb sync` joins them.
    parts = _wandb_runs(tmp_path, run.data.tags["run_key"])
    assert [[row["_step"] for row in part["history"]] for part in parts] == [[1], [2]]


@pytest.mark.slow
def test_unreachable_tracking_never_fails_the_run(prepared_root: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from reproduce.train import RunSpec, train

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    config = tiny_config(prepared_root, tmp_path, tracking={
        "wandb": {"enabled": False}, "mlflow": {"enabled": True, "tracking_uri": _closed_port_uri(), "experiment": "x"}})
    started = time.monotonic()
    with pytest.warns(UserWarning, match="MLflow: start failed") as caught:
        summary = train(config, RunSpec("vanilla", 0, tmp_path / "run", tmp_path / "ckpt"))
    assert time.monotonic() - started < 60
    assert summary["last"]["test"]["student"]["top1"] > 0
    assert len([w for w in caught if "MLflow" in str(w.message)]) == 1


def _closed_port_uri() -> str:
    """A tracking server that is down: a loopback port nobody listens on."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}"


# The Tracker itself


@pytest.mark.slow
def test_importing_tracking_loads_neither_backend_and_turns_telemetry_off() -> None:
    script = ("import os, sys; import reproduce.tracking; "
              "print(sorted(m for m in ('wandb', 'mlflow') if m in sys.modules), os.environ['MLFLOW_DISABLE_TELEMETRY'])")
    environment = {"PATH": "/usr/bin:/bin", "HOME": "/nonexistent"}
    done = subprocess.run([sys.executable, "-c", script], cwd=PROJECT, env=environment, capture_output=True,
                          text=True, timeout=60, check=True)
    assert done.stdout.split() == ["[]", "true"]


def test_a_disabled_tracker_tracks_nothing_and_writes_no_files(tmp_path: Path) -> None:
    tracker = _tracker(_tracking(tmp_path), tmp_path, enabled=False)
    tracker.log_epoch({"epoch": 1, "x": 1.0})
    tracker.finish({"top1": 1.0})
    assert len(tracker.key) == 16 and not list(tmp_path.iterdir())


def test_finish_records_outcome_summary_metrics_and_times(isolated: Path) -> None:
    tmp_path = isolated
    config = _tracking(tmp_path)
    outcomes = {}
    for status in ("finished", "pruned", "failed"):
        tracker = _tracker(config, tmp_path, name=status)
        tracker.log_epoch({"epoch": 1, "val/student/top1": 10.0, "nan": float("nan")})
        time.sleep(0.01)
        tracker.finish({"best": {"epoch": 1, "val": {"student": {"top1": 10.0}}}, "networks": ["student"]}, status=status)
        outcomes[status] = tracker.key
    runs = _mlflow_runs(tmp_path)
    assert {name: (run.info.status, run.data.tags["outcome"]) for name, run in runs.items()} == {
        "finished": ("FINISHED", "finished"), "pruned": ("FINISHED", "pruned"), "failed": ("FAILED", "failed")}
    run = runs["pruned"]
    assert run.data.metrics == {"val/student/top1": 10.0, "best.epoch": 1.0, "best.val.student.top1": 10.0}
    assert run.data.tags["summary.networks"] == "['student']" and run.data.tags["git.dirty"] in ("true", "false")
    assert run.info.end_time > run.info.start_time
    exits = {status: _wandb_runs(tmp_path, key)[0] for status, key in outcomes.items()}
    assert {status: (logged["exit_code"], logged["summary"]["outcome"]) for status, logged in exits.items()} == {
        "finished": (0, "finished"), "pruned": (0, "pruned"), "failed": (1, "failed")}
    assert exits["pruned"]["summary"]["best.val.student.top1"] == 10.0
    with pytest.raises(ValueError, match="status"):
        _tracker(config, tmp_path, enabled=False).finish(status="stopped")


def test_a_run_nests_under_its_parent(isolated: Path) -> None:
    tmp_path = isolated
    config = _tracking(tmp_path)
    study = _tracker(config, tmp_path, name="study", job_type="sweep")
    trial = _tracker(config, tmp_path, name="trial-0", parent=study)
    trial.finish({})
    study.finish({})
    runs = _mlflow_runs(tmp_path)
    assert runs["trial-0"].data.tags["mlflow.parentRunId"] == runs["study"].info.run_id
    assert runs["trial-0"].data.tags["group"] == "test-group" and "mlflow.parentRunId" not in runs["study"].data.tags
    (logged,) = _wandb_runs(tmp_path, trial.key)
    assert (logged["group"], logged["job_type"]) == ("test-group", "sweep")


def test_a_suspended_run_is_resumed_by_its_key(isolated: Path) -> None:
    tmp_path = isolated
    config = _tracking(tmp_path)
    first = _tracker(config, tmp_path)
    first.log_epoch({"epoch": 1, "x": 0.25})
    first.suspend()
    (run,) = _mlflow_runs(tmp_path).values()
    assert run.info.status == "KILLED" and run.data.tags["run_key"] == first.key
    resumed = _tracker(config, tmp_path, resume_key=first.key)
    deadline = time.monotonic() + 30  # the run reopens in the background
    while _mlflow_runs(tmp_path)["r"].info.status != "RUNNING":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    resumed.log_epoch({"epoch": 2, "x": 0.5})
    resumed.finish({})
    (run,) = _mlflow_runs(tmp_path).values()
    assert run.info.status == "FINISHED" and run.data.metrics == {"x": 0.5}
    assert [[row["x"] for row in part["history"]] for part in _wandb_runs(tmp_path, first.key)] == [[0.25], [0.5]]


@pytest.mark.slow
def test_a_process_that_ends_without_finishing_leaves_its_runs_resumable(tmp_path: Path, mlflow_store: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    script = f"""
from pathlib import Path
from reproduce.config import config_from_dict
from reproduce.tracking import Tracker
config = config_from_dict({{"tracking": {{"wandb": {{"enabled": True, "mode": "offline"}}, "mlflow": {{
    "enabled": True, "tracking_uri": "sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "tests"}}}}}}).tracking
tracker = Tracker(config, run_dir=Path("{tmp_path}"), run_name="left", tags={{}}, params={{}})
tracker.log_epoch({{"epoch": 1, "x": 0.25}})
print(tracker.key)
raise SystemExit(3)  # neither finish nor suspend: the error happened outside the engine
"""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    done = subprocess.run([sys.executable, "-c", script], cwd=PROJECT, timeout=120, capture_output=True, text=True)
    assert done.returncode == 3, done.stderr
    run = _mlflow_runs(tmp_path)["left"]
    assert run.info.status == "KILLED" and run.data.metrics == {"x": 0.25}
    # The exit hook ran before W&B's own teardown: the W&B part is suspended (pre-empted), with its epoch.
    (part,) = _wandb_runs(tmp_path, done.stdout.strip())
    assert part["preempted"] and part["exit_code"] == 0 and [row["x"] for row in part["history"]] == [0.25]


def test_a_failing_backend_is_switched_off_with_one_warning(isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow.tracking import MlflowClient

    tmp_path = isolated
    tracker = _tracker(_tracking(tmp_path), tmp_path)

    log_batch = MlflowClient.log_batch

    def broken(self, run_id, metrics=(), **kwargs):
        if metrics:
            raise RuntimeError("no such table: metrics")
        return log_batch(self, run_id, metrics=metrics, **kwargs)

    monkeypatch.setattr(MlflowClient, "log_batch", broken)
    with pytest.warns(UserWarning) as caught:
        for epoch in (1, 2, 3):
            tracker.log_epoch({"epoch": epoch, "x": float(epoch)})
        tracker.finish({"top1": 1.0})
    assert [str(w.message) for w in caught] == [
        "MLflow: log failed (RuntimeError: no such table: metrics); MLflow logging is off for the rest of this "
        "process (the runs it misses are kept for `python -m reproduce.tracking sync`)"]
    (logged,) = _wandb_runs(tmp_path, tracker.key)  # W&B carried on
    assert [row["x"] for row in logged["history"]] == [1, 2, 3] and logged["summary"]["top1"] == 1.0
    assert _mlflow_runs(tmp_path)["r"].info.status == "RUNNING"  # left as it was; a resume continues it


def test_a_batch_that_fails_in_the_background_switches_mlflow_off_at_the_next_epoch(
        isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    log_batch, failed = SqlAlchemyStore.log_batch, threading.Event()

    def full(self, run_id, metrics, params, tags):
        if metrics:
            failed.set()
            raise OSError("read-only file system")
        return log_batch(self, run_id, metrics, params, tags)

    monkeypatch.setattr(SqlAlchemyStore, "log_batch", full)  # what MLflow's client calls, in the run's thread
    tracker = _tracker(_tracking(isolated, wandb=False), isolated)
    tracker.log_epoch({"epoch": 1, "x": 1.0})
    assert failed.wait(10)
    time.sleep(0.2)  # the thread records the failure right after the call raised
    with pytest.warns(UserWarning, match=r"MLflow: log failed .*read-only file system") as caught:
        tracker.log_epoch({"epoch": 2, "x": 2.0})  # reported here, before the run ends
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tracker.finish({})
    assert len(caught) == 1


def test_a_hanging_backend_costs_a_bounded_wait(isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from reproduce.tracking import BACKENDS, tracker as tracker_module

    tmp_path = isolated
    tracker = _tracker(_tracking(tmp_path), tmp_path)
    never = threading.Event()
    monkeypatch.setattr(tracker_module, "CLOSE_TIMEOUT_S", 1.0)
    monkeypatch.setattr(BACKENDS.get("mlflow"), "finish", lambda self, summary, status: never.wait(60))
    started = time.monotonic()
    with pytest.warns(UserWarning, match=r"MLflow: finish failed \(TimeoutError: no answer within 1 s\)"):
        tracker.finish({"top1": 1.0})
    assert time.monotonic() - started < 3
    assert _wandb_runs(tmp_path, tracker.key)[0]["exit_code"] == 0  # the other backend still finished
    never.set()


def test_a_tracking_server_that_does_not_answer_costs_a_bounded_wait(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "1")  # the defaults (10 s, 1 retry) would cost about 20 s
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with socket.socket() as silent:  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        started = time.monotonic()
        with pytest.warns(UserWarning, match="MLflow: start failed .*timed out"):
            tracker = _tracker(_tracking(tmp_path, wandb=False, uri=f"http://127.0.0.1:{silent.getsockname()[1]}"), tmp_path)
            tracker.log_epoch({"epoch": 1, "x": 1.0})
            tracker.finish({})
        assert time.monotonic() - started < 10


@pytest.mark.slow
def test_a_process_does_not_use_a_wandb_service_it_inherited(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A sweep's worker or a test's subprocess inherits ``WANDB_SERVICE`` from the process that started W&B: a
    run logged through that service is lost when its owner ends (here the owner is gone from the start)."""
    script = f"""
from pathlib import Path
from reproduce.config import config_from_dict
from reproduce.tracking import Tracker
config = config_from_dict({{"tracking": {{"wandb": {{"enabled": True, "mode": "offline"}},
                                          "mlflow": {{"enabled": False}}}}}}).tracking
tracker = Tracker(config, run_dir=Path("{tmp_path}"), run_name="child", tags={{}}, params={{}})
tracker.log_epoch({{"epoch": 1, "x": 0.25}})
tracker.finish({{}})
print(tracker.key)
"""
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SERVICE", f"3-1-unix-{tmp_path / 'gone.sock'}")  # started by another process
    done = subprocess.run([sys.executable, "-c", script], cwd=PROJECT, timeout=120, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    (part,) = _wandb_runs(tmp_path, done.stdout.strip())
    assert [row["x"] for row in part["history"]] == [0.25]


def test_wandb_state_stays_in_the_project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for variable in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR"):
        monkeypatch.delenv(variable)
    monkeypatch.chdir(tmp_path)  # the project root of a process run from it
    tracker = _tracker(_tracking(tmp_path, mlflow=False), tmp_path)
    tracker.finish({})
    assert len(_wandb_runs(tmp_path, tracker.key)) == 1
    assert {variable: os.environ[variable] for variable in ("WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR")} == {
        "WANDB_CACHE_DIR": str(tmp_path / ".wandb-state" / "cache"), "WANDB_DATA_DIR": str(tmp_path / ".wandb-state" / "data"),
        "WANDB_CONFIG_DIR": str(tmp_path / ".wandb-state" / "config")}


def test_a_locked_sqlite_store_is_retried_then_switched_off_with_a_pointer_to_a_server(
        isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow.tracking import MlflowClient

    from reproduce.tracking.backends import mlflow_backend

    monkeypatch.setattr(mlflow_backend, "LOCKED_RETRY_PAUSES_S", (0.01, 0.02))
    log_batch, locked_for = MlflowClient.log_batch, {"calls": 2}

    def busy(self, run_id, metrics=(), **kwargs):
        if metrics and locked_for["calls"] > 0:
            locked_for["calls"] -= 1
            raise RuntimeError("(sqlite3.OperationalError) database is locked")
        return log_batch(self, run_id, metrics=metrics, **kwargs)

    monkeypatch.setattr(MlflowClient, "log_batch", busy)
    config = _tracking(isolated, wandb=False)
    tracker = _tracker(config, isolated, name="waited")
    tracker.log_epoch({"epoch": 1, "x": 1.0})  # locked twice, stored at the third try
    tracker.finish({})
    assert _mlflow_runs(isolated)["waited"].data.metrics == {"x": 1.0}

    locked_for["calls"] = 10
    with pytest.warns(UserWarning, match=r"StoreLockedError: .*locked through 2 retries.*MLFLOW_TRACKING_URI") as caught:
        tracker = _tracker(config, isolated, name="gave-up")
        tracker.log_epoch({"epoch": 1, "x": 1.0})
        tracker.finish({})
    assert len(caught) == 1 and locked_for["calls"] == 7  # one call and two retries, then off
