"""What a tracking backend is: the protocol every service (W&B, MLflow) implements, and its registry.

A backend is one file in ``reproduce/tracking/backends/`` whose class is decorated with
``@BACKENDS.register("<config section>")``; the Tracker opens every registered backend that the
config wants. A backend's methods run in order on one thread of their own (tracker.py), so they may
block on the network; each may raise, which switches that backend off for the process."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

from reproduce.config import TrackingConfig
from reproduce.registry import Registry

RUN_KEY_TAG = "run_key"  # a run's key names it in every backend (W&B run id; MLflow tag): a resume finds it again
STATUSES = {"finished": "FINISHED", "pruned": "FINISHED", "failed": "FAILED"}  # MLflow has no "pruned"
JOB_TYPES = ("train", "sweep", "analysis")


@dataclass(frozen=True)
class RunInfo:
    """Everything a backend needs to open (or reopen) one run; no backend keeps other state about it."""

    key: str  # the run's identity in every backend, chosen once and kept in the checkpoint
    name: str
    group: str  # runs compared together: one method in one experiment, or a study's trials
    job_type: str  # one of JOB_TYPES
    run_dir: Path
    tags: dict[str, str]
    params: dict[str, Any]
    started_ms: int
    resuming: bool  # a run with this key may exist already: continue it rather than start another
    parent_key: str | None = None  # the key of the run this one nests under (a sweep's study)


class Backend(Protocol):
    """One tracking service's copy of one run. ``__init__`` does no I/O; ``open`` contacts the service."""

    label: ClassVar[str]  # how messages name it ("W&B")

    @classmethod
    def wanted(cls, config: TrackingConfig) -> bool:
        """Whether the config asks for this backend."""

    @classmethod
    def destination(cls, config: TrackingConfig) -> str:
        """Where it sends runs (a URI, a folder): a service that failed is switched off for this
        destination, for the rest of the process."""

    def __init__(self, config: TrackingConfig, run: RunInfo) -> None: ...

    def open(self) -> None:
        """Start the run, or continue the one with ``run.key``, and learn which steps it already holds."""

    def log(self, rows: list[dict[str, float]]) -> None:
        """Epoch rows (``row["epoch"]`` is the step): sends only what the run does not hold yet, so a
        resumed run gets the epochs a killed process never delivered and none twice."""

    def image(self, name: str, path: Path) -> None: ...

    def artifact(self, path: Path, kind: str) -> None: ...

    def finish(self, summary: dict[str, Any], status: str) -> None:
        """End the run: ``summary`` (flat) as final values, ``status`` one of STATUSES."""

    def suspend(self) -> None:
        """End this process's part of the run; a later ``open`` with the same key continues it."""


BACKENDS: Registry[type[Backend]] = Registry("tracking backend", "reproduce.tracking.backends")


def metric_values(row: dict[str, Any], finite: bool = False) -> dict[str, float]:
    """The numbers of an epoch row (not the step itself); ``finite``: without NaN and infinities."""
    return {k: float(v) for k, v in row.items() if k != "epoch" and isinstance(v, (int, float))
            and not isinstance(v, bool) and (math.isfinite(v) or not finite)}


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested dict as one level with dotted keys (``{"best": {"epoch": 3}}`` -> ``{"best.epoch": 3}``)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        flat.update(flatten(value, name) if isinstance(value, dict) else {name: value})
    return flat
