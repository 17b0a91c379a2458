"""Workers: processes on this machine that share a study and its budget, each pinned to a device.

``--devices 0,1`` gives worker i the GPU ``devices[i % len(devices)]`` (its own process sees only that
GPU: ``CUDA_VISIBLE_DEVICES``); ``--devices cpu`` runs every worker on the CPU. Either way the CPU
threads are split between the workers unless ``runtime.threads`` sets them.
"""

from __future__ import annotations

import copy
import dataclasses
import multiprocessing
import multiprocessing.connection
import os
import time
from dataclasses import dataclass
from typing import Any

import optuna

from reproduce.config import ConfigError
from reproduce.tracking import Tracker
from sweeps.budget import StopAtBudget, budget_started, fail_interrupted_trials, study_storage, trials_to_wait_for
from sweeps.objective import TrialObjective, TrialSeededTPESampler, trial_line
from sweeps.plan import SweepJob, make_pruner
from sweeps.settings import objectives
from sweeps.storage import storage_errors
from sweeps.tracked import close_study_run, open_study_run

POLL_S = 2.0  # how often a worker with nothing left to start looks at the trials still running elsewhere


@dataclass(frozen=True)
class WorkerSlot:
    """Where worker ``index`` runs: ``device`` "cpu", a CUDA index ("1"), or None (runtime.device as
    configured); ``threads``: its CPU threads (None: runtime.threads as configured)."""

    index: int = 0
    device: str | None = None
    threads: int | None = None


def parse_devices(text: str | None) -> list[str] | None:
    """``--devices``: None (not given), ``auto`` (every visible GPU, else the CPU), ``cpu``, or CUDA
    indices ``0,1,2``; checked against this machine."""
    if text is None:
        return None
    text = text.strip()
    if text in ("auto", "cpu"):
        import torch

        if text == "cpu" or not torch.cuda.is_available():
            return ["cpu"]
        return [str(index) for index in range(torch.cuda.device_count())]
    devices = [part.strip() for part in text.split(",") if part.strip()]
    if not devices or not all(device.isdigit() for device in devices):
        raise ConfigError(f"--devices {text!r}: give auto, cpu, or GPU indices such as 0,1,2")
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    missing = [device for device in devices if int(device) >= count]
    if missing:
        raise ConfigError(f"--devices {text}: this machine has {count} CUDA device(s) torch can use, so no GPU "
                          f"{', '.join(missing)}; pick indices below {count}, or use --devices cpu")
    return devices


def worker_slots(workers: int, devices: list[str] | None, configured_threads: int) -> list[WorkerSlot]:
    """Worker i on ``devices[i % len(devices)]``, each with its share of the CPU's cores (unless
    ``runtime.threads`` > 0 sets them): N workers each using every core would oversubscribe it."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads = None if configured_threads > 0 or workers == 1 else max(1, cores // workers)
    return [WorkerSlot(index, devices[index % len(devices)] if devices else None, threads) for index in range(workers)]


def pinned(job: SweepJob, slot: WorkerSlot, own_process: bool) -> SweepJob:
    """The job as ``slot`` runs it. A GPU worker in its own process sees only its GPU (``CUDA_VISIBLE_DEVICES``,
    set before torch starts CUDA there); in this process (one worker), the device is named instead."""
    if slot.device is None and slot.threads is None:
        return job
    config = copy.deepcopy(job.config)
    if slot.threads is not None:
        config.runtime.threads = slot.threads
    if slot.device == "cpu":
        config.runtime.device = "cpu"
    elif slot.device is not None:
        if own_process:
            os.environ["CUDA_VISIBLE_DEVICES"] = slot.device
        config.runtime.device = "cuda" if own_process else f"cuda:{slot.device}"
    return dataclasses.replace(job, config=config)


def run_worker(job: SweepJob, slot: WorkerSlot = WorkerSlot(), parent: Tracker | None = None,
               own_process: bool = True) -> None:
    """Run trials until the study's budget is used (by this worker and every other one) and no trial
    that could still need replacing runs elsewhere. ``parent``: the study's tracked run (a spawned
    worker opens its own, continuing the same run)."""
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # our line per trial replaces Optuna's log lines
    job = pinned(job, slot, own_process)
    own_parent = parent is None
    if own_parent:
        parent = open_study_run(job.config, job.method, job.study_name, job.storage_url, job.identity,
                                enabled=job.track, wandb=False)
    try:
        with storage_errors(job.storage_url):
            storage = study_storage(job.storage_url, job.settings.heartbeat)
            study = optuna.load_study(study_name=job.study_name, storage=storage, pruner=make_pruner(job.settings),
                                      sampler=TrialSeededTPESampler(job.settings.seed))
            names = [o.name for o in objectives(job.settings.multi_objective)]
            callbacks: list[Any] = [StopAtBudget(job.settings.n_trials)]
            if not job.quiet:
                callbacks.insert(0, lambda study, trial: print(f"[{study.study_name}] {trial_line(trial, names)}",
                                                               flush=True))
            worker = {"device": job.config.runtime.device, "threads": job.config.runtime.threads}
            objective = TrialObjective(job, parent, worker)
            while True:
                fail_interrupted_trials(study)
                if budget_started(study) < job.settings.n_trials:
                    study.optimize(objective, catch=(Exception,), callbacks=callbacks)
                elif trials_to_wait_for(study, storage, job.settings.heartbeat.grace_s):
                    time.sleep(POLL_S)
                else:
                    return
    finally:
        if own_parent:
            close_study_run(parent)


def run_worker_processes(job: SweepJob, slots: list[WorkerSlot]) -> list[str]:
    """One process per slot; returns a line for each that did not exit cleanly."""
    # spawn, not fork: forking a process in which torch has started its thread pools can deadlock.
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=run_worker, args=(job, slot), name=f"worker {slot.index}") for slot in slots]
    for process in processes:
        process.start()
    # Reap each worker as soon as it exits: an unreaped (zombie) process still looks alive to the
    # others' process-id check, and its interrupted trial would not be replaced.
    pending = {process.sentinel: process for process in processes}
    crashed = []
    while pending:
        for sentinel in multiprocessing.connection.wait(list(pending)):
            process = pending.pop(sentinel)
            process.join()
            if process.exitcode != 0:
                crashed.append(f"{process.name} (pid {process.pid}) exited with code {process.exitcode}")
    return crashed
