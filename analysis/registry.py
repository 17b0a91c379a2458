"""What the analysis takes from the method registry (``reproduce.methods.METHODS``): a run label's
display name, its table position, and whether it distils from the frozen pre-trained teacher.

A run label is a registered method name (``teacher`` is the registered vanilla-teacher method). A label
the registry does not know (a method file removed since the run) keeps its label as its name and goes
after the registered ones.
"""

from __future__ import annotations

from typing import Any

UNREGISTERED_ROW = 100  # the registry's default row_order


def _method(label: str) -> Any:
    from reproduce.methods import METHODS  # importing the package registers every method

    return METHODS.get(label) if label in METHODS else None


def display_name(label: str) -> str:
    return str(getattr(_method(label), "display_name", label))


def row_order(label: str) -> int:
    return int(getattr(_method(label), "row_order", UNREGISTERED_ROW))


def has_frozen_teacher(label: str) -> bool:
    """True when the method distils from the pre-trained teacher (runs/teacher/seed<teacher.seed>): its run's
    ``teacher`` network is then that teacher evaluated inside the run, the same network in every offline
    method, reported once, as the teacher row (the report checks that it scores what the teacher run did)."""
    return getattr(getattr(_method(label), "kind", None), "value", None) == "offline"
