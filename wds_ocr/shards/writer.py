"""Rolling shard writer: records in listing order -> ``<prefix>-NNNNNN.tar`` files.

Each shard is written under a temporary name (``.<name>.tmp``), closed with its end-of-archive
blocks, fsynced and renamed; only then does its journal entry record what it covers (the shard
entry, the listing position to continue from, and the rejects, word skips, image digests and
target coverage of every outcome since the previous shard). A shard rolls over before a record that would push it
past ``max_bytes`` (a single record larger than that gets a shard of its own) and after
``max_samples`` records.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Protocol

from wds_ocr.data.coverage import Coverage
from wds_ocr.shards.journal import JournalEntry, Pending
from wds_ocr.shards.manifest import DIGEST_HEX, ShardEntry
from wds_ocr.shards.naming import shard_name, temporary_name
from wds_ocr.shards.rejects import Reject
from wds_ocr.shards.tario import BLOCK, RECORD_SIZE, MemberBytes, TarWriter


@dataclass
class Outcome:
    """What processing one listing position gave: a record, or a reject; plus its word skips."""

    position: int
    digest: str  # sha256 hex of the image file, or "unreadable"
    record: MemberBytes | None = None  # the record as its tar member, hashed where it was made
    key: str | None = None
    reject: Reject | None = None
    skips: list[Reject] = field(default_factory=list)
    coverage: Coverage = Coverage()  # the record's words: in the targets or left out, by reason


# Bytes written to a shard between two background flushes.
FLUSH_EVERY = 16 << 20
_datasync = getattr(os, "fdatasync", os.fsync)


class _Flusher:
    """Writes a growing shard's pages to disk in a thread, every ``FLUSH_EVERY`` bytes, so the
    fsync that closes it (which makes it durable, before its rename) has little left to wait for
    and the writing overlaps the processing. A failed background flush is left to the final fsync,
    which raises."""

    def __init__(self, fd: int):
        self._fd = fd
        self._pending = 0
        self._thread: threading.Thread | None = None

    def wrote(self, count: int) -> None:
        self._pending += count
        if self._pending >= FLUSH_EVERY and (self._thread is None or not self._thread.is_alive()):
            self._pending = 0
            self._thread = threading.Thread(target=self._flush, name="wds-ocr-shard-flush", daemon=True)
            self._thread.start()

    def _flush(self) -> None:
        try:
            _datasync(self._fd)
        except OSError:
            pass

    def join(self) -> None:
        if self._thread is not None:
            self._thread.join()


class JournalLike(Protocol):
    def add(self, entry: JournalEntry) -> None: ...


class ShardSink:
    """Appends records to rolling shards; every closed shard gets a journal entry."""

    def __init__(self, out_dir: Path, prefix: str, max_samples: int, max_bytes: int, journal: JournalLike,
                 entries: list[ShardEntry]):
        self.out_dir = out_dir
        self.prefix = prefix
        self.max_samples = max_samples
        self.max_bytes = max_bytes
        self.journal = journal
        self.entries = list(entries)  # closed shards, including those reused from an earlier run
        self._open: tuple[Path, BinaryIO, TarWriter] | None = None
        self._flusher: _Flusher | None = None
        self._keys: list[str] = []
        self._digests: list[str] = []
        self._checksums: list[str] = []
        self._tail = Pending()

    @property
    def tail(self) -> Pending:
        """Outcomes noted since the last closed shard (rejects after the last written sample)."""
        return self._tail

    def _would_overflow(self, span: int) -> bool:
        if self._open is None:
            return False
        writer = self._open[2]
        end = writer.members_end + span + 2 * BLOCK
        projected = (end + RECORD_SIZE - 1) // RECORD_SIZE * RECORD_SIZE
        return projected > self.max_bytes

    def consume(self, outcome: Outcome) -> None:
        """Note an outcome; append its record, rolling over by bytes before and by count after."""
        if outcome.record is not None and self._would_overflow(outcome.record.size):
            self.close(next_position=outcome.position)
        self._tail.note(outcome.digest, outcome.reject, outcome.skips, outcome.coverage)
        if outcome.record is None or outcome.key is None:
            return
        if self._open is None:
            final = self.out_dir / shard_name(self.prefix, len(self.entries))
            tmp = final.with_name(temporary_name(final.name))
            handle = open(tmp, "wb")
            self._open = (tmp, handle, TarWriter(handle))
            self._flusher = _Flusher(handle.fileno())
        writer = self._open[2]
        writer.add_member(outcome.record)
        self._flusher.wrote(outcome.record.size)
        self._keys.append(outcome.key)
        self._digests.append(outcome.record.digest[:DIGEST_HEX])
        self._checksums.append(outcome.record.checksum)
        if len(self._keys) >= self.max_samples:
            self.close(next_position=outcome.position + 1)

    def close(self, next_position: int) -> None:
        """Finish the open shard (if any): end blocks, fsync, rename, journal entry."""
        if self._open is None:
            return
        tmp, handle, writer = self._open
        total, sha = writer.close()
        handle.flush()
        self._stop_flusher()
        os.fsync(handle.fileno())
        handle.close()
        final = self.out_dir / shard_name(self.prefix, len(self.entries))
        os.replace(tmp, final)
        entry = ShardEntry(
            name=final.name,
            samples=len(self._keys),
            bytes=total,
            sha256=sha,
            first_key=self._keys[0],
            last_key=self._keys[-1],
            keys=tuple(self._keys),
            offsets=tuple(writer.offsets),
            digests=tuple(self._digests),
            members_end=writer.members_end,
            checksums=tuple(self._checksums),
        )
        self.journal.add(self._tail.close(entry, next_position))
        self.entries.append(entry)
        self._open = None
        self._keys, self._digests, self._checksums = [], [], []
        self._tail = Pending()

    def abort(self) -> None:
        """Drop the shard being written (its temporary file)."""
        if self._open is not None:
            tmp, handle, _ = self._open
            self._stop_flusher()
            handle.close()
            tmp.unlink(missing_ok=True)
            self._open = None

    def _stop_flusher(self) -> None:
        if self._flusher is not None:
            self._flusher.join()  # before the descriptor it flushes is closed
            self._flusher = None
