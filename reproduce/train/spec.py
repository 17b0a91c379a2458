"""A run's identity: which method, which seed, and where its files go."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunSpec:
    method: str
    seed: int
    run_dir: Path  # outputs DVC tracks: metrics.json, history.tsv, final.pt, best.pt, predictions.pt
    checkpoint_dir: Path  # the rolling full-state checkpoint; outside DVC's outputs so a killed run resumes

    @property
    def name(self) -> str:
        return f"{self.run_dir.parent.name}-{self.run_dir.name}"

    @classmethod
    def default(cls, method: str, seed: int, label: str | None = None, runs_root: str = "runs",
                checkpoints_root: str = "checkpoints") -> "RunSpec":
        label = label or method
        return cls(method, seed, Path(runs_root) / label / f"seed{seed}", Path(checkpoints_root) / label / f"seed{seed}")
