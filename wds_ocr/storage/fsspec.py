"""Shards under other fsspec URLs (gs://, ...): the name and exact-length checks; timeouts and
retries are the backend's."""

from __future__ import annotations


from wds_ocr.errors import ManifestError, RemoteError, ShardFormatError
from wds_ocr.shards.manifest import MAX_MANIFEST_BYTES
from wds_ocr.shards.naming import MANIFEST_NAME, is_shard_name
from wds_ocr.storage.reader import Deadline, RangeReader


class FsspecReader(RangeReader):
    def __init__(self, base_url: str, max_manifest_bytes: int = MAX_MANIFEST_BYTES):
        self.max_manifest_bytes = max_manifest_bytes
        try:
            import fsspec
        except ImportError:
            raise ManifestError(f"{base_url}: reading this scheme needs fsspec and its backend "
                                "(pip install 'wds-ocr[remote]' s3fs / gcsfs)") from None
        self.base = base_url.rstrip("/") + "/"
        self.fs, self.root = fsspec.core.url_to_fs(self.base)

    def describe(self, shard: str) -> str:
        return self.base + shard

    def _path(self, name: str) -> str:
        if name != MANIFEST_NAME and not name.endswith(".json") and not is_shard_name(name):
            raise RemoteError(f"{name!r}: not a shard name; refused")
        return self.root.rstrip("/") + "/" + name

    def read(self, shard: str, start: int, stop: int, deadline: Deadline | None = None) -> bytes:
        data = self.fs.cat_file(self._path(shard), start=start, end=stop)
        if len(data) != stop - start:
            raise ShardFormatError(shard, None, f"truncated: {self.describe(shard)} returned {len(data)} of {stop - start} bytes")
        return data

    def fetch(self, name: str) -> bytes:
        path = self._path(name)
        size = self.fs.size(path)
        if size is None or size > self.max_manifest_bytes:
            raise ManifestError(f"{self.describe(name)} is {size} bytes, over the {self.max_manifest_bytes}-byte "
                                "limit (RemoteSettings.max_manifest_bytes)" if size is not None else
                                f"{self.describe(name)}: its size is not known, so it is not read (a manifest "
                                f"is read only when its size is known to be at most {self.max_manifest_bytes} bytes)")
        data = self.fs.cat_file(path)
        if len(data) != size:
            raise ManifestError(f"{self.describe(name)} changed size while it was read ({len(data)} bytes, not {size})")
        return data


__all__ = ["FsspecReader"]
