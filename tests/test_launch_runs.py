"""A recipe of four runs (the teacher and KD, two seeds each, KD distilling from teacher seed 0) trained
one after the other, by a pool of two CPU workers and through submitit's local executor: the same
numbers and weights every way, a worker killed with SIGKILL reported with its log while the others
finish, and its run resumed to the same end on the next call. Every way fixes runtime.threads to 1:
the thread count changes CPU results."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import PROJECT

pytestmark = pytest.mark.slow

RUNS = ("teacher/seed0", "teacher/seed1", "kd/seed0", "kd/seed1")
RECIPE = {"pipeline": {"methods": ["teacher", "kd"], "seeds": [0, 1]}}


def _recipe_folder(folder: Path, prepared_root: Path) -> Path:
    folder.mkdir()
    (folder / "params.yaml").write_text(yaml.safe_dump({
        "dataset": {"name": "digits", "prepared_root": str(prepared_root), "val_fraction": 0.15,
                    "augment": {"crop_padding": 1, "flip": False}},
        "models": {"teacher": "resnet8", "student": "resnet8"},
        "recipe": {"epochs": 3, "batch_size": 64, "schedule": {"name": "cosine", "milestones": []}},
        "runtime": {"quiet": True, "threads": 1},
        "tracking": {"wandb": {"enabled": False}, "mlflow": {"enabled": False}}}))
    (folder / "tiny.yaml").write_text(yaml.safe_dump(RECIPE))
    return folder


def _recipe(folder: Path, *options: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "reproduce", "recipe", "tiny.yaml", "--no-track", *options],
                            cwd=folder, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONPATH": str(PROJECT)})


def _finish(process: subprocess.Popen) -> tuple[int, str]:
    out, _ = process.communicate(timeout=300)
    return process.returncode, out


@pytest.fixture(scope="module")
def sequential(prepared_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = _recipe_folder(tmp_path_factory.mktemp("launch") / "sequential", prepared_root)
    code, out = _finish(_recipe(folder))
    assert code == 0, out
    assert "4 of 4 runs done" in out and "[kd] seed 1: student test top-1" in out  # today's lines, in this process
    return folder / "runs-papers" / "tiny"


def _assert_same_runs(runs: Path, reference: Path) -> None:
    for name in RUNS:
        mine, theirs = (json.loads((root / name / "metrics.json").read_text()) for root in (runs, reference))
        assert {**mine, "time": None} == {**theirs, "time": None}, name
        weights, expected = (torch.load(root / name / "final.pt", weights_only=True) for root in (runs, reference))
        assert _same(weights, expected), name


def _same(a: object, b: object) -> bool:
    """Equal, tensors bit for bit, through nested dicts and lists."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[key], b[key]) for key in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _worker_of(order: str) -> int | None:
    """The process id of the pool's worker for ``order`` (its order file's name), if it runs."""
    for entry in Path("/proc").iterdir():
        try:
            command = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"reproduce.launch" in command and any(part.endswith(order.encode()) for part in command):
            return int(entry.name)
    return None


def test_two_workers_match_the_sequential_run_and_a_killed_worker_resumes(sequential: Path, prepared_root: Path,
                                                                          tmp_path: Path) -> None:
    folder = _recipe_folder(tmp_path / "pool", prepared_root)
    runs = folder / "runs-papers" / "tiny"
    pool = _recipe(folder, "--devices", "cpu", "--runs-per-device", "2")
    checkpoint = folder / "checkpoints" / "papers" / "tiny" / "kd" / "seed1" / "last.pt"
    deadline = time.monotonic() + 240
    while not checkpoint.exists() and pool.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    worker = _worker_of("kd-seed1.json")
    assert worker is not None and not (runs / "kd" / "seed1" / "metrics.json").exists()
    os.kill(worker, signal.SIGKILL)  # mid-run: epoch 1 of 3 is checkpointed
    code, out = _finish(pool)
    log = Path("runs-papers/tiny/launch/logs/kd-seed1.log")
    assert code == 1 and "3 of 4 runs done" in out, out
    assert f"  kd/seed1: failed (killed by SIGKILL); log {log}" in out
    assert "kd/seed0       done" in out and "[kd/seed0]" not in out  # progress lines, not the runs' own output
    assert (folder / log).is_file() and not (runs / "kd" / "seed1" / "metrics.json").exists()

    code, out = _finish(_recipe(folder, "--devices", "cpu", "--runs-per-device", "2"))
    assert code == 0 and "4 of 4 runs done" in out, out
    assert "teacher/seed0  done earlier" in out and "kd/seed0       done earlier" in out
    assert out.count("running") == 1  # only the killed run trained again, from its checkpoint
    assert "interrupted" not in out
    _assert_same_runs(runs, sequential)
    assert (runs / "launch" / "orders" / "kd-seed1.json").is_file()


def test_submitit_local_executor_matches_the_sequential_run(sequential: Path, prepared_root: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from reproduce.config import load_config
    from reproduce.launch import Launch, runs_for, with_teacher_dependencies
    from reproduce.launch.cluster import run_on_cluster

    folder = _recipe_folder(tmp_path / "submitit", prepared_root)
    monkeypatch.chdir(folder)  # the tasks start where the command was given, as sbatch's do
    root = Path("runs-papers/tiny")
    config = load_config("params.yaml", extra={**RECIPE, "teacher": {"runs_root": str(root / "teacher")}})
    runs = with_teacher_dependencies(runs_for(["teacher", "kd"], [0, 1], root, Path("checkpoints/papers/tiny")), config)
    report = run_on_cluster(Launch("recipe-tiny", config, runs, root / "launch", track=False), cluster="local")
    assert report.exit_code == 0, report.lines()
    _assert_same_runs(root, sequential)
    logs = sorted((root / "launch" / "submitit").glob("*_0_log.out"))
    assert len(logs) == 4 and all("Job completed successfully" in log.read_text() for log in logs)
    assert "kd/seed1] student test top-1" in "".join(log.read_text() for log in logs)

    again = run_on_cluster(Launch("recipe-tiny", config, runs, root / "launch", track=False), cluster="local")
    assert [outcome.state for outcome in again.outcomes] == ["done earlier"] * 4  # nothing submitted again
    assert len(list((root / "launch" / "submitit").glob("*_0_log.out"))) == 4
