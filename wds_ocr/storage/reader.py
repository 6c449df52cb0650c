"""What every shard reader offers (``RangeReader``: ranged reads into a buffer, whole small
files), and the settings and deadlines that bound remote reads."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from wds_ocr.errors import RemoteError
from wds_ocr.shards.manifest import MAX_MANIFEST_BYTES



@dataclass(frozen=True)
class RemoteSettings:
    """Timeouts, retries and caps of remote reads (tests shorten them to seconds)."""

    connect_timeout: float = 10.0  # to open a connection
    stall_timeout: float = 20.0  # an attempt fails when no byte arrives for this long
    request_deadline: float = 60.0  # one range read: every attempt and backoff together
    batch_deadline: float = 300.0  # one batch: every read of it together (ShardStream)
    tries: int = 3
    backoff: float = 0.5  # seconds before the second try, doubled for each further one
    max_manifest_bytes: int = MAX_MANIFEST_BYTES
    # Range requests of one batch in flight at once (each on its own kept-alive connection): a
    # shuffled batch is one request per member, and one at a time waits a round trip for each.
    parallel_requests: int = 4


class Deadline:
    """When a read must be over, and an event that cancels it sooner (a loader shutting down)."""

    def __init__(self, seconds: float | None, cancel: threading.Event | None = None, parent: "Deadline | None" = None):
        at = time.monotonic() + seconds if seconds is not None else float("inf")
        if parent is not None:
            at = min(at, parent.at)
            cancel = cancel or parent.cancel
        self.at = at
        self.cancel = cancel

    def remaining(self) -> float:
        return self.at - time.monotonic()

    @property
    def cancelled(self) -> bool:
        return self.cancel is not None and self.cancel.is_set()

    @property
    def over(self) -> bool:
        return self.cancelled or self.remaining() <= 0


class ReadCancelled(RemoteError):
    """A read given up because its loader is shutting down (another batch failed, or it was closed)."""


class RangeReader:
    """Reads ``[start, stop)`` of a named shard."""

    def read(self, shard: str, start: int, stop: int, deadline: Deadline | None = None) -> bytes:
        raise NotImplementedError

    def read_into(self, shard: str, start: int, stop: int, out: memoryview, deadline: Deadline | None = None) -> None:
        """Read ``[start, stop)`` into ``out`` (exactly ``stop - start`` writable bytes)."""
        out[:] = self.read(shard, start, stop, deadline)

    def describe(self, shard: str) -> str:
        raise NotImplementedError

    def close(self) -> None:
        """Release open handles (they reopen on the next read)."""


__all__ = ["Deadline", "RangeReader", "ReadCancelled", "RemoteSettings"]
