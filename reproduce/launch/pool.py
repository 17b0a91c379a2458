"""The local pool: each run a process of its own, as many at once as there are worker slots.

Read ``run_pool`` top to bottom. A free slot takes the first run that waits for nothing (or whose
teacher run is done); a run whose teacher failed is skipped. The pool looks at its processes twice a
second: an exit code of 0 is a finished run, any other a failed one (its log says why), and the others
go on. Workers run in sessions of their own, so a Ctrl-C at the terminal reaches only the pool, which
then stops every worker with the same SIGINT (SIGTERM, as SLURM or DVC send it, likewise): each ends
its epoch loop with its last complete checkpoint on disk and its tracked run suspended, and the next
call resumes it (``--resume auto``). A second Ctrl-C, or a worker that takes longer than ``STOP_WAIT_S``
to stop, is killed.
"""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from reproduce.launch.board import Board
from reproduce.launch.devices import WorkerSlot
from reproduce.launch.report import Outcome, headline
from reproduce.launch.runs import INTERRUPTED, RunJob

POLL_S = 0.5
STOP_WAIT_S = 60.0  # for a stopped worker's last checkpoint write and its trackers' finish

StartWorker = Callable[[RunJob, WorkerSlot], tuple[subprocess.Popen, Path]]  # the worker process and its log


@dataclass
class Worker:
    run: RunJob
    slot: WorkerSlot
    process: subprocess.Popen
    log: Path


def run_pool(runs: list[RunJob], slots: list[WorkerSlot], start: StartWorker, board: Board,
             outcomes: dict[str, Outcome], epochs: int = 0) -> bool:
    """Run every run without an outcome yet; ``outcomes`` gets one per run (``epochs``: of a run, for the
    progress lines). Returns False when stopped by Ctrl-C or SIGTERM (the unfinished runs then say
    "interrupted" or "not started")."""
    names = {run.name for run in runs}
    waiting = [run for run in runs if run.name not in outcomes]
    running: list[Worker] = []
    free = list(slots)
    for run in waiting:
        blocked = run.needs in names and run.needs not in outcomes
        board.set(run.name, "waiting" if blocked else "queued", f"for {run.needs}" if blocked else "")
    try:
        with stop_signals_as_interrupt():
            while waiting or running:
                for run in [run for run in waiting if run.needs in outcomes and not outcomes[run.needs].ok]:
                    waiting.remove(run)
                    outcomes[run.name] = Outcome(run, "skipped", detail=f"{run.needs} {outcomes[run.needs].state}")
                    board.set(run.name, "skipped", outcomes[run.name].detail)
                for run in [run for run in waiting if run.needs not in names or run.needs in outcomes][:len(free)]:
                    waiting.remove(run)
                    slot = free.pop(0)
                    process, log = start(run, slot)
                    running.append(Worker(run, slot, process, log))
                    board.set(run.name, "running", f"{slot.describe()}; log {log}")
                for worker in list(running):
                    code = worker.process.poll()
                    if code is None:
                        board.set(worker.run.name, "running", f"epoch {worker.run.epochs_done()}/{epochs}, "
                                  f"{worker.slot.describe()}; log {worker.log}")
                        continue
                    running.remove(worker)
                    free = sorted([*free, worker.slot], key=lambda slot: slot.index)
                    outcomes[worker.run.name] = ended(worker, code)
                    board.set(worker.run.name, outcomes[worker.run.name].state, outcomes[worker.run.name].detail)
                board.draw()
                if waiting or running:
                    time.sleep(POLL_S)
        return True
    except KeyboardInterrupt:
        stop(running)
        for worker in running:  # one may have finished before the signal came
            outcome = ended(worker, worker.process.returncode)
            outcomes[worker.run.name] = outcome if outcome.ok else Outcome(worker.run, "interrupted", worker.log,
                                                                             "resumes on the next call")
            board.set(worker.run.name, outcomes[worker.run.name].state)
        return False
    finally:
        board.close()


def ended(worker: Worker, code: int) -> Outcome:
    if code == 0:
        return Outcome(worker.run, "done", worker.log, headline(worker.run))
    if code in (INTERRUPTED, -signal.SIGINT):
        return Outcome(worker.run, "interrupted", worker.log, "resumes on the next call")
    how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
    return Outcome(worker.run, "failed", worker.log, how)


def stop(running: list[Worker]) -> None:
    """SIGINT to every worker, then wait for them; a second Ctrl-C (or the time limit) kills the rest."""
    for worker in running:
        worker.process.send_signal(signal.SIGINT)
    deadline = time.monotonic() + STOP_WAIT_S
    try:
        for worker in running:
            worker.process.wait(timeout=max(0.0, deadline - time.monotonic()))
    except (KeyboardInterrupt, subprocess.TimeoutExpired):
        pass
    for worker in running:
        if worker.process.poll() is None:
            worker.process.kill()
            worker.process.wait()


@contextmanager
def stop_signals_as_interrupt() -> Iterator[None]:
    """Ctrl-C and SIGTERM both stop the pool, whatever handler the calling program installed for SIGINT
    (only the main thread may install a handler)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = {signum: signal.signal(signum, interrupt) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
