"""Weights & Biases: one run per key (the W&B run id), offline by default.

W&B keeps a run's steps in increasing order and drops a step below its last one, so a resumed run can
only be completed from its last step on. Every part of a run therefore re-sends, before its first new
epoch, the epochs after the last one W&B holds: for an offline run, what the earlier parts' files on
disk hold (a killed process delivers a prefix of what it logged); for an online run, what the server
reports (``run.starting_step``)."""

from __future__ import annotations

import errno
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

from reproduce.config import TrackingConfig
from reproduce.tracking.backend import BACKENDS, RunInfo, metric_values
from reproduce.tracking.wandb_file import offline_parts, part_suffix, read_wandb_offline_run


# W&B's writer drops records silently on a full disk, while its Python logger prints a ~30-line "Logging
# error" for every line it cannot write (557 lines for one run); below this much free space the backend
# stops first, with one line (the Tracker's disk-full message).
MIN_FREE_BYTES = 1 << 20


def require_space() -> None:
    folder = wandb_dir() if wandb_dir().exists() else wandb_dir().parent
    if shutil.disk_usage(folder).free < MIN_FREE_BYTES:
        raise OSError(errno.ENOSPC, "No space left on device", str(folder))


def wandb_dir() -> Path:
    """Where W&B writes runs: <WANDB_DIR>/wandb (the Tracker sets WANDB_DIR to the project)."""
    return Path(os.environ.get("WANDB_DIR", os.getcwd())) / "wandb"


def held_steps(key: str) -> set[int]:
    """The steps the offline parts of run ``key`` recorded on disk."""
    return {int(row["_step"]) for part in offline_parts(wandb_dir(), key)
            for row in read_wandb_offline_run(part)["history"] if "_step" in row}


@BACKENDS.register("wandb")
class WandbBackend:
    label = "W&B"

    @classmethod
    def wanted(cls, config: TrackingConfig) -> bool:
        return config.wandb.enabled and cls._mode(config) != "disabled"

    @classmethod
    def destination(cls, config: TrackingConfig) -> str:
        mode = cls._mode(config)
        return f"W&B {mode} " + (os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai") if mode == "online"
                                  else str(wandb_dir()))

    @staticmethod
    def _mode(config: TrackingConfig) -> str:
        return os.environ.get("WANDB_MODE", config.wandb.mode)

    def __init__(self, config: TrackingConfig, run: RunInfo) -> None:
        self.config, self.info, self.mode = config, run, self._mode(config)
        self.last_step = 0  # the highest step W&B holds; it takes only higher ones
        self.held: set[int] = set()

    def open(self) -> None:
        import wandb
        require_space()

        from reproduce.tracking.tracker import CLOSE_TIMEOUT_S

        self.wandb = wandb
        if self.info.resuming and self.mode == "offline":
            self.held = held_steps(self.info.key)
        # Machine probes, requirement scans, code and job capture cost seconds per run and add nothing
        # (the commit is in the config); system metrics are worth it only to a person watching live. A
        # finish that runs out of time (a server that died mid-run) raises, so the run stays listed for a
        # sync instead of ending "successfully" with its data unsent.
        settings = wandb.Settings(finish_timeout=0.9 * CLOSE_TIMEOUT_S, finish_timeout_raises=True, console="off",
                                  x_disable_stats=self.mode != "online",
                                  x_disable_machine_info=True, x_save_requirements=False, disable_git=True,
                                  save_code=False, disable_job_creation=True, x_sync_dir_suffix=part_suffix())
        # resume="allow" continues the run if W&B has it and starts it otherwise ("must" would refuse an
        # online run whose first part never reached the server).
        _own_service()
        self.run = wandb.init(project=self.config.project, entity=self.config.wandb.entity, group=self.info.group,
                              job_type=self.info.job_type, name=self.info.name, id=self.info.key, resume="allow",
                              mode=self.mode, config=self.info.params, dir=str(wandb_dir().parent),
                              tags=[f"{k}:{v}"[:64] for k, v in self.info.tags.items()], reinit="create_new",
                              settings=settings)
        if self.mode == "online" and self.run.starting_step:
            self.held = set(range(self.run.starting_step))
        self.last_step = max(self.held, default=0)

    def log(self, rows: list[dict[str, float]]) -> None:
        require_space()
        lost = [int(row["epoch"]) for row in rows if int(row["epoch"]) < self.last_step and int(row["epoch"]) not in self.held]
        if lost:
            warnings.warn(f"W&B run {self.info.key} lacks epochs {lost} below its last step {self.last_step}, which "
                          f"W&B cannot insert any more; history.tsv has them", stacklevel=2)
        for row in rows:
            step = int(row["epoch"])
            if step > self.last_step:
                self.run.log(metric_values(row), step=step)
                self.last_step = step

    def image(self, name: str, path: Path) -> None:
        require_space()
        self.run.log({name: self.wandb.Image(str(path))})

    def artifact(self, path: Path, kind: str) -> None:
        require_space()
        artifact = self.wandb.Artifact(name=f"{self.info.name}-{path.stem}".replace("/", "-"), type=kind)
        artifact.add_file(str(path))
        self.run.log_artifact(artifact)

    def finish(self, summary: dict[str, Any], status: str) -> None:
        require_space()
        self.run.summary.update({**summary, "outcome": status})
        self.run.finish(exit_code=1 if status == "failed" else 0)

    def suspend(self) -> None:
        require_space()
        self.run.mark_preempting()
        self.run.finish(exit_code=0)


def _own_service() -> None:
    """W&B hands its service process to child processes through ``WANDB_SERVICE`` (``3-<pid>-...``, the pid of
    the process that started it). A run of ours belongs to one process: a training process that used its
    parent's service (a sweep's worker, a test's subprocess) would leave a run it was killed in to the parent's
    service, and lose it when that service ends. So a service another process started is not used."""
    owner = os.environ.get("WANDB_SERVICE", "").split("-")
    if len(owner) > 1 and owner[1].isdigit() and int(owner[1]) != os.getpid():
        del os.environ["WANDB_SERVICE"]
