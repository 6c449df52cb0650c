"""Shard sets in an S3 bucket: build into one, merge parts there, and copy one down to verify it.

A bucket build is a folder build in a local staging folder whose shards are uploaded, each as soon
as it is final, by a background thread while the next is built (at most ``UPLOAD_QUEUE`` shards
wait; the build pauses when uploads fall behind), then the rejects file and, last, the manifest.
Objects carry the sha256 of their bytes (``x-amz-meta-sha256``): a shard already in the bucket
with the same size and sha256 is not uploaded again, so a killed build run again uploads only
what is missing (builds are byte-identical, so a rebuild elsewhere skips the same shards). The
bucket's manifest is checked first: one of other settings is refused unless ``overwrite``, and one
that is current leaves everything as it is. Shard objects of the same part prefix that the new
manifest does not list are deleted after it is published.

Two builds into the same prefix at the same time are not locked against each other (S3 has no
locks): give each its own prefix, or each partition its part (``--partition``).
"""

from __future__ import annotations

import hashlib
import queue
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from wds_ocr.config import Config
from wds_ocr.errors import BuildError, ManifestError, RemoteError
from wds_ocr.shards.build import BuildResult, Partition, Progress, build_shards, settings_changes_of
from wds_ocr.shards.manifest import MAX_MANIFEST_BYTES, ShardEntry, parse_manifest
from wds_ocr.shards.naming import (MANIFEST_NAME, PART_MANIFEST_PATTERN, REJECTS_NAME, manifest_name, rejects_name,
                                   shard_prefix, stray_pattern)
from wds_ocr.storage.s3 import S3Store, S3Url

UPLOAD_QUEUE = 2  # finished shards waiting for the uploader before the build waits
MAX_REJECTS_BYTES = 1 << 30


@dataclass
class BucketBuild:
    url: S3Url
    result: BuildResult
    uploaded: int  # shards sent
    kept: int  # shards already in the bucket with the same bytes
    deleted: int  # shard objects of an earlier build removed


class _Uploader:
    """One thread uploading finished shards in order; an upload error stops the build at its next shard."""

    def __init__(self, store: S3Store):
        self.store = store
        self.queue: queue.Queue = queue.Queue(UPLOAD_QUEUE)
        self.submitted: set[str] = set()
        self.uploaded = self.kept = 0
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="wds-ocr-upload", daemon=True)
        self.thread.start()

    def submit(self, path: Path, entry: ShardEntry) -> None:
        if self.error is not None:
            raise self.error
        if entry.name not in self.submitted:
            self.submitted.add(entry.name)
            self.queue.put((path, entry))

    def _run(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            if self.error is not None:
                continue
            path, entry = item
            try:
                if self.store.head(entry.name) == (entry.bytes, entry.sha256):
                    self.kept += 1
                else:
                    self.store.put_file(entry.name, path, entry.sha256)
                    self.uploaded += 1
            except BaseException as exc:  # raised in the build's thread (submit, finish)
                self.error = exc

    def finish(self) -> None:
        self.queue.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error


def default_staging(url: S3Url) -> Path:
    """A local folder for a bucket build, the same for every run into ``url`` (a rerun resumes there)."""
    tag = hashlib.sha256(str(url).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / "wds-ocr-staging" / f"{url.bucket}-{tag}"


def build_to_bucket(source: str | Path, split: str, url: S3Url, config: Config, workers: int = 1,
                    partition: Partition | None = None, progress: Callable[[Progress], None] | None = None,
                    overwrite: bool = False, staging: Path | None = None) -> BucketBuild:
    store = S3Store(url)
    pair = partition.pair if partition is not None else None
    manifest_object, rejects_object, prefix = manifest_name(pair), rejects_name(pair), shard_prefix(pair)
    existing = store.get(manifest_object, MAX_MANIFEST_BYTES)
    listed = store.list()
    if existing is not None and not overwrite:
        try:
            current = parse_manifest(existing, url.describe(manifest_object))
        except ManifestError as exc:
            raise BuildError(f"{exc}; rebuild with --overwrite to replace it") from None
        from wds_ocr.data.sources import list_source

        changes = settings_changes_of(current, config, split, list_source(source, split, config.source).format)
        if changes:
            raise BuildError(f"{url} holds shards built with other settings ({'; '.join(changes)}); use another "
                             "prefix, or --overwrite to replace them")
    own_staging = staging is None
    staging = staging or default_staging(url)
    uploader = _Uploader(store)
    try:
        result = build_shards(source, split, staging, config, workers=workers, partition=partition,
                              progress=progress, overwrite=overwrite, on_shard=uploader.submit)
        for entry in result.manifest.shards:  # an up-to-date staging folder announced nothing
            uploader.submit(staging / entry.name, entry)
    finally:
        uploader.finish()
    data = result.manifest_path.read_bytes()
    if existing == data and listed.get(rejects_object) == result.rejects_path.stat().st_size:
        deleted = 0
    else:
        store.put_bytes(rejects_object, result.rejects_path.read_bytes())
        store.put_bytes(manifest_object, data, hashlib.sha256(data).hexdigest())  # last: readers see it whole
        strays = stray_pattern(prefix)
        listed_names = {e.name for e in result.manifest.shards}
        old = sorted(n for n in listed if strays.fullmatch(n) and n not in listed_names)
        store.delete(old)
        deleted = len(old)
    if own_staging:
        shutil.rmtree(staging, ignore_errors=True)
    return BucketBuild(url, result, uploader.uploaded, uploader.kept, deleted)


def merge_bucket(url: S3Url) -> tuple[object, str]:
    """``merge`` for parts built into a bucket: their manifests and rejects are joined in a local
    folder, then rejects.jsonl and (last) manifest.json are uploaded."""
    from wds_ocr.shards.merge import merge_parts

    store = S3Store(url)
    names = [n for n in store.list() if PART_MANIFEST_PATTERN.fullmatch(n)]
    if not names:
        raise ManifestError(f"{url} holds no part manifests (manifest.part-i-of-n.json); build the parts with "
                            "build-shards --partition i/n --out " + str(url))
    with tempfile.TemporaryDirectory(prefix="wds-ocr-merge-") as tmp:
        folder = Path(tmp)
        for name in names:
            match = PART_MANIFEST_PATTERN.fullmatch(name)
            pair = (int(match.group(1)), int(match.group(2)))
            for object_name, cap in ((name, MAX_MANIFEST_BYTES), (rejects_name(pair), MAX_REJECTS_BYTES)):
                data = store.get(object_name, cap)
                if data is not None:
                    (folder / object_name).write_bytes(data)
        manifest, path = merge_parts(folder)
        store.put_bytes(REJECTS_NAME, (folder / REJECTS_NAME).read_bytes())
        data = path.read_bytes()
        store.put_bytes(MANIFEST_NAME, data, hashlib.sha256(data).hexdigest())
    return manifest, url.describe(MANIFEST_NAME)


def download(url: S3Url, folder: Path, manifest_object: str = MANIFEST_NAME, key: str | None = "*") -> Path:
    """Copy the manifest, its rejects file and the shards it lists into ``folder`` (each shard's
    size bounded by the manifest's): every shard (``key="*"``), or only the one holding ``key``
    (None: the first record's); the local manifest path."""
    from wds_ocr.shards.manifest import load_manifest

    store = S3Store(url)
    data = store.get(manifest_object, MAX_MANIFEST_BYTES)
    if data is None:
        raise ManifestError(f"{url.describe(manifest_object)} does not exist")
    path = folder / manifest_object
    path.write_bytes(data)
    manifest = load_manifest(path)
    rejects = store.get(REJECTS_NAME, MAX_REJECTS_BYTES)
    if rejects is not None:
        (folder / REJECTS_NAME).write_bytes(rejects)
    wanted = manifest.shards
    if key != "*":
        from wds_ocr.shards.inspect import resolve_key

        name = manifest.shards[0].keys[0] if key is None and manifest.shards and manifest.shards[0].keys else key
        wanted = [e for e in manifest.shards if name is not None and resolve_key(manifest, name, str(url)) in e.keys]
    for entry in wanted:
        body = store.get(entry.name, entry.bytes)
        if body is None:
            raise RemoteError(f"{url.describe(entry.name)} is missing (the manifest lists it)")
        (folder / entry.name).write_bytes(body)
    return path


__all__ = ["BucketBuild", "build_to_bucket", "default_staging", "download", "merge_bucket"]
