"""Reading the Optuna sweeps' results as the sweeps write them, ``sweep-results/<method>/`` (sweeps/__init__.py
documents the files): ``summary.json`` (format 1: the budget, the trial counts, whether it is a smoke test,
the best trial, the parameter importance or null and why), ``best_params.yaml`` and ``figures/*.png``, the
figures the sweeps draw with Optuna's own matplotlib visualisations. The report embeds those figures; it
draws nothing of a sweep itself.

Files only: the analysis never imports the sweeps package. Every file is optional; what is missing or
unreadable becomes a note, never a number.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SUMMARY_FORMAT = 1  # the summary.json format this reader knows
# What a pipeline stage leaves in sweep-results/<method>/ of a method with no search space (DVC needs the
# stage's declared output to exist): not a sweep.
NOT_SWEPT = "not_swept.txt"
IMPORTANCE_STEM = "param_importances"  # the figure of the parameter importances


@dataclass
class Sweep:
    method: str
    path: Path
    summary: dict[str, Any] = field(default_factory=dict)  # empty when summary.json is missing or unreadable
    best_params: str | None = None  # best_params.yaml as written: its header names the trial, scores and budget
    figures: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def budget(self) -> str:
        """The budget in words, the study's own: every sweep result is shown with it."""
        budget = self.summary.get("budget")
        text = budget.get("text") if isinstance(budget, dict) else None
        return str(text) if text else "unknown (no summary.json with a budget)"

    @property
    def smoke(self) -> bool:
        """Fewer complete trials than the study needs to mean anything (or no summary to say otherwise)."""
        return bool(self.summary.get("smoke", True))

    @property
    def counts(self) -> str:
        counts = self.summary.get("counts") or {}
        return ", ".join(f"{number} {state}" for state, number in counts.items() if number) or "none"

    @property
    def importance_shown(self) -> bool:
        return bool(self.summary.get("importance"))

    @property
    def importance_note(self) -> str:
        return str(self.summary.get("importance_note") or "summary.json gives none")

    def shown_figures(self) -> list[Path]:
        """The sweeps' PNGs, without an importance figure when the summary holds no importance."""
        return [path for path in self.figures if self.importance_shown or path.stem != IMPORTANCE_STEM]


def load_sweeps(root: Path) -> list[Sweep]:
    """One Sweep per method folder; an absent or empty ``root`` means no sweep was run."""
    if not root.is_dir():
        return []
    return [_load_sweep(path) for path in sorted(root.iterdir()) if path.is_dir() and not (path / NOT_SWEPT).exists()]


def _load_sweep(path: Path) -> Sweep:
    sweep = Sweep(path.name, path)
    summary_path = path / "summary.json"
    try:
        summary = json.loads(summary_path.read_text())
        if not isinstance(summary, dict) or summary.get("format") != SUMMARY_FORMAT:
            raise ValueError(f"not a summary of format {SUMMARY_FORMAT}")
        sweep.summary = summary
    except FileNotFoundError:
        sweep.notes.append(f"{summary_path} missing: the sweep has not finished (no budget, counts or best trial)")
    except (OSError, ValueError) as error:
        sweep.notes.append(f"{summary_path} is unreadable ({type(error).__name__}: {error})")
    if sweep.summary.get("kept"):
        sweep.notes.append(str(sweep.summary["kept"]))
    listed = (sweep.summary.get("files") or {}).get("figures")
    candidates = [path / name for name in listed] if isinstance(listed, list) else sorted(path.glob("figures/*.png"))
    sweep.figures = [figure for figure in candidates if figure.suffix == ".png" and figure.is_file()]
    best = path / "best_params.yaml"
    if best.exists():
        sweep.best_params = best.read_text()
    else:
        sweep.notes.append(f"{best} missing: no complete trial, or the sweep has not finished")
    return sweep
