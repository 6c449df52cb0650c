"""The loader's skip-or-fail policy: one object that decides, logs and counts.

``SkipPolicy("raise")`` re-raises every error; ``SkipPolicy("skip")`` skips a bad *record* — a
``ShardFormatError`` (a record or member that does not follow the format, or bytes that differ
from the manifest) — notes it in the batch's ``skipped`` list and logs it, and re-raises
everything else: a server that failed (``RemoteError``), shards rebuilt under the reader
(``ShardsChangedError``), bugs. Skips are tallied in the main process as batches arrive
(``tally``), so threads and DataLoader worker processes count alike; the policy keeps the count
and the first ``keep`` skips, so its memory stays bounded however many records are bad.
"""

from __future__ import annotations

import logging
import threading
from typing import Iterable, NamedTuple

from wds_ocr.errors import ShardFormatError, ShardsChangedError

log = logging.getLogger("wds_ocr.loader")


class Skipped(NamedTuple):
    """One skipped record (compares equal to the plain (shard, key, reason) tuple)."""

    shard: str
    key: str | None
    reason: str

    def line(self) -> str:
        return f"{self.shard} [{self.key}]: {self.reason}" if self.key else f"{self.shard}: {self.reason}"


class SkipPolicy:
    def __init__(self, mode: str = "raise", keep: int = 100):
        if mode not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {mode!r}")
        self.mode = mode
        self.keep = keep
        self.count = 0
        self.examples: list[Skipped] = []
        self._lock = threading.Lock()

    @classmethod
    def of(cls, value: "str | SkipPolicy") -> "SkipPolicy":
        return value if isinstance(value, SkipPolicy) else cls(value)

    @property
    def skips(self) -> bool:
        return self.mode == "skip"

    def handle(self, error: Exception, into: list[Skipped]) -> None:
        """Skip ``error`` into ``into`` when the policy allows it; otherwise raise it."""
        if not self.skips or not isinstance(error, ShardFormatError) or isinstance(error, ShardsChangedError):
            raise error
        log.warning("skipping %s", error)
        into.append(Skipped(error.shard, error.key, error.reason))

    def tally(self, skipped: Iterable[Skipped | tuple]) -> None:
        """Count a delivered batch's skips (called once per batch, in the main process)."""
        items = [Skipped(*item) for item in skipped]
        if not items:
            return
        with self._lock:
            self.count += len(items)
            room = self.keep - len(self.examples)
            if room > 0:
                self.examples.extend(items[:room])

    def summary(self) -> dict:
        return {"skipped": self.count, "examples": [item.line() for item in self.examples]}
