"""Progress for long commands: a bar on a terminal, plain lines everywhere else.

A tqdm bar redraws itself with carriage returns; written to a file or a CI log that is one line of
hundreds of frames. So a bar is drawn only when stderr is a terminal; otherwise a plain line goes
to stderr at most every ``LINE_SECONDS`` (and once at the end), e.g.

    train: 130/1500 steps (9%), 1.8 s/step, ~41 min left; loss 2.31, lr 2.9e-04, samples/s 4.4
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, TextIO

# Seconds between two plain progress lines (WDS_OCR_PROGRESS_SECONDS overrides it; 0: every update).
LINE_SECONDS = 30.0


def _line_seconds() -> float:
    raw = os.environ.get("WDS_OCR_PROGRESS_SECONDS")
    try:
        return max(0.0, float(raw)) if raw is not None else LINE_SECONDS
    except ValueError:
        return LINE_SECONDS


def _duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 90:
        return f"{seconds / 60:.0f} min"
    return f"{seconds:.0f} s"


class Progress:
    """``update(done, total, **postfix)``; ``write(line)`` prints a line without breaking the bar;
    ``close()`` ends it (a plain final line when not on a terminal)."""

    def __init__(self, desc: str, unit: str, quiet: bool = False, stream: TextIO | None = None,
                 terminal: bool | None = None):
        self.desc, self.unit, self.quiet = desc, unit, quiet
        self.stream = stream or sys.stderr
        self.terminal = self.stream.isatty() if terminal is None else terminal
        self.bar: Any = None
        self.done, self.total, self.initial = 0, 0, None
        self.postfix: dict[str, Any] = {}
        self.started = time.perf_counter()
        self.printed_at: float | None = None
        self.printed_done: int | None = None
        self.interval = _line_seconds()

    def update(self, done: int, total: int | None = None, **postfix: Any) -> None:
        if self.quiet:
            return
        if self.initial is None:
            self.initial, self.started = done, time.perf_counter()
        self.done, self.total = done, total or self.total
        if postfix:
            self.postfix = postfix
        if self.terminal:
            self._draw()
            return
        now = time.perf_counter()
        if self.printed_at is None or now - self.printed_at >= self.interval:
            self._line()
            self.printed_at, self.printed_done = now, done

    def _draw(self) -> None:
        from tqdm import tqdm

        if self.bar is None:
            self.bar = tqdm(total=self.total or None, initial=self.done, unit=self.unit, desc=self.desc,
                            file=self.stream)
        if self.total and self.bar.total != self.total:
            self.bar.total = self.total
        self.bar.n = self.done
        if self.postfix:
            self.bar.set_postfix({k: v for k, v in self.postfix.items()}, refresh=False)
        self.bar.refresh()

    def _line(self) -> None:
        elapsed = time.perf_counter() - self.started
        parts = [f"{self.desc}: {self.done}" + (f"/{self.total}" if self.total else "") + f" {self.unit}s"]
        if self.total:
            parts[0] += f" ({self.done / self.total:.0%})"
        moved = self.done - (self.initial or 0)
        if moved > 0 and elapsed > 0:
            per = elapsed / moved
            rate = f"{per:.1f} s/{self.unit}" if per >= 1 else f"{1 / per:.1f} {self.unit}s/s"
            parts.append(rate + (f", ~{_duration(per * (self.total - self.done))} left"
                                 if self.total and self.done < self.total else ""))
        line = ", ".join(parts)
        if self.postfix:
            line += "; " + ", ".join(f"{k} {v}" for k, v in self.postfix.items())
        print(line, file=self.stream, flush=True)

    def write(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif not self.quiet and not self.terminal and self.initial is not None and self.printed_done != self.done:
            self._line()  # the final state
