"""Tracking under real faults, as an operator meets them: training processes SIGKILLed at random moments
and rerun, a tracking server that accepts connections and never answers, W&B online with no server, a
full disk, and several processes writing one SQLite store. Every test here spawns processes or
servers, so all are slow."""

from __future__ import annotations

import json
import math
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import PROJECT, tiny_config
from reproduce.tracking import ledger, read_wandb_offline_run
from test_tracking import _tracking, mlflow_store  # noqa: F401

pytestmark = pytest.mark.slow

TRAIN = """
import json, sys
from pathlib import Path
from reproduce.config import config_from_dict
from reproduce.train import RunSpec, train
config, run_dir, checkpoints = json.loads(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
train(config_from_dict(config), RunSpec("vanilla", 0, run_dir, checkpoints))
"""


def _environment(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "WANDB_DIR": str(tmp_path), "REPRODUCE_TRACKING_DIR": str(tmp_path / "tracking-state"),
            "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "PYTHONPATH": str(PROJECT), **extra}


def _rows(path: Path) -> int:
    return max(0, len(path.read_text().splitlines()) - 1) if path.is_file() else 0


def _kill_when(process: subprocess.Popen, ready, delay_s: float, deadline_s: float = 600) -> bool:
    """SIGKILL the training process ``delay_s`` after ``ready()`` holds; False if it ended first."""
    deadline = time.monotonic() + deadline_s
    while not ready():
        if process.poll() is not None:
            return False
        assert time.monotonic() < deadline, "the training process never got there"
        time.sleep(0.01)
    time.sleep(delay_s)
    if process.poll() is not None:
        return False
    process.send_signal(signal.SIGKILL)
    process.wait()
    return True


def test_random_kills_leave_every_tracked_history_equal_to_history_tsv(prepared_root: Path, tmp_path: Path,
                                                                      mlflow_store: Path) -> None:
    from mlflow.tracking import MlflowClient

    epochs = 4
    config = tiny_config(prepared_root, tmp_path, recipe={"epochs": epochs}, tracking={
        "group": "faults", "wandb": {"enabled": True, "mode": "offline"},
        "mlflow": {"enabled": True, "experiment": "faults"}}).to_dict()
    run_dir, checkpoints = tmp_path / "runs" / "vanilla" / "seed0", tmp_path / "checkpoints"
    history, metrics = run_dir / "history.tsv", run_dir / "metrics.json"
    command = [sys.executable, "-c", TRAIN, json.dumps(config), str(run_dir), str(checkpoints)]
    rng = random.Random(2207)
    # During an epoch (any point of it: steps, evaluation, the checkpoint write), and just after metrics.json.
    moments = [(lambda: _rows(history) >= 1, rng.uniform(0, 1.5)), (lambda: _rows(history) >= 2, rng.uniform(0, 1.5)),
               (lambda: _rows(history) >= epochs - 1, rng.uniform(0.5, 2.0)), (metrics.is_file, 0.0)]
    kills = 0
    for ready, delay in moments:
        with subprocess.Popen(command, cwd=PROJECT, env=_environment(tmp_path), stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE) as process:
            kills += _kill_when(process, ready, delay)
    assert kills >= 3
    done = subprocess.run(command, cwd=PROJECT, env=_environment(tmp_path), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    rows = ledger.read_history(history)
    assert [row["epoch"] for row in rows] == list(range(1, epochs + 1))
    expected = {(name, row["epoch"]): value for row in rows for name, value in row.items()
                if name != "epoch" and math.isfinite(value)}
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("faults")
    runs = client.search_runs([experiment.experiment_id])
    assert [(run.info.run_name, run.info.status) for run in runs] == [("vanilla-seed0", "FINISHED")]  # no orphan
    tracked = {(name, m.step): m.value for name in {name for name, _ in expected}
               for m in client.get_metric_history(runs[0].info.run_id, name)}
    counts = [(name, m.step) for name in {name for name, _ in expected}
              for m in client.get_metric_history(runs[0].info.run_id, name)]
    assert len(counts) == len(set(counts)), "an epoch reached MLflow twice"
    _assert_same(tracked, expected, "MLflow")

    # A kill during W&B's start-up leaves a run folder without a log file: nothing of it was ever recorded.
    parts = [read_wandb_offline_run(path) for path in sorted((tmp_path / "wandb").glob("offline-run-*"))
             if any(path.glob("run-*.wandb"))]
    steps = [row["_step"] for part in parts for row in part["history"]]
    assert sorted(steps) == list(range(1, epochs + 1)), f"W&B holds steps {steps}"
    logged = {(name, row["_step"]): value for part in parts for row in part["history"]
              for name, value in row.items() if not name.startswith("_")}
    _assert_same(logged, expected, "W&B")
    assert any(part.get("exit_code") == 0 and part["summary"].get("outcome") == "finished" for part in parts)
    assert not _ledger(tmp_path)  # nothing left to repair


def _ledger(tmp_path: Path) -> list[Path]:
    return list((tmp_path / "tracking-state" / "pending").glob("*.json"))


def _assert_same(tracked: dict, expected: dict, label: str) -> None:
    """Every (metric, epoch) of history.tsv, no other, with its value, wall-clock timings included: the loop
    sends an epoch to the trackers only once its checkpoint is on disk, so an epoch that a kill made run
    twice reaches them from the run that completed it."""
    assert set(tracked) == set(expected), f"{label}: lacks {sorted(set(expected) - set(tracked))[:5]}, " \
                                          f"extra {sorted(set(tracked) - set(expected))[:5]}"
    for (name, step), value in expected.items():  # history.tsv keeps 6 significant digits
        assert tracked[name, step] == pytest.approx(value, rel=1e-5, abs=1e-9), (label, name, step)


class SilentServer:
    """Accepts TCP connections and never answers; counts them."""

    def __init__(self) -> None:
        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.socket.listen(16)
        self.connections: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self.socket.accept()
            except OSError:
                return
            self.connections.append(connection)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.socket.getsockname()[1]}"

    def close(self) -> None:
        for connection in self.connections:
            connection.close()
        self.socket.close()


OUTAGE = """
import sys, time, warnings
from pathlib import Path
from reproduce.config import config_from_dict
from reproduce.tracking import Tracker
config = config_from_dict({"tracking": {"wandb": {"enabled": %(wandb)s, "mode": "online"}, "mlflow": {
    "enabled": %(mlflow)s, "tracking_uri": sys.argv[1], "experiment": "outage"}}}).tracking
warnings.simplefilter("always")
for name in ("a", "b", "c"):
    started = time.monotonic()
    tracker = Tracker(config, run_dir=Path(sys.argv[2]) / name, run_name=name, tags={"method": "kd"}, params={})
    for epoch in (1, 2):
        tracker.log_epoch({"epoch": epoch, "x": 1.0})
    tracker.finish({})
    print(f"{name} {time.monotonic() - started:.2f}", flush=True)
"""


def _outage_run(tmp_path: Path, server: SilentServer, *, wandb: bool, mlflow: bool, **environment: str) -> tuple[list[float], str]:
    script = OUTAGE % {"wandb": wandb, "mlflow": mlflow}
    done = subprocess.run([sys.executable, "-c", script, server.url, str(tmp_path)], cwd=PROJECT, timeout=300,
                          env=_environment(tmp_path, MLFLOW_TRACKING_URI=server.url, **environment),
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return [float(line.split()[1]) for line in done.stdout.splitlines()], done.stderr


def test_a_tracking_server_that_never_answers_costs_one_wait_per_process(tmp_path: Path) -> None:
    server = SilentServer()
    try:
        seconds, stderr = _outage_run(tmp_path, server, wandb=False, mlflow=True,
                                      MLFLOW_HTTP_REQUEST_TIMEOUT="2", MLFLOW_HTTP_REQUEST_MAX_RETRIES="0")
    finally:
        server.close()
    # The first run waits for the timeout once; the next runs of the process do not try again.
    assert seconds[0] >= 2 and max(seconds[1:]) < 1.5, seconds
    assert len(server.connections) == 1
    assert stderr.count("MLflow: start failed") == 1 and stderr.count("UserWarning") == 1 and "timed out" in stderr
    entries = [json.loads(path.read_text()) for path in _ledger(tmp_path)]
    assert sorted(e["run"]["name"] for e in entries) == ["a", "b", "c"] and all(e["pending"] == ["MLflow"] for e in entries)


def test_wandb_online_without_a_server_costs_one_short_wait_per_process(tmp_path: Path) -> None:
    server = SilentServer()
    try:
        seconds, stderr = _outage_run(tmp_path, server, wandb=True, mlflow=False, WANDB_MODE="online",
                                      WANDB_BASE_URL=server.url, WANDB_API_KEY="x" * 40, WANDB_INIT_TIMEOUT="3")
    finally:
        server.close()
    assert seconds[0] >= 3 and max(seconds[1:]) < 1.5, seconds
    assert stderr.count("W&B: start failed") == 1 and stderr.count("UserWarning") == 1
    assert sorted(json.loads(p.read_text())["run"]["name"] for p in _ledger(tmp_path)) == ["a", "b", "c"]


FULL_DISK = """
set -e
mount -t tmpfs -o size=4m tmpfs "$DISK"
cd "$DISK"
export WANDB_DIR="$DISK" WANDB_CACHE_DIR="$DISK/c" WANDB_DATA_DIR="$DISK/d" WANDB_CONFIG_DIR="$DISK/cfg"
export MLFLOW_TRACKING_URI="sqlite:///$DISK/mlflow.db"
cp "$TEMPLATE" "$DISK/mlflow.db"
exec "$PYTHON" -c '
import os
from pathlib import Path
from reproduce.config import config_from_dict
from reproduce.tracking import Tracker

def fill_the_disk():
    with open("filler", "wb") as filler:
        try:
            while True:
                filler.write(bytes(65536)); filler.flush()
        except OSError:
            pass

config = config_from_dict({"tracking": {"mlflow": {"experiment": "e"}}}).tracking
run = Path("run"); run.mkdir(); (run / "final.pt").write_bytes(os.urandom(100_000))
if os.environ["FILL_AT"] == "start":
    fill_the_disk()
tracker = Tracker(config, run_dir=run, run_name="r", tags={"method": "kd"}, params={"a": 1})
for epoch in range(1, 40):
    tracker.log_epoch({"epoch": epoch, **{f"m{k}": float(k) for k in range(50)}})
    if epoch == 3 and os.environ["FILL_AT"] == "epoch 3":
        fill_the_disk()
tracker.log_artifact(run / "final.pt")
tracker.finish({"top1": 1.0})
print("training went on")
'
"""


@pytest.mark.parametrize("fill_at", ["start", "epoch 3"])
def test_a_full_disk_costs_one_line_and_never_the_run(tmp_path: Path, empty_mlflow_store: Path, fill_at: str) -> None:
    """A real full disk: a 4 MiB tmpfs in a private mount namespace (``unshare``) holding W&B's folder
    and the MLflow store, full before the run starts or from its third epoch. The ledger lives on
    another disk here, so W&B meets the full disk itself (before: 557 lines of W&B logging errors)."""
    probe = subprocess.run(["unshare", "-rm", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("no private mount namespace here (unshare -rm) for a tiny tmpfs")
    disk = tmp_path / "disk"
    disk.mkdir()
    done = subprocess.run(["unshare", "-rm", "sh", "-c", FULL_DISK], cwd=PROJECT, timeout=300, capture_output=True,
                          text=True, env={**_environment(tmp_path), "DISK": str(disk), "PYTHON": sys.executable,
                                          "TEMPLATE": str(empty_mlflow_store), "FILL_AT": fill_at})
    assert done.returncode == 0 and "training went on" in done.stdout, done.stderr[-3000:]
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert re.search(r"UserWarning: .*(disk is full|No space left on device).*free some space", lines[0]), lines


CONCURRENT = """
import sys
from pathlib import Path
from reproduce.config import config_from_dict
from reproduce.tracking import Tracker
worker, runs, epochs = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
config = config_from_dict({"tracking": {"wandb": {"enabled": False}, "mlflow": {
    "tracking_uri": sys.argv[1], "experiment": "shared"}}}).tracking
for index in range(runs):
    tracker = Tracker(config, run_dir=Path("."), run_name=f"w{worker}-r{index}", tags={"method": "kd"},
                      params={"p": {str(k): k for k in range(70)}})
    for epoch in range(1, epochs + 1):
        tracker.log_epoch({"epoch": epoch, **{f"m{k}": float(epoch) for k in range(40)}})
    tracker.finish({"top1": 1.0})
"""


def test_concurrent_processes_share_one_sqlite_store(tmp_path: Path) -> None:
    """4 processes x 3 runs x 20 epochs on a store none of them has created yet (the hardest start)."""
    from mlflow.tracking import MlflowClient

    uri, workers, runs, epochs = f"sqlite:///{tmp_path / 'shared.db'}", 4, 3, 20
    started = time.monotonic()
    processes = [subprocess.Popen([sys.executable, "-c", CONCURRENT, uri, str(w), str(runs), str(epochs)], cwd=PROJECT,
                                  env=_environment(tmp_path, MLFLOW_TRACKING_URI=uri), stderr=subprocess.PIPE, text=True)
                 for w in range(workers)]
    errors = [process.communicate(timeout=600)[1] for process in processes]
    assert [process.returncode for process in processes] == [0] * workers, errors
    assert not any("UserWarning" in error for error in errors), errors
    client = MlflowClient(uri)
    found = client.search_runs([client.get_experiment_by_name("shared").experiment_id], max_results=100)
    assert len(found) == workers * runs and {run.info.status for run in found} == {"FINISHED"}
    assert all(len(client.get_metric_history(run.info.run_id, "m0")) == epochs for run in found)
    print(f"{workers} processes x {runs} runs x {epochs} epochs on one new SQLite store: {time.monotonic() - started:.1f} s")
