"""Where shards live, by URL scheme.

- a local folder (or ``file://``): ``storage.local.LocalReader`` reads, ``shards.build`` writes;
- ``http(s)://``: read-only, ``storage.http.HttpReader`` (ranges only, bodies capped, deadlines,
  retries with backoff);
- ``s3://bucket/prefix``: ``storage.s3``: reads are the same HTTP range reads, signed with AWS
  Signature V4 (every guarantee of the HTTP reader holds); writes, listings and deletes go
  through boto3. Credentials and region come from the standard AWS chain; the endpoint from
  ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` (MinIO, Ceph, R2, GCS's S3 API, moto).

Modules: ``reader`` (the ``RangeReader`` interface, ``RemoteSettings``, deadlines), ``local``,
``http``, ``s3``, ``fsspec`` (one backend per scheme), ``location`` (``open_shards``: a URL to its
manifest and reader). Any other scheme is an error for a command that writes (``output_kind``).
"""

from __future__ import annotations

import urllib.parse
from pathlib import Path

from wds_ocr.errors import UsageError

WRITABLE_SCHEMES = ("s3",)


def scheme_of(location: str | Path) -> str:
    """The URL scheme of ``location`` ('' for a plain path)."""
    text = str(location)
    return urllib.parse.urlsplit(text).scheme.lower() if "://" in text else ""


def output_kind(location: str | Path, option: str = "--out") -> str:
    """'folder' or 's3' for a place a command writes to; any other URL is a UsageError (never a
    local folder named after a URL)."""
    scheme = scheme_of(location)
    if scheme in ("", "file"):
        return "folder"
    if scheme in WRITABLE_SCHEMES:
        return scheme
    raise UsageError(f"{option} {location}: wds-ocr cannot write to {scheme}:// locations; give a local folder or "
                     "s3://bucket/prefix")


__all__ = ["WRITABLE_SCHEMES", "output_kind", "scheme_of"]
