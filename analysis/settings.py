"""The ``analysis`` section of params.yaml, validated with errors that name the key."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reproduce.config import ConfigError, build_dataclass

DEFAULT_ORDER = ["teacher", "vanilla", "kd", "dkd", "dml", "bdkd", "aekt", "switokd", "sokd", "r2kd"]
DEFAULT_NAMES = {"teacher": "Teacher (vanilla)", "vanilla": "Vanilla student", "kd": "KD", "dkd": "DKD",
                 "dml": "DML", "bdkd": "BD-KD", "aekt": "AEKT", "switokd": "SwitOKD", "sokd": "SOKD",
                 "r2kd": "R2KD", "kdcl": "KDCL"}


@dataclass
class AnalysisSettings:
    n_bins: int = 15  # equal-width calibration bins (and the reliability diagrams' bars)
    # Row order of every table and figure: run labels (runs/<label>/); labels not listed follow, sorted.
    order: list[str] = field(default_factory=lambda: list(DEFAULT_ORDER))
    names: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_NAMES))  # label -> display name
    # Relative paths are read from the directory that holds params.yaml (the project root).
    published_results: str = "analysis/published_results.yaml"
    # Where the papers' main tables live: listed for reference when no published number matches our runs.
    reference_dataset: str = "cifar100"
    png_dpi: int = 200
    grid_columns: int = 3  # reliability diagrams per row in the all-methods grid

    def validate(self) -> None:
        if self.n_bins < 1:
            raise ConfigError(f"analysis.n_bins: must be at least 1, got {self.n_bins}")
        if self.png_dpi < 50:
            raise ConfigError(f"analysis.png_dpi: must be at least 50, got {self.png_dpi}")
        if self.grid_columns < 1:
            raise ConfigError(f"analysis.grid_columns: must be at least 1, got {self.grid_columns}")

    def display_name(self, label: str) -> str:
        return self.names.get(label, label)

    def ordered(self, labels: set[str] | list[str]) -> list[str]:
        present = set(labels)
        return [label for label in self.order if label in present] + sorted(present - set(self.order))

    def published_path(self, params_path: Path) -> Path:
        path = Path(self.published_results)
        return path if path.is_absolute() else params_path.resolve().parent / path


def parse_settings(raw: dict[str, Any] | None) -> AnalysisSettings:
    settings = build_dataclass(AnalysisSettings, raw or {}, "analysis")
    settings.validate()
    return settings
