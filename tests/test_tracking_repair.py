"""Completing tracked runs from the run's own files: a resumed run sends each backend the epochs it lacks
(and none twice), a backend that failed is switched off once per process and the runs it missed are
listed in the ledger, and a finished rerun or `python -m reproduce.tracking sync` completes them.
Fast: backends fail through mocks here; the real outages, kills and a full disk are in
test_tracking_faults.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from reproduce.io import write_table
from reproduce.tracking import Tracker, forget_outages, ledger, repair_finished_run
from reproduce.tracking.__main__ import main as tracking_command
from test_tracking import _mlflow_runs, _tracker, _tracking, _wandb_runs, isolated, mlflow_store  # noqa: F401

ROWS = [{"epoch": epoch, "val/student/top1": 10.0 * epoch, "train/student/loss": 1.0 / epoch} for epoch in (1, 2, 3)]
SUMMARY = {"best": {"epoch": 3, "val": {"student": {"top1": 30.0}}}, "method": "kd"}


@pytest.fixture(autouse=True)
def _fresh_outages() -> None:
    forget_outages()  # each test's destinations are its own; this keeps a failure from leaking by accident
    yield
    forget_outages()


def _steps(tmp_path: Path, name: str = "r") -> dict[str, list[int]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = _mlflow_runs(tmp_path)[name]
    return {key: sorted(m.step for m in client.get_metric_history(run.info.run_id, key)) for key in ROWS[0] if key != "epoch"}


def _metrics_fail(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """MLflow refuses metric batches (params and tags still go through); returns the calls made."""
    from mlflow.tracking import MlflowClient

    log_batch, calls = MlflowClient.log_batch, []

    def refuse(self, run_id, metrics=(), **kwargs):
        if metrics:
            calls.append(len(metrics))
            raise ConnectionError("server went away")
        return log_batch(self, run_id, metrics=metrics, **kwargs)

    monkeypatch.setattr(MlflowClient, "log_batch", refuse)
    return calls


def test_a_resumed_run_gets_the_epochs_each_backend_lacks_and_none_twice(isolated: Path) -> None:
    config = _tracking(isolated)
    first = _tracker(config, isolated)
    for row in ROWS[:2]:
        first.log_epoch(row)
    first.suspend()
    # Epoch 3 was computed and checkpointed, but its process died before any backend had it.
    resumed = _tracker(config, isolated, resume_key=first.key, history=ROWS)
    resumed.log_epoch({"epoch": 4, "val/student/top1": 40.0, "train/student/loss": 0.25})
    resumed.finish({})
    assert _steps(isolated) == {"val/student/top1": [1, 2, 3, 4], "train/student/loss": [1, 2, 3, 4]}
    parts = _wandb_runs(isolated, first.key)
    assert [[row["_step"] for row in part["history"]] for part in parts] == [[1, 2], [3, 4]]
    assert parts[1]["history"][0]["val/student/top1"] == 30.0
    assert ledger.read(first.key) is None  # both backends hold everything: nothing left to repair


def test_the_ledger_lists_a_run_until_every_backend_has_finished_it(isolated: Path) -> None:
    import os

    tracker = _tracker(_tracking(isolated), isolated)
    entry = ledger.read(tracker.key)
    assert entry["pending"] == ["MLflow", "W&B"] and entry["owner"]["pid"] == os.getpid()
    assert entry["run"]["run_dir"] == str(isolated / "run") and entry["run"]["tags"]["method"] == "kd"
    tracker.finish({})
    assert ledger.read(tracker.key) is None


def test_a_failed_backend_is_skipped_for_the_rest_of_the_process_and_its_runs_listed(
        isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _metrics_fail(monkeypatch)
    config = _tracking(isolated)
    with pytest.warns(UserWarning, match="MLflow: log failed .*server went away") as caught:
        trackers = []
        for name in ("a", "b", "c"):
            tracker = _tracker(config, isolated, name=name)
            for row in ROWS:
                tracker.log_epoch(row)
            tracker.finish({})
            trackers.append(tracker)
    assert len(caught) == 1 and len(calls) == 1  # one failed request in the process, not one per run
    assert set(_mlflow_runs(isolated)) == {"a"}  # b and c were never sent
    for tracker in trackers:
        entry = ledger.read(tracker.key)
        assert entry["pending"] == ["MLflow"] and "server went away" in entry["reasons"]["MLflow"]
    assert [len(_wandb_runs(isolated, t.key)) for t in trackers] == [1, 1, 1]  # W&B carried on


def test_a_finished_rerun_completes_what_a_backend_missed(isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = _tracking(isolated)
    with monkeypatch.context() as patch, pytest.warns(UserWarning, match="MLflow: log failed"):
        _metrics_fail(patch)
        tracker = _tracker(config, isolated)
        for row in ROWS:
            tracker.log_epoch(row)
        tracker.finish(SUMMARY)
    assert _mlflow_runs(isolated)["r"].info.status == "RUNNING" and ledger.read(tracker.key)["pending"] == ["MLflow"]
    forget_outages()  # the server is back (a new process would not remember the outage either)

    assert repair_finished_run(tracker.key, ROWS, SUMMARY)
    run = _mlflow_runs(isolated)["r"]
    assert run.info.status == "FINISHED" and run.data.metrics["best.val.student.top1"] == 30.0
    assert _steps(isolated) == {"val/student/top1": [1, 2, 3], "train/student/loss": [1, 2, 3]}
    assert len(_wandb_runs(isolated, tracker.key)) == 1  # W&B had everything: not reopened
    assert ledger.read(tracker.key) is None
    assert not repair_finished_run(tracker.key, ROWS, SUMMARY)  # nothing listed: nothing to do


def test_sync_sends_listed_runs_from_their_files(isolated: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from mlflow.tracking import MlflowClient

    config = _tracking(isolated, wandb=False)
    finished_dir, stopped_dir = isolated / "finished", isolated / "stopped"
    with monkeypatch.context() as patch, pytest.warns(UserWarning, match="MLflow: start failed"):
        patch.setattr(MlflowClient, "create_run", lambda *args, **kwargs: (_ for _ in ()).throw(TimeoutError("no answer")))
        for run_dir in (finished_dir, stopped_dir):
            Tracker(config, run_dir=run_dir, run_name=run_dir.name, tags={"method": "kd"},
                    params={"recipe": {"epochs": 2}}).finish({})
    assert sorted(entry["run"]["name"] for entry in ledger.entries()) == ["finished", "stopped"]
    for run_dir in (finished_dir, stopped_dir):
        write_table(run_dir / "history.tsv", ROWS if run_dir == finished_dir else ROWS[:2])
    (finished_dir / "metrics.json").write_text(json.dumps(SUMMARY))
    forget_outages()

    assert tracking_command(["sync", "--dry-run"]) == 0
    assert "would send 3 epochs" in capsys.readouterr().out and not _mlflow_runs(isolated)
    assert tracking_command(["sync"]) == 0
    out = capsys.readouterr().out
    assert "finished (" in out and "sent 3 epochs" in out and "sent 2 epochs" in out and "ended KILLED" in out
    runs = _mlflow_runs(isolated)
    assert (runs["finished"].info.status, runs["stopped"].info.status) == ("FINISHED", "KILLED")
    assert _steps(isolated, "finished") == {"val/student/top1": [1, 2, 3], "train/student/loss": [1, 2, 3]}
    assert runs["finished"].data.tags["method"] == "kd" and runs["finished"].data.params["recipe.epochs"] == "2"
    assert tracking_command(["sync"]) == 0 and "nothing pending" in capsys.readouterr().out


def test_sync_leaves_runs_of_live_processes_alone(isolated: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tracker = _tracker(_tracking(isolated), isolated)
    entry = ledger.read(tracker.key)
    entry["owner"]["pid"] = 1  # another live process on this host holds it
    ledger.atomic_write_text(ledger.ledger_dir() / f"{tracker.key}.json", json.dumps(entry))
    assert tracking_command(["sync"]) == 0
    assert f"({tracker.key}): in use by process 1" in capsys.readouterr().out
    tracker.finish({})


def test_a_wandb_server_that_dies_mid_run_leaves_the_run_listed_and_sync_completes_it(
        isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """W&B's own behaviour when its server dies: ``finish`` stores what it has locally, gives up the
    upload after ``finish_timeout`` and (with ``finish_timeout_raises``, which the backend sets) raises."""
    import wandb
    from wandb.sdk.wandb_run import Run

    init, finish, settings = wandb.init, Run.finish, []
    monkeypatch.setattr(wandb, "init", lambda **kwargs: (settings.append(kwargs["settings"]), init(**kwargs))[1])

    def dead_server(self, *args, **kwargs):
        finish(self, *args, **kwargs)
        raise TimeoutError("Timed out finishing run.")

    config = _tracking(isolated, mlflow=False)
    run_dir = isolated / "run"
    with monkeypatch.context() as patch, pytest.warns(UserWarning, match=r"W&B: finish failed \(TimeoutError"):
        patch.setattr(Run, "finish", dead_server)
        tracker = Tracker(config, run_dir=run_dir, run_name="kd-seed0", tags={"method": "kd"}, params={})
        for row in ROWS:
            tracker.log_epoch(row)
        tracker.finish(SUMMARY)
    assert settings[0].finish_timeout_raises and settings[0].finish_timeout > 0
    assert ledger.read(tracker.key)["pending"] == ["W&B"]
    write_table(run_dir / "history.tsv", ROWS)
    (run_dir / "metrics.json").write_text(json.dumps(SUMMARY))
    forget_outages()

    assert tracking_command(["sync"]) == 0 and ledger.read(tracker.key) is None
    parts = _wandb_runs(isolated, tracker.key)
    assert sorted(row["_step"] for part in parts for row in part["history"]) == [1, 2, 3]  # each epoch once
    assert (parts[-1]["exit_code"], parts[-1]["summary"]["outcome"]) == (0, "finished")
    assert parts[-1]["summary"]["best.val.student.top1"] == 30.0
