"""What the analysis takes from the method registry (``reproduce.methods.METHODS``) and the ``analysis``
section of params.yaml (``config.analysis``, typed in reproduce/config/stages.py): a run label's display
name, its table position, and whether it distils from the frozen pre-trained teacher.

A run label is a registered method name (``teacher`` is the registered vanilla-teacher method). A label
the registry does not know (a method file removed since the run) keeps its label as its name and goes
after the registered ones. ``analysis.names`` and ``analysis.order`` override the registry.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from reproduce.config import AnalysisConfig

UNREGISTERED_ROW = 100  # the registry's default row_order


def _method(label: str) -> Any:
    from reproduce.methods import METHODS  # importing the package registers every method

    return METHODS.get(label) if label in METHODS else None


def display_name(label: str, settings: AnalysisConfig | None = None) -> str:
    """``analysis.names``' name for the label, else the registry's display name, else the label."""
    if settings is not None and settings.names.get(label):
        return settings.names[label]
    return str(getattr(_method(label), "display_name", label))


def row_order(label: str) -> int:
    return int(getattr(_method(label), "row_order", UNREGISTERED_ROW))


def ordered(labels: Iterable[str], settings: AnalysisConfig) -> list[str]:
    """The labels of ``analysis.order`` first, in its order; the rest by the registry's row_order, then by label."""
    position = {label: index for index, label in enumerate(settings.order)}
    return sorted(set(labels), key=lambda label: (position.get(label, len(position)), row_order(label), label))


def has_frozen_teacher(label: str) -> bool:
    """True when the method distils from the pre-trained teacher (runs/teacher/seed<teacher.seed>): its run's
    ``teacher`` network is then that teacher evaluated inside the run, the same network in every offline
    method, reported once, as the teacher row (the report checks that it scores what the teacher run did)."""
    return getattr(getattr(_method(label), "kind", None), "value", None) == "offline"
