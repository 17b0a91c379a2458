"""Tracking: what a run logs can be read back from MLflow and the W&B offline directory, and a
tracking outage never fails a run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import tiny_config
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
    assert tracker.backends == []
    assert json.loads((tmp_path / "run" / "metrics.json").read_text()) == {"done": True}
