"""Where a launch's runs train: in this process one after the other, in a local pool of worker processes,
or on a SLURM cluster, as ``pipeline.devices``, ``pipeline.runs_per_device`` and ``pipeline.launcher`` say.

With the defaults (``devices: auto``, one run per device) the runs train here, one after the other, exactly
as before fan-out existed. More devices or more runs per device
start a pool (reproduce/launch/pool.py) of ``len(devices) * runs_per_device`` workers; ``launcher: slurm``
submits job arrays (reproduce/launch/cluster.py). Logs, the workers' orders and submitit's files go to the
launch folder (``<runs root>/launch/``), beside the runs, which keep the layout of sequential runs.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from reproduce.io import atomic_write_text
from reproduce.launch.board import Board
from reproduce.launch.devices import WorkerSlot, parse_devices, pinned_config, slot_environment, worker_slots
from reproduce.launch.report import Outcome, Report, summary_line
from reproduce.launch.runs import RunJob, RunOrder, finished

if TYPE_CHECKING:
    from reproduce.config import Config, PipelineConfig


@dataclass(frozen=True)
class Launch:
    name: str  # the recipe's or stage's name: SLURM's job name
    config: Config
    runs: list[RunJob]
    folder: Path  # <runs root>/launch: logs/, orders/, submitit/
    resume: str = "auto"
    track: bool = True


def plan_slots(pipeline: PipelineConfig, configured_threads: int) -> list[WorkerSlot]:
    """The worker slots of ``pipeline.devices`` x ``pipeline.runs_per_device``. The default (``auto``, one run
    per device) is one slot as configured (runtime.device): the runs one after the other here, on any
    machine; fanning out over a node's GPUs is asked for by naming them (``0,1,2,3``)."""
    if pipeline.devices == "auto" and pipeline.runs_per_device == 1:
        return [WorkerSlot()]
    devices = parse_devices(pipeline.devices, "pipeline.devices")
    workers = len(devices) * pipeline.runs_per_device
    return worker_slots(workers, devices, configured_threads)


def launch_runs(launch: Launch) -> Report:
    """Train every run of ``launch`` where the configuration says; the report says how each ended."""
    if launch.config.pipeline.launcher == "slurm":
        from reproduce.launch.cluster import run_on_cluster

        return run_on_cluster(launch)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under torchrun: every rank trains each run, on its own GPU
        return run_here(launch, WorkerSlot())
    slots = plan_slots(launch.config.pipeline, launch.config.runtime.threads)
    if len(slots) == 1:
        return run_here(launch, slots[0])
    from reproduce.launch.pool import run_pool

    outcomes = {run.name: Outcome(run, "done earlier") for run in launch.runs if finished(launch.config, run)}
    board = Board([run.name for run in launch.runs])
    for name, outcome in outcomes.items():
        board.set(name, outcome.state)
    completed = run_pool(launch.runs, slots, lambda run, slot: start_worker(launch, run, slot), board, outcomes,
                         launch.config.recipe.epochs)
    return Report.of(launch.runs, outcomes, interrupted=not completed)


def run_here(launch: Launch, slot: WorkerSlot) -> Report:
    """The runs one after the other in this process, the first error ending the launch (as before fan-out)."""
    from reproduce.train import train

    config = pinned_config(launch.config, slot, own_process=False)
    outcomes = {}
    for run in launch.runs:
        summary = train(config, run.spec(), resume=launch.resume, track=launch.track)
        outcomes[run.name] = Outcome(run, "done", detail=summary_line(summary))
        print(f"[{run.method}] seed {run.seed}: {summary_line(summary)} -> {run.run_dir}", flush=True)
    return Report.of(launch.runs, outcomes)


def start_worker(launch: Launch, run: RunJob, slot: WorkerSlot) -> tuple[subprocess.Popen, Path]:
    """Start ``run`` in a process of its own pinned to ``slot``, its output appended to its log."""
    order = launch.folder / "orders" / f"{run.file_stem}.json"
    config = pinned_config(launch.config, slot, own_process=True).to_dict()
    atomic_write_text(order, RunOrder(run, config, launch.resume, launch.track).to_json())
    log = launch.folder / "logs" / f"{run.file_stem}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as handle:
        handle.write(f"=== {datetime.now():%Y-%m-%d %H:%M:%S} {run.name} on {slot.describe()}\n")
        handle.flush()
        # A session of its own: a Ctrl-C at the terminal reaches the pool, which stops the workers itself.
        process = subprocess.Popen([sys.executable, "-m", "reproduce.launch", str(order)], stdin=subprocess.DEVNULL,
                                   stdout=handle, stderr=subprocess.STDOUT, start_new_session=True,
                                   env={**slot_environment(slot), "PYTHONUNBUFFERED": "1"})
    return process, log
