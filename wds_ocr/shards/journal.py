"""The build journal and lock: what an interrupted build already finished, and who is building.

``.journal.<prefix>/settings.json`` holds everything the shards depend on (config fingerprint,
shard settings, annotation digest, sample names, listing range); ``<shard>.json`` is written
atomically after each shard's rename. A rerun keeps the leading run of entries whose shard file
is complete (size and sha256), whose name is the next in sequence and whose source images still
hash as they did, and continues after them. A journal written under other settings is wiped.
The journal is removed once the manifest is written.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable, TextIO

from wds_ocr.errors import BuildError
from wds_ocr.shards.manifest import write_atomic
from wds_ocr.shards.writer import shard_name


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


class Journal:
    """Per-prefix record of completed shards, so a killed build resumes where it stopped."""

    def __init__(self, out_dir: Path, prefix: str, settings: dict[str, Any]):
        self.folder = out_dir / f".journal.{prefix}"
        self.settings = settings

    def load(self) -> list[dict[str, Any]]:
        """Entries in shard order when the stored settings match; otherwise wipe and return []."""
        try:
            stored = json.loads((self.folder / "settings.json").read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            stored = None
        if stored != self.settings:
            self.reset()
            return []
        entries = []
        for path in sorted(self.folder.glob("*.tar.json")):
            try:
                entries.append(json.loads(path.read_text(encoding="utf-8")))
            except (json.JSONDecodeError, UnicodeDecodeError):
                break
        return entries

    def reset(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
        self.folder.mkdir(parents=True)
        write_atomic(self.folder / "settings.json", json.dumps(self.settings, sort_keys=True).encode())

    def add(self, entry: dict[str, Any]) -> None:
        write_atomic(self.folder / f"{entry['shard']['name']}.json", json.dumps(entry, sort_keys=True).encode())

    def drop_from(self, name: str) -> None:
        """Forget the entry for shard ``name`` and every later one."""
        for path in sorted(self.folder.glob("*.tar.json")):
            if path.name >= f"{name}.json":
                path.unlink()

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def reusable_entries(
    entries: list[dict[str, Any]], out_dir: Path, prefix: str, lo: int, digest_at: Callable[[int], str]
) -> list[dict[str, Any]]:
    """The leading run of entries whose shards are complete and whose source images are unchanged.

    ``digest_at(position)`` is the current sha256 of the image at a listing position; an entry
    lists the digests of the positions it covers (from the previous entry's ``next`` to its own).
    """
    kept: list[dict[str, Any]] = []
    start = lo
    for entry in entries:
        shard = entry.get("shard", {})
        stop = entry.get("next", -1)
        path = out_dir / shard.get("name", "")
        if (
            shard.get("name") != shard_name(prefix, len(kept))
            or not isinstance(stop, int)
            or stop <= start
            or len(entry.get("digests", ())) != stop - start
            or not path.is_file()
            or path.stat().st_size != shard.get("bytes")
            or file_sha256(path) != shard.get("sha256")
            or any(digest_at(start + i) != d for i, d in enumerate(entry["digests"]))
        ):
            break
        kept.append(entry)
        start = stop
    return kept


def remove_strays(out_dir: Path, prefix: str, keep: set[str]) -> None:
    """Delete temporary files and shards of this prefix that are not in ``keep``."""
    pattern = re.compile(rf"^\.?{re.escape(prefix)}-\d{{6}}\.tar(\.tmp)?$")
    for path in out_dir.iterdir():
        if pattern.match(path.name) and path.name not in keep:
            path.unlink()


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
