"""Opening a shard location by URL: the manifest read (capped) and validated, and the reader for
its scheme (a folder or file://, http(s)://, s3://, other fsspec schemes)."""

from __future__ import annotations

import hashlib
import os
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from wds_ocr.errors import ManifestError, RemoteError
from wds_ocr.shards.manifest import Manifest, manifest_path, parse_manifest, read_manifest_bytes
from wds_ocr.shards.naming import MANIFEST_NAME
from wds_ocr.storage.fsspec import FsspecReader
from wds_ocr.storage.http import HttpReader
from wds_ocr.storage.local import LocalReader
from wds_ocr.storage.reader import RangeReader, RemoteSettings


@dataclass
class Location:
    """An opened shard location: its manifest, a reader, and a way to tell whether the manifest
    has changed since (the shards were rebuilt while a reader was reading them)."""

    text: str  # where the manifest is, for messages
    manifest: Manifest
    reader: RangeReader
    digest: str  # sha256 of the manifest bytes read at open
    _refetch: Callable[[], bytes]
    _path: Path | None = None  # local manifests: stat first, read only when it changed
    _stat: tuple | None = None

    def changed(self) -> str | None:
        """None while the manifest is the one read at open; otherwise what happened to it."""
        if self._path is not None:
            try:
                info = os.stat(self._path)
            except FileNotFoundError:
                return "it was removed"
            except OSError as exc:
                return f"it cannot be read ({exc.strerror})"
            signature = (info.st_ino, info.st_size, info.st_mtime_ns)
            if signature == self._stat:
                return None
        try:
            data = self._refetch()
        except (ManifestError, RemoteError, OSError):
            return "it was removed" if self._path is not None else None
        if hashlib.sha256(data).hexdigest() != self.digest:
            return "it was replaced"
        if self._path is not None:
            self._stat = signature
        return None


def _ranged_location(reader: HttpReader, name: str) -> Location:
    """An HTTP or S3 location: the manifest fetched (capped), the reader told each shard's size, and
    Range support checked with the first request."""
    data = reader.fetch(name)
    manifest = parse_manifest(data, reader.describe(name))
    reader.sizes = {e.name: e.bytes for e in manifest.shards}
    if manifest.shards:
        reader.check_range_support(manifest.shards[0].name)
    return Location(reader.describe(name), manifest, reader, hashlib.sha256(data).hexdigest(),
                    lambda: reader.fetch(name))


def open_shards(location: str | Path, remote: RemoteSettings | None = None) -> Location:
    """Open a shard folder, manifest path or URL: manifest validated, reader ready, Range support of
    an HTTP server checked with its first request."""
    text = str(location)
    scheme = urllib.parse.urlparse(text).scheme if "://" in text else ""
    if scheme in ("", "file"):
        path = manifest_path(Path(urllib.parse.unquote(urllib.parse.urlparse(text).path)) if scheme == "file"
                             else Path(text))
        info = os.stat(path) if path.exists() else None
        limit = (remote or RemoteSettings()).max_manifest_bytes  # the same cap wherever the manifest is
        data = read_manifest_bytes(path, limit)
        manifest = parse_manifest(data, str(path))
        reader = LocalReader(path.parent, {e.name: e.bytes for e in manifest.shards})
        opened = Location(str(path), manifest, reader, hashlib.sha256(data).hexdigest(),
                          lambda: read_manifest_bytes(path, limit), path,
                          (info.st_ino, info.st_size, info.st_mtime_ns) if info else None)
        return opened
    base, name = (text.rsplit("/", 1) if text.endswith(".json") else (text.rstrip("/"), MANIFEST_NAME))
    if scheme in ("http", "https"):
        return _ranged_location(HttpReader(base, remote), name)
    if scheme == "s3":
        from wds_ocr.storage.s3 import S3Reader, S3Url

        return _ranged_location(S3Reader(S3Url.parse(base), remote), name)
    fs_reader = FsspecReader(base, (remote or RemoteSettings()).max_manifest_bytes)
    data = fs_reader.fetch(name)
    manifest = parse_manifest(data, f"{base}/{name}")
    return Location(f"{base}/{name}", manifest, fs_reader, hashlib.sha256(data).hexdigest(),
                    lambda: fs_reader.fetch(name))


def open_location(location: str | Path, remote: RemoteSettings | None = None) -> tuple[Manifest, RangeReader]:
    """The manifest and a range reader for a shard folder, manifest path or URL."""
    opened = open_shards(location, remote)
    return opened.manifest, opened.reader


__all__ = ["Location", "open_location", "open_shards"]
