"""Tracking: what a run logs can be read back from MLflow and the W&B offline directory, and a
tracking outage never fails a run."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from conftest import PROJECT, tiny_config
from reproduce.engine import RunSpec, train
from reproduce.tracking import Tracker, read_wandb_offline_run, write_history


def _tracked_config(prepared_root: Path, tmp_path: Path, **sections):
    return tiny_config(prepared_root, tmp_path, tracking={
        "group": "test-group", "wandb": {"enabled": True, "mode": "offline"},
        "mlflow": {"enabled": True, "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "tests"}},
        **sections)


def test_a_tracked_run_can_be_read_back_from_mlflow_and_wandb(prepared_root: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # use the config's URI
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    config = _tracked_config(prepared_root, tmp_path)
    spec = RunSpec("vanilla", 1, tmp_path / "runs" / "vanilla" / "seed1", tmp_path / "ckpt")
    summary = train(config, spec)

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("tests")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED" and run.info.run_name == "vanilla-seed1"
    assert run.data.tags["method"] == "vanilla" and run.data.tags["dataset"] == "digits"
    assert run.data.tags["group"] == "test-group"
    assert run.data.params["recipe.epochs"] == "2" and run.data.params["run.commit"]
    history = client.get_metric_history(run.info.run_id, "test/student/top1")
    assert [m.step for m in history] == [1, 2]
    assert history[-1].value == pytest.approx(summary["last"]["test"]["student"]["top1"])
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id, "model")]
    assert artifacts == ["model/final.pt"]

    offline_runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 1
    logged = read_wandb_offline_run(offline_runs[0])
    assert logged["config"]["recipe"]["epochs"] == 2 and logged["config"]["run"]["method"] == "vanilla"
    assert [row["_step"] for row in logged["history"]] == [1, 2]
    assert logged["history"][-1]["test/student/top1"] == pytest.approx(summary["last"]["test"]["student"]["top1"])
    assert logged["summary"]["best.epoch"] == summary["best"]["epoch"]


def test_resumed_run_continues_the_same_tracked_runs(prepared_root: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    config = _tracked_config(prepared_root, tmp_path, recipe={"epochs": 2})
    spec = RunSpec("vanilla", 0, tmp_path / "run", tmp_path / "ckpt")
    train(config, spec, stop_after_epoch=1)
    train(config, spec)

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(runs[0].info.run_id, "val/student/top1")] == [1, 2]


def test_unreachable_tracking_never_fails_the_run(prepared_root: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    config = tiny_config(prepared_root, tmp_path, tracking={
        "wandb": {"enabled": False},
        # A closed port on loopback: a tracking server that is down.
        "mlflow": {"enabled": True, "tracking_uri": "http://127.0.0.1:9", "experiment": "x"}})
    with pytest.warns(UserWarning, match="MLflow: _start failed"):
        summary = train(config, RunSpec("vanilla", 0, tmp_path / "run", tmp_path / "ckpt"))
    assert summary["last"]["test"]["student"]["top1"] > 0
    assert (tmp_path / "run" / "metrics.json").exists()


def test_history_tsv_keeps_every_column_ever_logged(tmp_path: Path) -> None:
    path = tmp_path / "history.tsv"
    write_history(path, [{"epoch": 1, "a": 0.5}, {"epoch": 2, "a": 0.25, "signal/b": 1.0}])
    lines = path.read_text().splitlines()
    assert lines == ["epoch\ta\tsignal/b", "1\t0.5\t", "2\t0.25\t1"]


def test_tracker_without_services_only_writes_local_files(tmp_path: Path) -> None:
    from reproduce.config import TrackingConfig

    tracker = Tracker(TrackingConfig(), run_dir=tmp_path / "run", run_name="r", tags={}, params={}, services=False)
    tracker.log_epoch({"epoch": 1, "x": 1.0})
    tracker.finish({"done": True})
    assert not tracker.tracked and len(tracker.key) == 16
    assert (tmp_path / "run" / "metrics.json").exists() and (tmp_path / "run" / "history.tsv").exists()
    assert json.loads((tmp_path / "run" / "metrics.json").read_text()) == {"done": True}


# The tracking service: W&B and MLflow run in a child process that can die or stall without the run noticing.


def _mlflow_only(tmp_path: Path):
    from reproduce.config import config_from_dict

    return config_from_dict({"tracking": {"wandb": {"enabled": False}, "mlflow": {
        "enabled": True, "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "service"}}}).tracking


def _mlflow_runs(tmp_path: Path) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("service")  # None until the service has created it
    return client.search_runs([experiment.experiment_id]) if experiment else []


def test_a_dead_tracking_service_only_switches_tracking_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tracker = Tracker(_mlflow_only(tmp_path), run_dir=tmp_path / "run", run_name="r", tags={}, params={})
    tracker._service.process.kill()
    tracker._service.process.wait()
    with pytest.warns(UserWarning, match="tracking service exited"):
        tracker.log_epoch({"epoch": 1, "x": 1.0})
        tracker.finish({"top1": 0.5})
    assert json.loads((tmp_path / "run" / "metrics.json").read_text()) == {"top1": 0.5}
    # The next tracker of the same process gets a fresh service.
    other = Tracker(_mlflow_only(tmp_path), run_dir=tmp_path / "other", run_name="o", tags={}, params={})
    other.finish({})
    assert {run.info.run_name: run.info.status for run in _mlflow_runs(tmp_path)}["o"] == "FINISHED"


def test_a_stalled_tracking_service_costs_a_bounded_wait(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import signal

    import reproduce.tracking as tracking

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(tracking, "CLOSE_TIMEOUT_S", 1.0)
    tracker = Tracker(_mlflow_only(tmp_path), run_dir=tmp_path / "run", run_name="r", tags={}, params={})
    process = tracker._service.process
    process.send_signal(signal.SIGSTOP)  # a backend stuck on a network call looks like this from outside
    started = time.monotonic()
    with pytest.warns(UserWarning, match="no answer within 1 s"):
        tracker.finish({"top1": 0.5})
    assert time.monotonic() - started < 5
    assert process.wait(timeout=10) != 0  # abandoned and killed, not left behind
    assert (tmp_path / "run" / "metrics.json").exists()


def test_runs_of_a_killed_process_are_left_resumable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import subprocess
    import sys

    script = f"""
import os
import time
from pathlib import Path
from reproduce.config import config_from_dict
from reproduce.tracking import Tracker
config = config_from_dict({{"tracking": {{"wandb": {{"enabled": False}}, "mlflow": {{
    "enabled": True, "tracking_uri": "sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "service"}}}}}}).tracking
tracker = Tracker(config, run_dir=Path("{tmp_path / 'run'}"), run_name="killed", tags={{}}, params={{}})
tracker.log_epoch({{"epoch": 1, "x": 0.25}})
time.sleep(1)  # the writer thread hands the epoch to the service
print(tracker._service.process.pid, flush=True)
os._exit(0)  # no finish, no atexit: as if the process were killed
"""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    done = subprocess.run([sys.executable, "-c", script], check=True, cwd=PROJECT, timeout=120,
                          capture_output=True, text=True)
    service = int(done.stdout.split()[-1])
    deadline = time.monotonic() + 60
    while Path(f"/proc/{service}").exists() and time.monotonic() < deadline:  # orphaned, it finishes on its own
        time.sleep(0.2)
    runs = _mlflow_runs(tmp_path)
    assert runs[0].info.status == "KILLED" and runs[0].data.metrics == {"x": 0.25}
    # Resuming with the run's key continues that MLflow run instead of starting another.
    resumed = Tracker(_mlflow_only(tmp_path), run_dir=tmp_path / "run", run_name="killed", tags={}, params={},
                      resume_key=runs[0].data.tags["run_key"])
    resumed.log_epoch({"epoch": 2, "x": 0.5})
    resumed.finish({})
    (run,) = _mlflow_runs(tmp_path)
    assert run.info.status == "FINISHED" and run.data.metrics == {"x": 0.5}
