"""Fan-out's parts (reproduce/launch/): pinning a worker to a device, the runs and what they wait for, the
pool's scheduling, failures and Ctrl-C with stand-in workers, the progress board, and the exact sbatch
options of a SLURM submission (submitted to a stand-in sbatch). tests/test_launch_runs.py trains real
recipes through the pool and submitit's local executor."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from io import StringIO
from pathlib import Path

import pytest

from reproduce.config import ConfigError, SlurmConfig
from reproduce.launch import Launch, RunJob, plan_slots, runs_for, with_teacher_dependencies
from reproduce.launch.board import Board
from reproduce.launch.cluster import Submission, executor_parameters
from reproduce.launch.devices import WorkerSlot, parse_devices, pinned_config, slot_environment, worker_slots
from reproduce.launch.pool import run_pool
from reproduce.launch.report import Outcome, Report, RunsFailedError
from tests.conftest import tiny_config

CORES = len(os.sched_getaffinity(0))


def test_workers_are_pinned_round_robin_with_the_cores_shared(tmp_path: Path) -> None:
    slots = worker_slots(3, ["0", "1"], configured_threads=0)
    assert [slot.device for slot in slots] == ["0", "1", "0"]
    assert {slot.threads for slot in slots} == {max(1, CORES // 3)}
    assert {slot.threads for slot in worker_slots(3, ["cpu"], configured_threads=2)} == {None}  # runtime.threads wins
    assert worker_slots(1, None, 0) == [WorkerSlot(0, None, None)]

    config = tiny_config(tmp_path, tmp_path, runtime={"threads": 0, "num_workers": 0})
    own = pinned_config(config, WorkerSlot(1, "1", 4), own_process=True)
    assert (own.runtime.device, own.runtime.threads, own.runtime.num_workers) == ("cuda", 4, 4)
    assert pinned_config(config, WorkerSlot(0, "1"), own_process=False).runtime.device == "cuda:1"
    assert pinned_config(config, WorkerSlot(0, "cpu", 1), own_process=True).runtime.device == "cpu"
    assert (config.runtime.device, config.runtime.threads) == ("auto", 0)  # the config itself is untouched
    # A worker's GPU index counts the GPUs its parent sees.
    assert slot_environment(WorkerSlot(0, "1"), {"CUDA_VISIBLE_DEVICES": "4,5"})["CUDA_VISIBLE_DEVICES"] == "5"
    assert slot_environment(WorkerSlot(0, "1"), {})["CUDA_VISIBLE_DEVICES"] == "1"
    assert "CUDA_VISIBLE_DEVICES" not in slot_environment(WorkerSlot(0, "cpu"), {})


def test_devices_are_checked_against_this_machine() -> None:
    import torch

    assert parse_devices(None) is None and parse_devices("cpu") == ["cpu"]
    with pytest.raises(ConfigError, match="pipeline.devices 'gpu0': give auto, cpu, or GPU indices"):
        parse_devices("gpu0", "pipeline.devices")
    if torch.cuda.device_count() < 8:
        with pytest.raises(ConfigError, match=r"--devices 7: this machine has \d+ CUDA device\(s\)"):
            parse_devices("7")
    if not torch.cuda.is_available():
        assert parse_devices("auto") == ["cpu"]


def test_the_default_trains_here_and_cpu_slots_split_the_threads(tmp_path: Path) -> None:
    config = tiny_config(tmp_path, tmp_path, runtime={"threads": 0})
    # devices auto, one run per device (the default): one run at a time, as configured, whatever the GPUs
    assert plan_slots(config.pipeline, 0) == [WorkerSlot()]
    two = tiny_config(tmp_path, tmp_path, pipeline={"devices": "cpu", "runs_per_device": 2}).pipeline
    assert plan_slots(two, 0) == [WorkerSlot(0, "cpu", max(1, CORES // 2)), WorkerSlot(1, "cpu", max(1, CORES // 2))]
    assert {slot.threads for slot in plan_slots(two, 1)} == {None}


def test_offline_runs_wait_for_the_teacher_they_distil_from(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    config = tiny_config(tmp_path, tmp_path, teacher={"seed": 1, "runs_root": str(root / "teacher")})
    runs = with_teacher_dependencies(runs_for(["teacher", "kd", "dml"], [0, 1], root, tmp_path / "ck"), config)
    assert {run.name: run.needs for run in runs} == {
        "teacher/seed0": None, "teacher/seed1": None, "kd/seed0": "teacher/seed1", "kd/seed1": "teacher/seed1",
        "dml/seed0": None, "dml/seed1": None}  # dml is online: it trains its own networks
    assert runs[2].run_dir == root / "kd" / "seed0" and runs[2].checkpoint_dir == tmp_path / "ck" / "kd" / "seed0"
    released = tiny_config(tmp_path, tmp_path, teacher={"checkpoint": "crd:resnet8"})
    assert all(run.needs is None for run in with_teacher_dependencies(runs, released))
    elsewhere = tiny_config(tmp_path, tmp_path)  # the teacher's runs_root is not this launch's
    assert all(run.needs is None for run in with_teacher_dependencies(runs_for(["teacher", "kd"], [0], root, root),
                                                                       elsewhere))


def test_the_board_redraws_a_table_on_a_terminal_and_prints_changes_otherwise() -> None:
    plain = StringIO()
    board = Board(["teacher/seed0", "kd/seed0"], plain, tty=False)
    board.set("teacher/seed0", "running", "epoch 1")
    board.set("teacher/seed0", "running", "epoch 2")  # no new line for an epoch
    board.set("kd/seed0", "failed", "exit code 1")
    assert plain.getvalue().splitlines() == ["teacher/seed0  running      epoch 1",
                                             "kd/seed0       failed       exit code 1"]
    terminal = StringIO()
    board = Board(["a", "b"], terminal, tty=True)
    board.set("a", "running")
    board.set("b", "done")
    assert terminal.getvalue().count("\x1b[2F") == 1  # the second draw went back over the two lines
    assert terminal.getvalue().endswith("\x1b[2Ka  running\n\x1b[2Kb  done\n")


def test_the_report_names_each_unfinished_run_with_its_log(tmp_path: Path) -> None:
    runs = runs_for(["teacher", "kd"], [0], tmp_path, tmp_path)
    report = Report.of(runs, {"teacher/seed0": Outcome(runs[0], "failed", tmp_path / "t.log", "exit code 1")})
    assert report.exit_code == 1 and report.lines()[:3] == [
        "0 of 2 runs done", f"  teacher/seed0: failed (exit code 1); log {tmp_path / 't.log'}",
        "  kd/seed0: not started"]
    with pytest.raises(RunsFailedError, match="teacher/seed0: failed"):
        report.summaries()
    assert Report.of(runs, {}, interrupted=True).exit_code == 130


def _stand_in(scripts: dict[str, str], log_dir: Path, started: list[str]):
    """A start function whose workers run ``sh -c SCRIPT`` instead of training."""

    def start(run: RunJob, slot: WorkerSlot) -> tuple[subprocess.Popen, Path]:
        started.append(run.name)
        log = log_dir / f"{run.file_stem}.log"
        with log.open("w") as handle:
            return subprocess.Popen(["sh", "-c", scripts[run.name]], stdout=handle, stderr=subprocess.STDOUT,
                                    start_new_session=True), log

    return start


@pytest.mark.slow
def test_a_failed_run_skips_its_students_and_the_others_finish(tmp_path: Path) -> None:
    runs = [RunJob("teacher", 0, tmp_path / "t0", tmp_path), RunJob("teacher", 1, tmp_path / "t1", tmp_path),
            RunJob("kd", 0, tmp_path / "k0", tmp_path, needs="teacher/seed0"),
            RunJob("vanilla", 0, tmp_path / "v0", tmp_path)]
    scripts = {"teacher/seed0": "echo broken; exit 3", "teacher/seed1": "sleep 0.3", "kd/seed0": "exit 0",
               "vanilla/seed0": "sleep 0.3"}
    started: list[str] = []
    outcomes: dict[str, Outcome] = {}
    board = Board([run.name for run in runs], StringIO(), tty=False)
    slots = worker_slots(2, ["cpu"], 1)
    assert run_pool(runs, slots, _stand_in(scripts, tmp_path, started), board, outcomes)
    assert {name: outcome.state for name, outcome in outcomes.items()} == {
        "teacher/seed0": "failed", "teacher/seed1": "done", "kd/seed0": "skipped", "vanilla/seed0": "done"}
    assert outcomes["teacher/seed0"].detail == "exit code 3" and "broken" in outcomes["teacher/seed0"].log.read_text()
    assert started == ["teacher/seed0", "teacher/seed1", "vanilla/seed0"]  # two slots: vanilla waited for one

    outcomes = {"teacher/seed0": Outcome(runs[0], "done earlier")}  # a rerun: its teacher is done, kd trains
    started.clear()
    assert run_pool(runs[:3], slots, _stand_in(scripts, tmp_path, started), board, outcomes)
    assert started == ["teacher/seed1", "kd/seed0"] and outcomes["kd/seed0"].state == "done"


@pytest.mark.slow
def test_ctrl_c_stops_every_worker_and_leaves_the_rest_unstarted(tmp_path: Path) -> None:
    runs = [RunJob("teacher", seed, tmp_path / str(seed), tmp_path) for seed in range(3)]
    scripts = {run.name: "exec sleep 30" for run in runs}
    outcomes: dict[str, Outcome] = {}
    started: list[str] = []
    board = Board([run.name for run in runs], StringIO(), tty=False)
    # The calling program may have replaced Python's Ctrl-C handler (an earlier test did): the pool still stops.
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT)).start()
    began = time.monotonic()
    try:
        completed = run_pool(runs, worker_slots(2, ["cpu"], 1), _stand_in(scripts, tmp_path, started), board,
                             outcomes)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert signal.getsignal(signal.SIGINT) is previous
    assert not completed and time.monotonic() - began < 10
    assert {name: outcome.state for name, outcome in outcomes.items()} == {"teacher/seed0": "interrupted",
                                                                           "teacher/seed1": "interrupted"}
    assert Report.of(runs, outcomes, interrupted=True).outcomes[2].state == "not started"


SBATCH = """#!/bin/sh
n=$(ls "$SBATCH_RECORD" | wc -l)
cp "$1" "$SBATCH_RECORD/$n.sh"
echo "Submitted batch job $((1000 + n))"
"""


def _sbatch_options(path: Path) -> list[str]:
    """The #SBATCH lines of a submitted script, without the log paths (they name the test's folder)."""
    return [line for line in path.read_text().splitlines()
            if line.startswith("#SBATCH") and not line.startswith(("#SBATCH --output", "#SBATCH --error"))]


@pytest.mark.slow
def test_slurm_arrays_carry_the_options_and_the_teacher_dependency(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    slurm = {"partition": "gpu", "time_min": 90, "gpus_per_task": 1, "cpus_per_task": 8, "array_parallelism": 2}
    assert executor_parameters(SlurmConfig(**slurm), "recipe-x", "afterok:7_0") == {
        "name": "recipe-x", "timeout_min": 90, "cpus_per_task": 8, "nodes": 1, "tasks_per_node": 1,
        "stderr_to_stdout": True, "slurm_array_parallelism": 2, "slurm_partition": "gpu", "slurm_gpus_per_task": 1,
        "slurm_dependency": "afterok:7_0", "slurm_additional_parameters": {"kill-on-invalid-dep": "yes"}}
    assert "slurm_gpus_per_task" not in executor_parameters(SlurmConfig(gpus_per_task=0), "x")

    bin_dir, record = tmp_path / "bin", tmp_path / "sbatch"
    bin_dir.mkdir(), record.mkdir()
    (bin_dir / "sbatch").write_text(SBATCH)
    (bin_dir / "srun").write_text("#!/bin/sh\n")  # submitit looks for it to believe it is on a cluster
    (bin_dir / "sacct").write_text("#!/bin/sh\ncat \"$SACCT_OUTPUT\"\n")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SBATCH_RECORD", str(record))
    root = tmp_path / "runs"
    config = tiny_config(tmp_path, tmp_path, pipeline={"launcher": "slurm", "slurm": slurm},
                         teacher={"runs_root": str(root / "teacher")})
    runs = with_teacher_dependencies(runs_for(["teacher", "kd"], [0, 1], root, tmp_path / "ck"), config)
    launch = Launch("recipe-x", config, runs, root / "launch")
    submission = Submission(launch, "slurm", Board([run.name for run in runs], StringIO(), tty=False))
    submission.submit_unfinished()
    common = ["#SBATCH --cpus-per-task=8", "#SBATCH --gpus-per-task=1", "#SBATCH --job-name=recipe-x",
              "#SBATCH --nodes=1", "#SBATCH --ntasks-per-node=1", "#SBATCH --open-mode=append",
              "#SBATCH --partition=gpu", "#SBATCH --signal=USR2@90", "#SBATCH --time=90", "#SBATCH --wckey=submitit"]
    assert _sbatch_options(record / "0.sh") == sorted(["#SBATCH --array=0-1%2", *common])
    assert _sbatch_options(record / "1.sh") == sorted(["#SBATCH --array=0-1%2", "#SBATCH --dependency=afterok:1000_0",
                                                       "#SBATCH --kill-on-invalid-dep=yes", *common])
    assert submission.recorded == {"teacher/seed0": "1000_0", "teacher/seed1": "1000_1", "kd/seed0": "1001_0",
                                   "kd/seed1": "1001_1"}

    # Pre-empted and rerun: what still runs or waits is followed, the rest (none finished) submitted again.
    sacct = tmp_path / "sacct.txt"
    sacct.write_text("JobID|State|NodeList\n1000_0|PREEMPTED|n1\n1000_1|RUNNING|n2\n1001_0|CANCELLED by 0|None\n"
                     "1001_1|PENDING|None\n")
    monkeypatch.setenv("SACCT_OUTPUT", str(sacct))
    again = Submission(launch, "slurm", Board([run.name for run in runs], StringIO(), tty=False))
    assert set(again.active) == {"teacher/seed1", "kd/seed1"}
    again.submit_unfinished()
    assert _sbatch_options(record / "2.sh") == sorted(common)  # teacher/seed0 alone: no array
    assert "#SBATCH --dependency=afterok:1002" in _sbatch_options(record / "3.sh")  # kd/seed0 after the new teacher
    assert again.recorded["teacher/seed0"] == "1002" and again.recorded["kd/seed0"] == "1003"
