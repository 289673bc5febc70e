"""Progress for long loops that are not Lightning's: a live bar on a terminal, and a plain line
every few percent when output goes to a file or CI log (never thousands of carriage returns)."""
from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    """``with Progress(total, "predict") as bar: bar.update(n)``; silent when ``enabled`` is false."""

    def __init__(self, total: int, desc: str, *, enabled: bool = True, every_percent: float = 5.0,
                 unit: str = "items", stream: TextIO | None = None, initial: int = 0) -> None:
        self.total, self.desc, self.enabled, self.unit = max(int(total), 0), desc, enabled, unit
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.every = max(every_percent, 0.1)
        self.done, self._next_pct, self._start = 0, 0.0, time.perf_counter()
        self.note = ""  # appended to each line (e.g. the current loss)
        if initial:  # a resumed loop: lines continue from the next multiple of every_percent
            self.done = self._first = int(initial)
            pct = 100.0 * self.done / self.total if self.total else 100.0
            while self._next_pct <= pct + 1e-9:
                self._next_pct += self.every
        else:
            self._first = 0

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()

    def _line(self) -> str:
        pct = 100.0 * self.done / self.total if self.total else 100.0
        rate = (self.done - self._first) / max(time.perf_counter() - self._start, 1e-9)
        line = f"[{self.desc}] {self.done}/{self.total} {self.unit} ({pct:.0f}%, {rate:.3g} {self.unit}/s)"
        return f"{line} {self.note}" if self.note else line

    def update(self, n: int = 1) -> None:
        self.done += n
        if not self.enabled:
            return
        if self.tty:
            self.stream.write("\r" + self._line())
            self.stream.flush()
            return
        pct = 100.0 * self.done / self.total if self.total else 100.0
        if pct + 1e-9 >= self._next_pct or self.done >= self.total:
            self.stream.write(self._line() + "\n")
            self.stream.flush()
            while self._next_pct <= pct + 1e-9:
                self._next_pct += self.every
