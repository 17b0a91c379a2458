"""One progress line per run while runs train elsewhere (their own output goes to their logs).

On a terminal the lines form a table redrawn in place (at most twice a second); in a log or a pipe each
run prints a line when its state changes (waiting, running, done, failed ...), not at every epoch.
"""

from __future__ import annotations

import shutil
import sys
import time
from typing import TextIO

REDRAW_S = 0.5


class Board:
    def __init__(self, names: list[str], stream: TextIO | None = None, tty: bool | None = None) -> None:
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty() if tty is None else tty
        self.width = max(map(len, names), default=0)
        self.states: dict[str, str] = {name: "" for name in names}
        self.details: dict[str, str] = {name: "" for name in names}
        self.drawn = 0  # lines of the table on the terminal now
        self.last_draw = 0.0

    def set(self, name: str, state: str, detail: str = "") -> None:
        """``state``: a word (waiting, running, done ...); ``detail``: where, how far, the log."""
        changed = state != self.states[name]
        self.states[name], self.details[name] = state, detail
        if self.tty:
            self.draw(force=changed)
        elif changed:
            print(self.line(name), file=self.stream, flush=True)

    def line(self, name: str) -> str:
        return f"{name:<{self.width}}  {self.states[name]:<12} {self.details[name]}".rstrip()

    def draw(self, force: bool = False) -> None:
        if not self.tty or (not force and time.monotonic() - self.last_draw < REDRAW_S):
            return
        up = f"\x1b[{self.drawn}F" if self.drawn else ""  # back to the table's first line
        width = shutil.get_terminal_size().columns - 1  # a wrapped line would throw the count of lines off
        self.stream.write(up + "".join(f"\x1b[2K{self.line(name)[:width]}\n" for name in self.states))
        self.stream.flush()
        self.drawn, self.last_draw = len(self.states), time.monotonic()

    def close(self) -> None:
        self.draw(force=True)
