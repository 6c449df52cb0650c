"""The build journal and lock: what an interrupted build already finished, and who is building.

``.journal.<prefix>/settings.json`` holds everything the shards depend on (config fingerprint,
shard settings, annotation digest, sample names, listing range); ``<shard>.json`` is written
atomically after each shard's rename. A rerun keeps the leading run of entries whose shard file
is complete (size and sha256), whose name is the next in sequence and whose source images still
hash as they did, and continues after them. A journal written under other settings is wiped
(``build-shards`` first refuses such a folder unless ``--overwrite``). Entries are
``JournalEntry`` objects inside the package, JSON on disk, and every field is validated when read:
an entry that does not hold together ends the reusable run there. The journal is removed once the
manifest is written.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TextIO

from wds_ocr import jsonio
from wds_ocr.data.coverage import Coverage
from wds_ocr.data.sources import read_regular_file
from wds_ocr.errors import BuildError, ManifestError
from wds_ocr.data.paths import write_atomic
from wds_ocr.shards.manifest import MAX_MANIFEST_BYTES, ShardEntry
from wds_ocr.shards.naming import FOLDER_LOCK_NAME, MAX_INDEX, journal_folder_name, shard_name, stray_pattern
from wds_ocr.shards.rejects import Reject


@dataclass
class Pending:
    """What the outcomes since the last closed shard noted (rejects after the last written sample)."""

    rejects: list[Reject] = field(default_factory=list)
    skips: list[Reject] = field(default_factory=list)
    digests: list[str] = field(default_factory=list)  # image sha256 (or "unreadable") per position
    coverage: Coverage = Coverage()

    def note(self, digest: str, reject: Reject | None, skips: list[Reject], coverage: Coverage) -> None:
        self.digests.append(digest)
        if reject is not None:
            self.rejects.append(reject)
        self.skips.extend(skips)
        self.coverage = self.coverage + coverage

    def close(self, shard: ShardEntry, next_position: int) -> "JournalEntry":
        return JournalEntry(shard, next_position, tuple(self.rejects), tuple(self.skips), tuple(self.digests),
                            self.coverage)


@dataclass(frozen=True)
class JournalEntry:
    """One closed shard and every outcome from the previous entry's ``next`` up to its own."""

    shard: ShardEntry
    next: int  # the listing position to continue from
    rejects: tuple[Reject, ...]
    skips: tuple[Reject, ...]
    digests: tuple[str, ...]
    coverage: Coverage

    def as_dict(self) -> dict[str, Any]:
        return {"shard": self.shard.as_dict(), "next": self.next, "rejects": [r.as_dict() for r in self.rejects],
                "skips": [s.as_dict() for s in self.skips], "digests": list(self.digests),
                "coverage": self.coverage.as_dict()}

    @classmethod
    def from_dict(cls, body: Any, where: str) -> "JournalEntry":
        """Raises ValueError (or ManifestError from the shard entry) naming what is wrong."""
        if not isinstance(body, dict) or set(body) != {"shard", "next", "rejects", "skips", "digests", "coverage"}:
            raise ValueError(f"{where}: not a journal entry")
        shard = ShardEntry.from_dict(body["shard"], where)
        if type(body["next"]) is not int or not 0 <= body["next"] <= MAX_INDEX:
            raise ValueError(f"{where}: next must be a listing position")
        for name in ("rejects", "skips", "digests"):
            if not isinstance(body[name], list):
                raise ValueError(f"{where}: {name} must be a list")
        if not all(isinstance(d, str) for d in body["digests"]):
            raise ValueError(f"{where}: digests must be strings")
        return cls(shard, body["next"], tuple(Reject.from_dict(r, where) for r in body["rejects"]),
                   tuple(Reject.from_dict(s, where) for s in body["skips"]), tuple(body["digests"]),
                   Coverage.from_dict(body["coverage"], f"{where} coverage"))


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


class Journal:
    """Per-prefix record of completed shards, so a killed build resumes where it stopped."""

    def __init__(self, out_dir: Path, prefix: str, settings: dict[str, Any]):
        self.folder = out_dir / journal_folder_name(prefix)
        self.settings = settings

    def stored_settings(self) -> dict[str, Any] | None:
        """The settings an earlier (interrupted) build recorded; None when there is no journal."""
        try:
            stored = jsonio.loads(_read_json_file(self.folder / "settings.json"))
        except (OSError, ValueError, RecursionError):
            return None
        return stored if isinstance(stored, dict) else None

    def load(self) -> list[JournalEntry]:
        """Entries in shard order when the stored settings match; otherwise wipe and return []."""
        if self.stored_settings() != self.settings:
            self.reset()
            return []
        entries = []
        for path in sorted(self.folder.glob("*.tar.json")):
            try:
                entries.append(JournalEntry.from_dict(jsonio.loads(_read_json_file(path)), path.name))
            except (OSError, ValueError, RecursionError, ManifestError):
                break  # a torn or edited entry: the run of reusable shards ends before it
        return entries

    def reset(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
        self.folder.mkdir(parents=True)
        write_atomic(self.folder / "settings.json", json.dumps(self.settings, sort_keys=True).encode())

    def add(self, entry: JournalEntry) -> None:
        write_atomic(self.folder / f"{entry.shard.name}.json", json.dumps(entry.as_dict(), sort_keys=True).encode())

    def drop_from(self, name: str) -> None:
        """Forget the entry for shard ``name`` and every later one."""
        for path in sorted(self.folder.glob("*.tar.json")):
            if path.name >= f"{name}.json":
                path.unlink()

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def _read_json_file(path: Path) -> str:
    return read_regular_file(path, MAX_MANIFEST_BYTES).decode("utf-8")


def reusable_entries(
    entries: list[JournalEntry], out_dir: Path, prefix: str, lo: int, digest_at: Callable[[int], str]
) -> list[JournalEntry]:
    """The leading run of entries whose shards are complete and whose source images are unchanged.

    ``digest_at(position)`` is the current sha256 of the image at a listing position; an entry
    lists the digests of the positions it covers (from the previous entry's ``next`` to its own).
    """
    kept: list[JournalEntry] = []
    start = lo
    for entry in entries:
        shard = entry.shard
        stop = entry.next
        path = out_dir / shard.name
        if (
            shard.name != shard_name(prefix, len(kept))
            or stop <= start
            or len(entry.digests) != stop - start
            or not path.is_file()
            or path.stat().st_size != shard.bytes
            or file_sha256(path) != shard.sha256
            or any(digest_at(start + i) != d for i, d in enumerate(entry.digests))
        ):
            break
        kept.append(entry)
        start = stop
    return kept


def remove_strays(out_dir: Path, prefix: str, keep: set[str]) -> None:
    """Delete temporary files and shards of this prefix that are not in ``keep``."""
    pattern = stray_pattern(prefix)
    for path in out_dir.iterdir():
        if pattern.match(path.name) and path.name not in keep:
            path.unlink()


class FolderLock:
    """One folder, one kind of build: a whole build (and ``merge``) holds ``.lock`` exclusively, each
    part of a partitioned build holds it shared, so the parts of one array job run side by side but
    never beside a whole build or a merge into the same folder. Non-blocking. The last holder removes
    the file, while it holds the lock exclusively; a holder whose file was removed meanwhile (its
    lock is on an inode the path no longer names) takes the lock again on the path's file."""

    def __init__(self, folder: Path, shared: bool):
        self.path = folder / FOLDER_LOCK_NAME
        self.shared = shared
        self.handle: TextIO | None = None

    def _busy(self) -> BuildError:
        holder = "a whole build or a merge" if self.shared else "another build (whole, partitioned or a merge)"
        return BuildError(f"{self.path.parent} is being written by {holder} (lock {self.path.name}); wait for it "
                          "or use another --out: a whole build and a partitioned build never share a folder")

    def _names_this(self, handle: TextIO) -> bool:
        try:
            return os.stat(self.path).st_ino == os.fstat(handle.fileno()).st_ino
        except FileNotFoundError:
            return False

    def __enter__(self) -> "FolderLock":
        for _ in range(3):
            handle = open(self.path, "a+")
            try:
                fcntl.flock(handle, (fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                raise self._busy() from None
            if self._names_this(handle):
                self.handle = handle
                return self
            handle.close()
        raise self._busy()

    def __exit__(self, *exc: object) -> None:
        if self.handle is None:
            return
        try:
            fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the last holder: nobody else has it
            if self._names_this(self.handle):
                self.path.unlink(missing_ok=True)
        except BlockingIOError:
            pass  # another part still holds it; the last one removes the file
        fcntl.flock(self.handle, fcntl.LOCK_UN)
        self.handle.close()
        self.handle = None


class BuildLock:
    """An exclusive, non-blocking lock on ``path`` (removed on release)."""

    def __init__(self, path: Path):
        self.path = path
        self.handle: TextIO | None = None

    def _busy(self) -> BuildError:
        return BuildError(f"{self.path.parent} is being written by another build (lock {self.path.name}); "
                          "wait for it or use another --out")

    def __enter__(self) -> "BuildLock":
        for _ in range(3):
            handle = open(self.path, "a+")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                raise self._busy() from None
            # A holder that just finished unlinks the file: a lock on that unlinked inode would
            # not exclude a build that creates a fresh file, so hold the file the path names now.
            try:
                current = os.stat(self.path).st_ino
            except FileNotFoundError:
                current = None
            if current == os.fstat(handle.fileno()).st_ino:
                self.handle = handle
                return self
            handle.close()
        raise self._busy()

    def __exit__(self, *exc: object) -> None:
        if self.handle is not None:
            self.path.unlink(missing_ok=True)  # while still holding the lock
            fcntl.flock(self.handle, fcntl.LOCK_UN)
            self.handle.close()
            self.handle = None
