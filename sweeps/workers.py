"""Workers: processes on this machine that share a study and its budget, each pinned to a device.

``--devices 0,1`` gives worker i the GPU ``devices[i % len(devices)]`` (its own process sees only that
GPU: ``CUDA_VISIBLE_DEVICES``); ``--devices cpu`` runs every worker on the CPU. Either way the CPU
threads are split between the workers unless ``runtime.threads`` sets them. The slots are the fan-out's
(reproduce/launch/devices.py), so a sweep's workers and a recipe's runs are pinned alike.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import multiprocessing.connection
import os
import time
from typing import Any

import optuna

from reproduce.launch.devices import WorkerSlot, pinned_config, slot_environment
from reproduce.tracking import Tracker
from sweeps.budget import StopAtBudget, budget_started, fail_interrupted_trials, study_storage, trials_to_wait_for
from sweeps.objective import TrialObjective, TrialSeededTPESampler, trial_line
from sweeps.plan import SweepJob, make_pruner
from sweeps.settings import objectives
from sweeps.storage import storage_errors
from sweeps.tracked import close_study_run, open_study_run

POLL_S = 2.0  # how often a worker with nothing left to start looks at the trials still running elsewhere


def pinned(job: SweepJob, slot: WorkerSlot, own_process: bool) -> SweepJob:
    """The job as ``slot`` runs it (reproduce.launch.devices decides, as for a recipe's runs). A GPU worker
    in its own process sees only its GPU: ``CUDA_VISIBLE_DEVICES`` is set here, before torch starts CUDA."""
    if slot.device is None and slot.threads is None:
        return job
    if own_process:
        os.environ.update(slot_environment(slot))
    return dataclasses.replace(job, config=pinned_config(job.config, slot, own_process))


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
