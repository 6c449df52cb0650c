"""Shards in an S3 bucket (AWS S3 or any S3 API: MinIO, Ceph, R2, GCS, moto).

Reads (``S3Reader``) are ``storage.http.HttpReader`` range reads with each request signed (AWS
Signature V4, botocore's signer): ranges come only from the manifest, bodies are capped, every
request has a deadline and bounded retries with backoff, and a name can only resolve inside the
manifest's own bucket and prefix. Why not boto3's ``get_object`` for reads: it offers timeouts per
socket operation, not a deadline per request or per batch, nor cancelling a read in flight; and
measured on the same objects it is slower per ranged read (docs/BENCHMARKS.md, "Object storage").

Writes, listings and deletes (``S3Store``) go through boto3: its transfer manager uploads large
shards in parts, bounded in memory, with retries. Credentials and region come from the standard
AWS chain (environment, config files, instance roles); the endpoint from ``AWS_ENDPOINT_URL_S3``
or ``AWS_ENDPOINT_URL`` (the standard variables), else AWS's own.
"""

from __future__ import annotations

import contextlib
import os
import re
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from wds_ocr.errors import RemoteError, UsageError
from wds_ocr.storage.http import HttpReader
from wds_ocr.storage.reader import RemoteSettings

# Bucket names as S3 allows them (3-63 characters of a-z, 0-9, '.', '-').
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]")
_PREFIX_PART = re.compile(r"[A-Za-z0-9._\-=+@,]{1,255}")
MAX_LISTED = 100_000  # objects a listing of one prefix may return before it is refused
SHA256_METADATA = "sha256"  # x-amz-meta-sha256 of each uploaded file: a rerun skips what matches


@dataclass(frozen=True)
class S3Url:
    bucket: str
    prefix: str  # '' or 'a/b' (no leading or trailing '/')

    @classmethod
    def parse(cls, text: str) -> "S3Url":
        parts = urllib.parse.urlsplit(str(text))
        if parts.scheme.lower() != "s3":
            raise UsageError(f"{text}: not an s3:// URL")
        if parts.query or parts.fragment or parts.username or parts.password or parts.port:
            raise UsageError(f"{text}: an s3:// URL is s3://bucket/prefix, with no query, fragment, user or port")
        bucket = parts.hostname or ""
        if not _BUCKET.fullmatch(bucket) or ".." in bucket:
            raise UsageError(f"{text}: {bucket!r} is not a bucket name (3-63 of a-z, 0-9, '.', '-')")
        segments = [s for s in parts.path.split("/") if s]
        for segment in segments:
            if segment in (".", "..") or not _PREFIX_PART.fullmatch(segment):
                raise UsageError(f"{text}: prefix part {segment!r} is not allowed (letters, digits and ._-=+@, "
                                 "only; no '.' or '..')")
        return cls(bucket, "/".join(segments))

    def key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    def describe(self, name: str) -> str:
        return f"s3://{self.bucket}/{self.key(name)}"


def endpoint() -> str | None:
    """The S3 endpoint the standard variables name (None: AWS's own)."""
    for variable in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
        value = os.environ.get(variable, "").strip()
        if value:
            return value.rstrip("/")
    return None


def _session():
    try:
        import botocore.session
    except ImportError:
        raise UsageError("s3:// locations need boto3: pip install 'wds-ocr[s3]'") from None
    return botocore.session.get_session()


def region(session=None) -> str:
    session = session or _session()
    return session.get_config_variable("region") or "us-east-1"


def base_url(url: S3Url, region_name: str) -> str:
    """The HTTP(S) folder URL of ``url``'s prefix: path-style on a custom endpoint (and for bucket
    names with dots), virtual-hosted on AWS."""
    custom = endpoint()
    folder = "/" + "/".join(urllib.parse.quote(s) for s in url.prefix.split("/")) + "/" if url.prefix else "/"
    if custom is not None:
        return f"{custom}/{url.bucket}{folder}"
    if "." in url.bucket:
        return f"https://s3.{region_name}.amazonaws.com/{url.bucket}{folder}"
    return f"https://{url.bucket}.s3.{region_name}.amazonaws.com{folder}"


class S3Reader(HttpReader):
    """Range reads of the objects under one bucket prefix: ``HttpReader`` with signed requests."""

    def __init__(self, url: S3Url, settings: RemoteSettings | None = None, sizes: dict[str, int] | None = None):
        session = _session()
        self.url = url
        self._region = region(session)
        self._credentials = session.get_credentials()  # None: anonymous requests (a public bucket)
        super().__init__(base_url(url, self._region), settings, sizes)

    def describe(self, shard: str) -> str:
        return self.url.describe(shard)

    def _signed(self, url: str, headers: dict[str, str]) -> dict[str, str]:
        if self._credentials is None:
            return headers
        from botocore.auth import S3SigV4Auth
        from botocore.awsrequest import AWSRequest

        request = AWSRequest(method="GET", url=url, headers=dict(headers))
        S3SigV4Auth(self._credentials.get_frozen_credentials(), "s3", self._region).add_auth(request)
        return dict(request.headers.items())


class S3Store:
    """Upload, list, head and delete the objects under one bucket prefix (boto3)."""

    def __init__(self, url: S3Url, settings: RemoteSettings | None = None):
        try:
            import boto3
            from botocore.config import Config as BotoConfig
        except ImportError:
            raise UsageError("s3:// locations need boto3: pip install 'wds-ocr[s3]'") from None
        settings = settings or RemoteSettings()
        self.url = url
        session = boto3.session.Session()
        self.client = session.client(
            "s3", endpoint_url=endpoint(), region_name=session.region_name or "us-east-1",
            config=BotoConfig(connect_timeout=settings.connect_timeout, read_timeout=settings.stall_timeout,
                              retries={"max_attempts": settings.tries, "mode": "standard"}))

    @contextlib.contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            yield
        except ClientError as exc:
            error = exc.response.get("Error", {})
            raise RemoteError(f"{what}: {error.get('Code', '?')} {str(error.get('Message', ''))[:200]}".rstrip()
                              + " (check the bucket, the credentials and AWS_ENDPOINT_URL)") from None
        except BotoCoreError as exc:
            raise RemoteError(f"{what}: {str(exc)[:300]}") from None

    def _unless_missing(self, what: str, call: Callable[[], Any]) -> Any:
        """``call()``, or None when the object does not exist; other failures are RemoteErrors."""
        from botocore.exceptions import ClientError

        with self._errors(what):
            try:
                return call()
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                    return None
                raise

    def head(self, name: str) -> tuple[int, str | None] | None:
        """(size, the sha256 recorded at upload) of an object, or None when there is none."""
        answer = self._unless_missing(f"HEAD {self.url.describe(name)}", lambda: self.client.head_object(
            Bucket=self.url.bucket, Key=self.url.key(name)))
        if answer is None:
            return None
        return int(answer["ContentLength"]), answer.get("Metadata", {}).get(SHA256_METADATA)

    def get(self, name: str, cap: int) -> bytes | None:
        """A whole object of at most ``cap`` bytes, or None when there is none."""
        what = f"GET {self.url.describe(name)}"
        answer = self._unless_missing(what, lambda: self.client.get_object(Bucket=self.url.bucket,
                                                                           Key=self.url.key(name)))
        if answer is None:
            return None
        with self._errors(what), contextlib.closing(answer["Body"]) as body:
            if int(answer["ContentLength"]) > cap:
                raise RemoteError(f"{self.url.describe(name)} is {answer['ContentLength']} bytes, over the "
                                  f"{cap}-byte limit")
            data = body.read(cap + 1)
        if len(data) > cap:
            raise RemoteError(f"{self.url.describe(name)} is over the {cap}-byte limit")
        return data

    def put_file(self, name: str, path: Path, sha256: str) -> None:
        from boto3.s3.transfer import TransferConfig

        with self._errors(f"upload {path} to {self.url.describe(name)}"):
            self.client.upload_file(str(path), self.url.bucket, self.url.key(name),
                                    ExtraArgs={"Metadata": {SHA256_METADATA: sha256}},
                                    Config=TransferConfig(max_concurrency=4, use_threads=True))

    def put_bytes(self, name: str, data: bytes, sha256: str | None = None) -> None:
        extra: dict[str, Any] = {"Metadata": {SHA256_METADATA: sha256}} if sha256 else {}
        with self._errors(f"upload {self.url.describe(name)}"):
            self.client.put_object(Bucket=self.url.bucket, Key=self.url.key(name), Body=data, **extra)

    def list(self) -> dict[str, int]:
        """name -> size of the objects directly under the prefix (at most MAX_LISTED)."""
        found: dict[str, int] = {}
        lead = self.url.key("")
        with self._errors(f"list {self.url}"):
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.url.bucket, Prefix=lead, Delimiter="/")
            for page in pages:
                for item in page.get("Contents", []):
                    found[item["Key"][len(lead):]] = int(item["Size"])
                if len(found) > MAX_LISTED:
                    raise RemoteError(f"{self.url} holds more than {MAX_LISTED} objects; use a prefix of its own "
                                      "for each shard set")
        return found

    def delete(self, names: list[str]) -> None:
        for start in range(0, len(names), 1000):
            chunk = names[start:start + 1000]
            with self._errors(f"delete from {self.url}"):
                self.client.delete_objects(Bucket=self.url.bucket, Delete={
                    "Objects": [{"Key": self.url.key(n)} for n in chunk], "Quiet": True})


__all__ = ["MAX_LISTED", "S3Reader", "S3Store", "S3Url", "base_url", "endpoint", "region"]
