"""``python -m reproduce methods``: every registered method, its kind, the coefficients a sweep searches
(with their ranges or choices) and its default coefficients."""

from __future__ import annotations

import argparse
from typing import Any

from reproduce.cli import COMMANDS, Command


def describe_range(spec: dict[str, Any]) -> str:
    """``float 0.25..4 log``, ``int 1..8 step 2`` or ``one of hard, soft`` (sweeps/space.py's format)."""
    if spec.get("type") == "categorical":
        return "one of " + ", ".join(map(str, spec.get("choices", [])))
    text = f"{spec.get('type')} {spec.get('low')}..{spec.get('high')}"
    if spec.get("log"):
        text += " log"
    if spec.get("step") is not None:
        text += f" step {spec['step']}"
    return text


def run(args: argparse.Namespace) -> int:
    from reproduce.methods.base import registered

    for cls in registered():
        space = "; ".join(f"{name} {describe_range(spec)}" for name, spec in cls.search_space.items()) or "-"
        print(f"{cls.name:9s} {cls.display_name:18s} {cls.kind.value}\n"
              f"{'':9s} search: {space}\n"
              f"{'':9s} defaults: {cls.default_params()}")
    return 0


COMMANDS.register(Command("methods", "list the methods, their kind, search ranges and default coefficients",
                          lambda parser: None, run, description=__doc__))
