"""Runs on a cluster: SLURM job arrays through submitit, one array task per run.

The runs that wait for nothing are one array; the offline methods' runs are a second array that starts
after the teacher's task succeeds (``--dependency=afterok:<its task>``). Each task trains its run with
``train_run`` (reproduce/launch/runs.py), as a local worker would, and logs under the launch folder
(``submitit/<array>_<task>_0_log.out``). A task that is pre-empted or reaches its time limit is requeued
by submitit (``ClusterRun`` is checkpointable) and resumes from its last epoch's checkpoint. Rerunning
the command submits only the runs that are neither finished (``finished``: what ``train`` calls already
done) nor still queued or running from an earlier submission (``submitted.json`` records their task ids).

submitit's local executor runs the same code with real processes on this machine (the tests use it). It
cannot hold a task until another succeeds, so there the offline runs are submitted once their teacher is done.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import submitit

from reproduce.io import atomic_write_text
from reproduce.launch.board import Board
from reproduce.launch.devices import WorkerSlot, pinned_config
from reproduce.launch.report import Outcome, Report, headline
from reproduce.launch.runs import RunJob, RunOrder, finished, train_run

if TYPE_CHECKING:
    from reproduce.config import SlurmConfig
    from reproduce.launch.fanout import Launch

# SLURM states of a task that may still train its run (a task sacct no longer knows is long gone).
QUEUED_OR_RUNNING = {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "SUSPENDED", "RESIZING",
                     "REQUEUE_HOLD", "REQUEUE_FED"}
POLL_S = 1.0  # a look at the result files; sacct is asked at most once a minute (submitit's watcher)


def executor_parameters(slurm: SlurmConfig, name: str, dependency: str | None = None) -> dict[str, Any]:
    """``submitit.AutoExecutor.update_parameters`` for one array of runs: the generic keys (which the
    local executor reads too) and the ``slurm_`` ones, each one sbatch option."""
    parameters: dict[str, Any] = {"name": name, "timeout_min": slurm.time_min, "cpus_per_task": slurm.cpus_per_task,
                                  "nodes": 1, "tasks_per_node": 1, "stderr_to_stdout": True,
                                  "slurm_array_parallelism": slurm.array_parallelism}
    if slurm.partition:
        parameters["slurm_partition"] = slurm.partition
    if slurm.gpus_per_task:
        parameters["slurm_gpus_per_task"] = slurm.gpus_per_task
    if dependency:  # a teacher that failed cancels its students instead of leaving them pending forever
        parameters["slurm_dependency"] = dependency
        parameters["slurm_additional_parameters"] = {"kill-on-invalid-dep": "yes"}
    return parameters


class ClusterRun(submitit.helpers.Checkpointable):
    """An array task: trains one run. On pre-emption or timeout submitit requeues the same call, which
    resumes the run from its checkpoint (``--resume auto``)."""

    def __call__(self, order: RunOrder) -> dict[str, Any]:
        return train_run(order)


@dataclass
class Submitted:
    run: RunJob
    job: submitit.Job


class Submission:
    """A launch's runs on a cluster: which finished earlier, which are queued or running (submitted now or by
    an earlier call), which wait for their teacher; ``submitted.json`` records each run's task id."""

    def __init__(self, launch: Launch, cluster: str, board: Board) -> None:
        self.launch, self.board, self.folder = launch, board, launch.folder / "submitit"
        self.executor = submitit.AutoExecutor(folder=self.folder, cluster=cluster)
        slurm = launch.config.pipeline.slurm
        threads = slurm.cpus_per_task if launch.config.runtime.threads == 0 else None  # the task's CPUs, not the node's
        self.config = pinned_config(launch.config, WorkerSlot(0, None, threads), own_process=True).to_dict()
        self.ledger = self.folder / "submitted.json"
        self.recorded: dict[str, str] = json.loads(self.ledger.read_text()) if self.ledger.is_file() else {}
        self.outcomes = {run.name: Outcome(run, "done earlier") for run in launch.runs if finished(launch.config, run)}
        self.active = {run.name: Submitted(run, job) for run in launch.runs if run.name not in self.outcomes
                       for job in [self.earlier_task(run)] if job is not None}
        self.later: list[RunJob] = []  # submitted once the run they need is done (no dependencies here)
        for name, outcome in self.outcomes.items():
            board.set(name, outcome.state)
        for name, submitted in self.active.items():
            board.set(name, "submitted", f"earlier, job {submitted.job.job_id}")

    def submit_unfinished(self) -> None:
        """One array of the runs that wait for nothing; on SLURM a second one of the runs that wait for the
        teacher, held until its task succeeds; elsewhere those wait here (``follow`` submits them)."""
        todo = [run for run in self.launch.runs if run.name not in self.outcomes and run.name not in self.active]
        unfinished = {run.name for run in todo} | set(self.active)
        later = [run for run in todo if run.needs in unfinished]
        if len(later) < len(todo):
            self.submit([run for run in todo if run not in later])
        if later and self.executor.cluster == "slurm":
            needed = sorted({self.active[run.needs].job.job_id for run in later})
            self.submit(later, dependency="afterok:" + ":".join(needed))
        else:
            self.later = later
            for run in later:
                self.board.set(run.name, "waiting", f"for {run.needs}")

    def submit(self, runs: list[RunJob], dependency: str | None = None) -> None:
        self.executor.update_parameters(**executor_parameters(self.launch.config.pipeline.slurm, self.launch.name,
                                                              dependency))
        orders = [RunOrder(run, self.config, self.launch.resume, self.launch.track) for run in runs]
        for run, job in zip(runs, self.executor.map_array(ClusterRun(), orders)):
            self.active[run.name] = Submitted(run, job)
            self.recorded[run.name] = job.job_id
            self.board.set(run.name, "submitted", f"job {job.job_id}")
        atomic_write_text(self.ledger, json.dumps(self.recorded, indent=1, sort_keys=True) + "\n")

    def follow(self) -> None:
        """Until every run has an outcome: note the tasks that ended, submit the waiting runs whose teacher is
        done (or skip them when it failed), show each run's epochs."""
        while self.active or self.later:
            for name, submitted in list(self.active.items()):
                job, run = submitted.job, submitted.run
                if not job.done():
                    state = job.state.split(" ")[0].lower()
                    epochs = f"epoch {run.epochs_done()}/{self.launch.config.recipe.epochs}"
                    self.board.set(name, state, f"{epochs}, job {job.job_id}")
                    continue
                del self.active[name]
                failed = job.exception() is not None
                self.outcomes[name] = Outcome(run, "failed" if failed else "done", Path(job.paths.stdout),
                                              f"job {job.job_id} {job.state}" if failed else headline(run))
                self.board.set(name, self.outcomes[name].state, self.outcomes[name].detail)
            decided = [run for run in self.later if run.needs in self.outcomes]
            self.later = [run for run in self.later if run not in decided]
            for run in decided:
                if not self.outcomes[run.needs].ok:
                    self.outcomes[run.name] = Outcome(run, "skipped", detail=f"{run.needs} "
                                                      f"{self.outcomes[run.needs].state}")
                    self.board.set(run.name, "skipped", self.outcomes[run.name].detail)
            if [run for run in decided if run.name not in self.outcomes]:
                self.submit([run for run in decided if run.name not in self.outcomes])
            if self.active or self.later:
                time.sleep(POLL_S)

    def earlier_task(self, run: RunJob) -> submitit.Job | None:
        """The task an earlier call submitted for ``run``, while it is still queued or running; else None."""
        job_id = self.recorded.get(run.name)
        if job_id is None:
            return None
        job = (submitit.SlurmJob if self.executor.cluster == "slurm" else submitit.LocalJob)(self.folder, job_id)
        job.get_info(mode="force")  # sacct now, not the watcher's cache
        return job if job.state.split(" ")[0].upper() in QUEUED_OR_RUNNING else None


def run_on_cluster(launch: Launch, cluster: str = "slurm") -> Report:
    """Submit the launch's unfinished runs (``cluster``: "slurm", or "local" for submitit's local executor)
    and follow them to the end; Ctrl-C stops following (SLURM tasks keep running, local ones are stopped)."""
    board = Board([run.name for run in launch.runs])
    submission = Submission(launch, cluster, board)
    try:
        submission.submit_unfinished()
        submission.follow()
    except KeyboardInterrupt:
        jobs = [submitted.job for submitted in submission.active.values()]
        if cluster == "slurm":
            arrays = " ".join(sorted({job.job_id.split("_")[0] for job in jobs}))
            note = f"the SLURM tasks keep running; `scancel {arrays}` stops them" if arrays else ""
        else:  # the local executor's tasks are this machine's processes
            for job in jobs:
                job.cancel(check=False)
            note = ""
        return Report.of(launch.runs, submission.outcomes, interrupted=True, note=note)
    finally:
        board.close()
    return Report.of(launch.runs, submission.outcomes)
