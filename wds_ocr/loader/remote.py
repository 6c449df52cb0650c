"""Byte-range access to shard folders: local paths, file://, http(s)://, and fsspec URLs (s3://, gs://).

A location is a folder (or its manifest.json) holding the shards. Readers fetch exact byte
ranges taken from the manifest's per-sample offsets: local files with ``os.pread`` (one system
call, no seek state shared between threads), HTTP with ``Range`` requests, other schemes through
fsspec when it is installed. Readers open lazily, so they can be created before DataLoader
workers start and used inside each worker.
"""

from __future__ import annotations

import os
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from wds_ocr.errors import ManifestError, ShardFormatError
from wds_ocr.shards.manifest import MANIFEST_NAME, Manifest, load_manifest, parse_manifest

_RETRIES = 3


class RangeReader:
    """Reads ``[start, stop)`` of a named shard."""

    def read(self, shard: str, start: int, stop: int) -> bytes:
        raise NotImplementedError

    def describe(self, shard: str) -> str:
        raise NotImplementedError

    def close(self) -> None:
        """Release open handles (they reopen on the next read)."""


class LocalReader(RangeReader):
    def __init__(self, folder: Path):
        self.folder = folder
        self._fds: dict[str, int] = {}
        self._pid = os.getpid()

    def _fd(self, shard: str) -> int:
        if self._pid != os.getpid():  # forked into a worker: do not share descriptors' positions/lifetimes
            self._fds = {}
            self._pid = os.getpid()
        fd = self._fds.get(shard)
        if fd is None:
            path = self.folder / shard
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                raise ShardFormatError(shard, None, f"shard file {path} does not exist") from None
            self._fds[shard] = fd
        return fd

    def read(self, shard: str, start: int, stop: int) -> bytes:
        data = os.pread(self._fd(shard), stop - start, start)
        if len(data) != stop - start:
            raise ShardFormatError(shard, None, f"truncated: bytes {start}..{stop} requested, {len(data)} read")
        return data

    def describe(self, shard: str) -> str:
        return str(self.folder / shard)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}

    def __del__(self) -> None:
        if getattr(self, "_pid", None) == os.getpid():
            self.close()


class HttpReader(RangeReader):
    def __init__(self, base_url: str, timeout: float = 60.0):
        self.base = base_url if base_url.endswith("/") else base_url + "/"
        self.timeout = timeout

    def describe(self, shard: str) -> str:
        return urllib.parse.urljoin(self.base, shard)

    def read(self, shard: str, start: int, stop: int) -> bytes:
        url = self.describe(shard)
        request = urllib.request.Request(url, headers={"Range": f"bytes={start}-{stop - 1}"})
        for attempt in range(_RETRIES):
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    body = response.read()
                    status = response.status
                break
            except urllib.error.HTTPError as exc:
                raise ShardFormatError(shard, None, f"GET {url} bytes {start}-{stop - 1}: HTTP {exc.code} {exc.reason}") from None
            except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
                if attempt == _RETRIES - 1:
                    raise ShardFormatError(shard, None, f"GET {url} failed after {_RETRIES} tries: {exc}") from None
                time.sleep(0.2 * (attempt + 1))
        if status == 200 and start == 0 and len(body) >= stop:
            body = body[:stop]
        elif status != 206:
            raise ShardFormatError(shard, None, f"{url} answered HTTP {status} to a range request; "
                                                "serve the shards from a server that supports Range")
        if len(body) != stop - start:
            raise ShardFormatError(shard, None, f"truncated: {url} returned {len(body)} of {stop - start} bytes")
        return body

    def fetch(self, name: str) -> bytes:
        url = self.describe(name)
        try:
            with urllib.request.urlopen(url, timeout=self.timeout) as response:
                return response.read()
        except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
            raise ManifestError(f"cannot fetch {url}: {exc}") from None


class FsspecReader(RangeReader):
    def __init__(self, base_url: str):
        try:
            import fsspec
        except ImportError:
            raise ManifestError(f"{base_url}: reading this scheme needs fsspec and its backend "
                                "(pip install 'wds-ocr[remote]' s3fs / gcsfs)") from None
        self.base = base_url.rstrip("/") + "/"
        self.fs, self.root = fsspec.core.url_to_fs(self.base)

    def describe(self, shard: str) -> str:
        return self.base + shard

    def read(self, shard: str, start: int, stop: int) -> bytes:
        data = self.fs.cat_file(self.root.rstrip("/") + "/" + shard, start=start, end=stop)
        if len(data) != stop - start:
            raise ShardFormatError(shard, None, f"truncated: {self.describe(shard)} returned {len(data)} of {stop - start} bytes")
        return data

    def fetch(self, name: str) -> bytes:
        return self.fs.cat_file(self.root.rstrip("/") + "/" + name)


def open_location(location: str | Path) -> tuple[Manifest, RangeReader]:
    """The manifest and a range reader for a shard folder, manifest path or URL."""
    text = str(location)
    scheme = urllib.parse.urlparse(text).scheme if "://" in text else ""
    if scheme in ("", "file"):
        path = Path(urllib.parse.urlparse(text).path) if scheme == "file" else Path(text)
        folder = path.parent if path.suffix == ".json" else path
        return load_manifest(path), LocalReader(folder)
    base, name = (text.rsplit("/", 1) if text.endswith(".json") else (text.rstrip("/"), MANIFEST_NAME))
    reader: HttpReader | FsspecReader = HttpReader(base) if scheme in ("http", "https") else FsspecReader(base)
    return parse_manifest(reader.fetch(name), f"{base}/{name}"), reader
