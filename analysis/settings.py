"""The ``analysis`` section of params.yaml, validated with errors that name the key.

Method names and row order come from the method registry (analysis/registry.py); ``names`` and
``order`` here are optional user overrides, empty by default.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from analysis import registry
from reproduce.config import ConfigError, build_dataclass


@dataclass
class AnalysisSettings:
    n_bins: int = 15  # equal-width calibration bins (and the reliability diagrams' bars)
    # Overrides of the registry: run labels listed here come first, in this order; the rest follow by the
    # registry's row_order, then by label.
    order: list[str] = field(default_factory=list)
    names: dict[str, str] = field(default_factory=dict)  # label -> display name, over the registry's
    # Relative paths are read from the directory that holds params.yaml (the project root).
    published_results: str = "analysis/published_results.yaml"
    # Where the papers' main tables live: listed for reference when no published number matches our runs.
    reference_dataset: str = "cifar100"
    png_dpi: int = 200
    pdf: bool = False  # also write every figure as PDF (vector, for a paper)
    grid_columns: int = 3  # reliability diagrams per row in the all-methods grid

    def validate(self) -> None:
        if self.n_bins < 1:
            raise ConfigError(f"analysis.n_bins: must be at least 1, got {self.n_bins}")
        if self.png_dpi < 50:
            raise ConfigError(f"analysis.png_dpi: must be at least 50, got {self.png_dpi}")
        if self.grid_columns < 1:
            raise ConfigError(f"analysis.grid_columns: must be at least 1, got {self.grid_columns}")
        if len(set(self.order)) != len(self.order):
            raise ConfigError(f"analysis.order: lists a label twice: {self.order}")

    def display_name(self, label: str) -> str:
        return self.names.get(label) or registry.display_name(label)

    def ordered(self, labels: set[str] | list[str]) -> list[str]:
        position = {label: index for index, label in enumerate(self.order)}
        return sorted(set(labels), key=lambda label: (position.get(label, len(position)),
                                                      registry.row_order(label), label))

    def published_path(self, params_path: Path) -> Path:
        path = Path(self.published_results)
        return path if path.is_absolute() else params_path.resolve().parent / path


def parse_settings(raw: dict[str, Any] | None) -> AnalysisSettings:
    settings = build_dataclass(AnalysisSettings, raw or {}, "analysis")
    settings.validate()
    return settings
