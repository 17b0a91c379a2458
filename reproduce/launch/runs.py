"""The runs a launcher fans out, and what one run's own process does with its order.

A ``RunJob`` is one method with one seed and where its files go, plus the run it waits for: an offline
method's student needs the teacher run it distils from (``teacher.runs_root/seed<teacher.seed>/final.pt``)
when that run is part of the same launch. A ``RunOrder`` is what a worker process receives (as a JSON
file from the local pool, pickled by submitit on a cluster): the run, the resolved configuration as the
worker's slot pins it, and the resume and tracking switches. ``train_run`` executes it with the library's
``train``, so a fanned-out run writes the same files, checkpoints and tracked runs as a sequential one.
"""

from __future__ import annotations

import contextlib
import io
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from reproduce.config import Config

INTERRUPTED = 130  # a worker's exit code when it stopped on Ctrl-C (SIGINT), as a shell reports it


@dataclass(frozen=True)
class RunJob:
    method: str
    seed: int
    run_dir: Path  # metrics.json, history.tsv, final.pt (reproduce.train.RunSpec)
    checkpoint_dir: Path  # last.pt, from which an interrupted run resumes
    needs: str | None = None  # the name of the run that must finish first

    @property
    def name(self) -> str:
        return f"{self.method}/seed{self.seed}"

    @property
    def file_stem(self) -> str:
        return f"{self.method}-seed{self.seed}"

    def spec(self) -> Any:
        from reproduce.train.spec import RunSpec

        return RunSpec(self.method, self.seed, self.run_dir, self.checkpoint_dir)

    def epochs_done(self) -> int:
        """Epochs this run has recorded (its history.tsv rows): the progress a launcher shows."""
        try:
            return max(0, len((self.run_dir / "history.tsv").read_text().splitlines()) - 1)
        except OSError:
            return 0


def runs_for(methods: list[str], seeds: list[int], runs_root: Path, checkpoints_root: Path) -> list[RunJob]:
    """Every method with every seed, in that order (the teacher first where it is listed first)."""
    return [RunJob(method, seed, runs_root / method / f"seed{seed}", checkpoints_root / method / f"seed{seed}")
            for method in methods for seed in seeds]


def with_teacher_dependencies(runs: list[RunJob], config: Config) -> list[RunJob]:
    """Each offline method's run waits for the run that writes the teacher it distils from, where that run
    is one of ``runs``; with ``teacher.checkpoint`` (a released teacher) nothing waits."""
    from reproduce.methods import MethodKind, get_method

    writers = [run.name for run in runs
               if run.method == "teacher" and run.run_dir / "final.pt" == config.teacher.weights]
    teacher = writers[0] if writers and not config.teacher.checkpoint else None
    return [replace(run, needs=teacher if get_method(run.method).kind is MethodKind.OFFLINE else None) for run in runs]


def finished(config: Config, run: RunJob) -> bool:
    """True when ``train`` would call the run already done: its metrics.json is written and its last.pt,
    written by the same configuration, holds the last epoch (reproduce/train/loop.py)."""
    if not (run.run_dir / "metrics.json").is_file() or not (run.checkpoint_dir / "last.pt").is_file():
        return False
    from reproduce.train.checkpoint import load_checkpoint
    from reproduce.train.rundir import finished_summary

    if finished_summary(run.run_dir) is None:  # garbage: its training run writes it again from the checkpoint
        return False
    with contextlib.redirect_stdout(io.StringIO()):  # "belongs to a different configuration": the run's own log says it
        state = load_checkpoint(run.spec(), config, "auto")
    return state is not None and state["epoch"] >= config.recipe.epochs


@dataclass(frozen=True)
class RunOrder:
    """What a worker process trains: ``config`` is ``Config.to_dict()`` pinned to the worker's slot."""

    run: RunJob
    config: dict[str, Any]
    resume: str = "auto"
    track: bool = True

    def to_json(self) -> str:
        run = {"method": self.run.method, "seed": self.run.seed, "run_dir": str(self.run.run_dir),
               "checkpoint_dir": str(self.run.checkpoint_dir)}
        return json.dumps({"run": run, "config": self.config, "resume": self.resume, "track": self.track}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> RunOrder:
        raw = json.loads(text)
        run = raw["run"]
        return cls(RunJob(run["method"], run["seed"], Path(run["run_dir"]), Path(run["checkpoint_dir"])),
                   raw["config"], raw["resume"], raw["track"])


def train_run(order: RunOrder) -> dict[str, Any]:
    """Train the ordered run in this process (a worker's whole life); returns its metrics.json summary."""
    from reproduce.numerics import pin_cpu_numerics

    pin_cpu_numerics()  # before torch loads, as every command line does: the same CPU kernels as a sequential run
    from reproduce.config import config_from_dict
    from reproduce.launch.report import summary_line
    from reproduce.train import train

    summary = train(config_from_dict(order.config), order.run.spec(), resume=order.resume, track=order.track)
    print(f"[{order.run.name}] {summary_line(summary)} -> {order.run.run_dir}", flush=True)
    return summary
