"""How each run of a launch ended, and the lines that say so at the end."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reproduce.errors import UserError
from reproduce.launch.runs import RunJob

OK = ("done", "done earlier")


@dataclass(frozen=True)
class Outcome:
    run: RunJob
    state: str  # done | done earlier | failed | interrupted | skipped | not started
    log: Path | None = None
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.state in OK


class RunsFailedError(UserError):
    """Some runs of a launch did not finish; the message names each with its log."""


@dataclass
class Report:
    outcomes: list[Outcome]  # in the launch's order
    interrupted: bool = False
    notes: list[str] = field(default_factory=list)

    @classmethod
    def of(cls, runs: list[RunJob], outcomes: dict[str, Outcome], interrupted: bool = False,
           note: str = "") -> Report:
        every = [outcomes.get(run.name, Outcome(run, "not started")) for run in runs]
        return cls(every, interrupted, [note] if note else [])

    @property
    def unfinished(self) -> list[Outcome]:
        return [outcome for outcome in self.outcomes if not outcome.ok]

    @property
    def exit_code(self) -> int:
        return 130 if self.interrupted else 1 if self.unfinished else 0

    def lines(self) -> list[str]:
        done = len(self.outcomes) - len(self.unfinished)
        lines = [f"{done} of {len(self.outcomes)} runs done" + (", interrupted" if self.interrupted else "")]
        for outcome in self.unfinished:
            where = f"; log {outcome.log}" if outcome.log else ""
            lines.append(f"  {outcome.run.name}: {outcome.state}" + (f" ({outcome.detail})" if outcome.detail else "")
                         + where)
        if self.unfinished:
            lines.append("rerun the same command: finished runs are kept, interrupted ones resume from their last "
                         "epoch")
        return lines + self.notes

    def summaries(self) -> list[dict[str, Any]]:
        """Every run's metrics.json; ``RunsFailedError`` naming the unfinished runs and their logs."""
        if self.unfinished:
            raise RunsFailedError("; ".join(self.lines()))
        return [json.loads((outcome.run.run_dir / "metrics.json").read_text()) for outcome in self.outcomes]


def headline(run: RunJob) -> str:
    """The run's primary network's test top-1 at the last epoch, from its metrics.json ("" without one)."""
    try:
        summary = json.loads((run.run_dir / "metrics.json").read_text())
    except (OSError, ValueError):
        return ""
    return summary_line(summary)


def summary_line(summary: dict[str, Any]) -> str:
    primary = summary["primary"]
    return f"{primary} test top-1 {summary['last']['test'][primary]['top1']:.2f} at the last epoch"
