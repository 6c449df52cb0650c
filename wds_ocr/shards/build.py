"""build-shards: run the live pipeline once per sample and write reproducible, resumable shards.

Order and bytes depend only on the source and the record settings: samples are processed in
listing order (N worker processes compute, the parent writes in order), so 1 or N workers give
byte-identical shards. Each shard is written under a temporary name, fsynced and renamed; then a
journal entry (in ``.journal.<prefix>/``) records what it covers. A build killed at any point and
run again keeps the shards whose journal entry and sha256 check out, continues after them, and
ends byte-identical to an uninterrupted build. The manifest is written last; the journal is then
removed. ``--partition i/n`` builds a disjoint, contiguous part of the listing; ``merge_parts``
joins the part manifests.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import multiprocessing
import os
import platform
import re
import shutil
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import cv2
import numpy as np

from wds_ocr import __version__
from wds_ocr.config import Config
from wds_ocr.data.images import read_image_bytes
from wds_ocr.data.pipeline import process_sample
from wds_ocr.data.sources import SourceListing, SourceSample, list_source
from wds_ocr.errors import BuildError, ManifestError, SampleError
from wds_ocr.shards.codec import MEMBER_EXTENSION, encode_record
from wds_ocr.shards.manifest import (
    DIGEST_HEX,
    MANIFEST_NAME,
    Manifest,
    ShardEntry,
    load_manifest,
    write_atomic,
    write_manifest,
)
from wds_ocr.shards.tario import BLOCK, TarWriter, member_span

_RECORDSIZE = 20 * BLOCK
_UNREADABLE = "unreadable"


@dataclass(frozen=True)
class Partition:
    index: int
    count: int

    @classmethod
    def parse(cls, text: str) -> "Partition":
        match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
        if not match:
            raise BuildError(f"--partition {text!r} must look like i/n, e.g. 0/4 (i counts from 0)")
        index, count = int(match.group(1)), int(match.group(2))
        if count < 1 or not 0 <= index < count:
            raise BuildError(f"--partition {text!r}: need 0 <= i < n")
        return cls(index, count)

    def bounds(self, total: int) -> tuple[int, int]:
        """Contiguous [lo, hi) range of listing positions this part builds."""
        return self.index * total // self.count, (self.index + 1) * total // self.count

    @property
    def tag(self) -> str:
        return f"p{self.index:03d}of{self.count:03d}"


def record_key(index: int, name: str) -> str:
    """A WebDataset-safe key: zero-padded listing index + the file stem with no dots."""
    stem = name.rsplit(".", 1)[0] if "." in name else name
    safe = re.sub(r"[^A-Za-z0-9_-]", "_", stem)[:64]
    return f"{index:07d}_{safe}"


@dataclass
class Progress:
    """What a progress callback sees after each sample."""

    done: int
    total: int
    written: int
    rejected: int
    reused: int


@dataclass
class BuildResult:
    out_dir: Path
    manifest: Manifest
    manifest_path: Path
    rejects_path: Path
    rejects: list[dict[str, Any]]
    reused_shards: int
    up_to_date: bool = False


@dataclass
class _Outcome:
    position: int
    digest: str
    record: bytes | None = None
    key: str | None = None
    reject: dict[str, Any] | None = None
    skips: list[dict[str, Any]] = field(default_factory=list)


# --- worker side -----------------------------------------------------------------------------

_WORKER: dict[str, Any] = {}


def _init_worker(samples: list[SourceSample], config: Config) -> None:
    cv2.setNumThreads(1)
    _WORKER["samples"] = samples
    _WORKER["config"] = config


def _skip_dicts(sample: SourceSample, skips) -> list[dict[str, Any]]:
    return [dict(s.as_dict(), index=sample.index, kind="word") for s in skips]


def _process_one(position: int) -> _Outcome:
    sample: SourceSample = _WORKER["samples"][position]
    config: Config = _WORKER["config"]
    try:
        data = read_image_bytes(sample.image_path, sample.name)
    except SampleError as exc:
        reject = {"index": sample.index, "kind": "sample", "name": sample.name, "word_id": None, "reason": exc.reason}
        return _Outcome(position, _UNREADABLE, reject=reject, skips=_skip_dicts(sample, sample.skips))
    digest = hashlib.sha256(data).hexdigest()
    try:
        processed = process_sample(sample, config, data)
    except SampleError as exc:
        reject = {"index": sample.index, "kind": "sample", "name": sample.name, "word_id": None, "reason": exc.reason}
        return _Outcome(position, digest, reject=reject, skips=_skip_dicts(sample, sample.skips))
    key = record_key(sample.index, sample.name)
    return _Outcome(position, digest, encode_record(processed, key), key, skips=_skip_dicts(sample, processed.skips))


def _outcomes(samples: list[SourceSample], config: Config, positions: range, workers: int) -> Iterator[_Outcome]:
    """Outcomes in position order; at most ``4 * workers`` samples in flight."""
    if workers <= 1:
        _init_worker(samples, config)
        for position in positions:
            yield _process_one(position)
        return
    context = multiprocessing.get_context("spawn")
    with context.Pool(workers, initializer=_init_worker, initargs=(samples, config)) as pool:
        pending: deque = deque()
        todo = iter(positions)
        for position in todo:
            pending.append(pool.apply_async(_process_one, (position,)))
            if len(pending) >= 4 * workers:
                break
        while pending:
            outcome = pending.popleft().get()
            nxt = next(todo, None)
            if nxt is not None:
                pending.append(pool.apply_async(_process_one, (nxt,)))
            yield outcome


# --- parent side -----------------------------------------------------------------------------


class _Journal:
    """Per-part record of completed shards, so a killed build resumes where it stopped."""

    def __init__(self, out_dir: Path, prefix: str, settings: dict[str, Any]):
        self.folder = out_dir / f".journal.{prefix}"
        self.settings = settings

    def load(self) -> list[dict[str, Any]]:
        """Entries whose settings match; an empty list (and a wiped journal) otherwise."""
        settings_file = self.folder / "settings.json"
        try:
            stored = json.loads(settings_file.read_text(encoding="utf-8"))
        except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
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
        for path in sorted(self.folder.glob("*.tar.json")):
            if path.name >= f"{name}.json":
                path.unlink()

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


class _ShardSink:
    """Writes records into rolling shards: temp name, fsync, rename, journal entry."""

    def __init__(self, out_dir: Path, prefix: str, max_samples: int, max_bytes: int, journal: _Journal, first_index: int):
        self.out_dir = out_dir
        self.prefix = prefix
        self.max_samples = max_samples
        self.max_bytes = max_bytes
        self.journal = journal
        self.index = first_index
        self.entries: list[ShardEntry] = []
        self._open: tuple[Path, Any, TarWriter] | None = None
        self._keys: list[str] = []
        self._digests: list[str] = []
        self._pending: dict[str, list] = {"rejects": [], "skips": [], "digests": []}

    def name(self, index: int) -> str:
        return f"{self.prefix}-{index:06d}.tar"

    @property
    def tail(self) -> dict[str, list]:
        """Outcomes noted since the last closed shard (rejects after the last written sample)."""
        return self._pending

    def _would_overflow(self, size: int) -> bool:
        if self._open is None:
            return False
        writer = self._open[2]
        end = writer.members_end + member_span(size) + 2 * BLOCK
        projected = (end + _RECORDSIZE - 1) // _RECORDSIZE * _RECORDSIZE
        return projected > self.max_bytes

    def consume(self, outcome: _Outcome) -> None:
        """Note an outcome; append its record, rolling over by bytes before and by count after."""
        if outcome.record is not None and self._would_overflow(len(outcome.record)):
            self.close(next_position=outcome.position)
        self._pending["digests"].append(outcome.digest)
        if outcome.reject is not None:
            self._pending["rejects"].append(outcome.reject)
        self._pending["skips"].extend(outcome.skips)
        if outcome.record is None or outcome.key is None:
            return
        if self._open is None:
            final = self.out_dir / self.name(self.index)
            tmp = final.with_name(f".{final.name}.tmp")
            handle = open(tmp, "wb")
            self._open = (tmp, handle, TarWriter(handle))
        writer = self._open[2]
        _, digest = writer.add(f"{outcome.key}.{MEMBER_EXTENSION}", outcome.record)
        self._keys.append(outcome.key)
        self._digests.append(digest[:DIGEST_HEX])
        if len(self._keys) >= self.max_samples:
            self.close(next_position=outcome.position + 1)

    def close(self, next_position: int) -> None:
        if self._open is None:
            return
        tmp, handle, writer = self._open
        total, sha = writer.close()
        handle.flush()
        os.fsync(handle.fileno())
        handle.close()
        final = self.out_dir / self.name(self.index)
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
        )
        self.journal.add({"shard": asdict(entry), "next": next_position, **self._pending})
        self.entries.append(entry)
        self.index += 1
        self._open = None
        self._keys, self._digests = [], []
        self._pending = {"rejects": [], "skips": [], "digests": []}

    def abort(self) -> None:
        if self._open is not None:
            tmp, handle, _ = self._open
            handle.close()
            tmp.unlink(missing_ok=True)
            self._open = None


def environment() -> dict[str, str]:
    import msgpack
    import pyclipper

    return {
        "wds_ocr": __version__,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "opencv": cv2.__version__,
        "msgpack": ".".join(str(v) for v in msgpack.version),
        "pyclipper": getattr(pyclipper, "__version__", "unknown"),
    }


def source_fingerprint(annotation_sha256: str, listing_rejects: list[str], digests: list[str]) -> str:
    """sha256 over the annotation files, the names rejected while listing, and every image's bytes."""
    images = hashlib.sha256("\n".join(digests).encode()).hexdigest()
    body = {"annotation_sha256": annotation_sha256, "listing_rejects": sorted(listing_rejects), "images_sha256": images}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _listing_rejects(listing: SourceListing) -> list[dict[str, Any]]:
    return [dict(r.as_dict(), index=None, kind="sample") for r in listing.rejects]


def _reject_sort_key(item: dict[str, Any]) -> tuple:
    index = item["index"] if item["index"] is not None else -1
    return (index, item["name"], item["kind"] != "sample", item["word_id"] or "", item["reason"])


def _names(partition: Partition | None) -> tuple[str, str, str]:
    if partition is None or partition.count == 1:
        return "shard", MANIFEST_NAME, "rejects.jsonl"
    tag = partition.tag
    return f"shard-{tag}", f"manifest.part-{tag}.json", f"rejects.part-{tag}.jsonl"


class _Lock:
    def __init__(self, path: Path):
        self.path = path
        self.handle = None

    def __enter__(self) -> "_Lock":
        self.handle = open(self.path, "a+")
        try:
            fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.handle.close()
            raise BuildError(f"{self.path.parent} is being written by another build (lock {self.path.name}); "
                             "wait for it or use another --out") from None
        return self

    def __exit__(self, *exc) -> None:
        fcntl.flock(self.handle, fcntl.LOCK_UN)
        self.handle.close()
        self.path.unlink(missing_ok=True)


def write_rejects(path: Path, rejects: list[dict[str, Any]]) -> None:
    """rejects.jsonl: one JSON object per rejected sample or skipped word, in listing order."""
    lines = [json.dumps(r, sort_keys=True, ensure_ascii=False) for r in sorted(rejects, key=_reject_sort_key)]
    write_atomic(path, ("\n".join(lines) + "\n" if lines else "").encode("utf-8"))


def _up_to_date(manifest_file: Path, fingerprint: str, shard_settings: dict, out_dir: Path) -> Manifest | None:
    try:
        manifest = load_manifest(manifest_file)
    except ManifestError:
        return None
    if manifest.fingerprint != fingerprint or manifest.shard_settings != shard_settings:
        return None
    for entry in manifest.shards:
        path = out_dir / entry.name
        if not path.is_file() or path.stat().st_size != entry.bytes or _file_sha256(path) != entry.sha256:
            return None
    return manifest


def build_shards(
    source: str | Path,
    split: str,
    out_dir: str | Path,
    config: Config,
    workers: int = 1,
    partition: Partition | None = None,
    progress: Callable[[Progress], None] | None = None,
) -> BuildResult:
    """Build (or resume, or confirm up to date) the shards of one split."""
    out_dir = Path(out_dir)
    listing = list_source(source, split, config.source)
    out_dir.mkdir(parents=True, exist_ok=True)
    prefix, manifest_name, rejects_name = _names(partition)
    total = len(listing.samples)
    lo, hi = partition.bounds(total) if partition else (0, total)
    owns_listing_rejects = partition is None or partition.index == 0
    fingerprint = config.fingerprint()
    shard_settings = config.shards.model_dump(mode="json")
    manifest_file = out_dir / manifest_name

    with _Lock(out_dir / f".lock.{prefix}"):
        current = _up_to_date(manifest_file, fingerprint, shard_settings, out_dir)
        if current is not None:
            return BuildResult(out_dir, current, manifest_file, out_dir / rejects_name, [], len(current.shards), True)
        manifest_file.unlink(missing_ok=True)
        journal = _Journal(out_dir, prefix, {
            "fingerprint": fingerprint,
            "shard_settings": shard_settings,
            "annotation_sha256": listing.annotation_sha256,
            "names_sha256": hashlib.sha256("\n".join(s.name for s in listing.samples).encode()).hexdigest(),
            "range": [lo, hi],
        })
        entries = journal.load()
        kept = _reusable(entries, out_dir, lo)
        if len(kept) < len(entries):
            journal.drop_from(entries[len(kept)]["shard"]["name"])
        _remove_strays(out_dir, prefix, {e["shard"]["name"] for e in kept})

        resume_at = kept[-1]["next"] if kept else lo
        sink = _ShardSink(out_dir, prefix, config.shards.max_samples, config.shards.max_bytes, journal, len(kept))
        sink.entries = [ShardEntry(**_entry_args(e["shard"])) for e in kept]
        written = sum(entry.samples for entry in sink.entries)
        counts = Progress(resume_at - lo, hi - lo, written, sum(len(e["rejects"]) for e in kept), written)
        try:
            for outcome in _outcomes(listing.samples, config, range(resume_at, hi), workers):
                sink.consume(outcome)
                if outcome.record is not None:
                    counts.written += 1
                else:
                    counts.rejected += 1
                counts.done += 1
                if progress is not None:
                    progress(counts)
            sink.close(next_position=hi)
        except BaseException:
            sink.abort()
            raise
        # Every outcome is now in a journal entry; the last close() took the tail after the last shard.
        all_entries = journal.load()
        rejects = [r for e in all_entries for r in e["rejects"]] + sink.tail["rejects"]
        skips = [s for e in all_entries for s in e["skips"]] + sink.tail["skips"]
        digests = [d for e in all_entries for d in e["digests"]] + sink.tail["digests"]
        listing_rejects = _listing_rejects(listing) if owns_listing_rejects else []
        all_rejects = listing_rejects + rejects
        all_skips = skips
        samples_in = (hi - lo) + len(listing_rejects)
        manifest = Manifest(
            fingerprint=fingerprint,
            record_settings=config.record_settings(),
            source={
                "format": listing.format,
                "split": split,
                "annotation_sha256": listing.annotation_sha256,
                "fingerprint": source_fingerprint(listing.annotation_sha256, [r.name for r in listing.rejects], digests)
                if partition is None or partition.count == 1 else None,
                "listed": listing.total,
                "listing_rejects": sorted(r.name for r in listing.rejects),
            },
            counts={
                "samples_in": samples_in,
                "written": sum(e.samples for e in sink.entries),
                "rejected": len(all_rejects),
                "words_skipped": len(all_skips),
            },
            shard_settings=shard_settings,
            shards=tuple(sink.entries),
            environment=environment(),
            partition=None if partition is None or partition.count == 1 else {"index": partition.index, "count": partition.count, "lo": lo, "hi": hi},
            source_digests=None if partition is None or partition.count == 1 else tuple(digests),
        )
        if manifest.counts["written"] + manifest.counts["rejected"] != samples_in:
            raise BuildError(f"internal count mismatch: {manifest.counts}")
        write_rejects(out_dir / rejects_name, all_rejects + all_skips)
        write_manifest(manifest_file, manifest)
        journal.remove()
    return BuildResult(out_dir, manifest, manifest_file, out_dir / rejects_name, all_rejects + all_skips, len(kept))


def _entry_args(body: dict[str, Any]) -> dict[str, Any]:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in body.items()}


def _reusable(entries: list[dict[str, Any]], out_dir: Path, lo: int) -> list[dict[str, Any]]:
    """The leading run of journal entries whose shard files are complete and hash right."""
    kept = []
    expected_start = lo
    for entry in entries:
        shard = entry["shard"]
        path = out_dir / shard["name"]
        if (
            entry.get("next", -1) <= expected_start
            or not path.is_file()
            or path.stat().st_size != shard["bytes"]
            or _file_sha256(path) != shard["sha256"]
        ):
            break
        kept.append(entry)
        expected_start = entry["next"]
    return kept


def _remove_strays(out_dir: Path, prefix: str, keep: set[str]) -> None:
    """Delete temp files and shards of this prefix that no kept journal entry vouches for."""
    pattern = re.compile(rf"^\.?{re.escape(prefix)}-\d{{6}}\.tar(\.tmp)?$")
    for path in out_dir.iterdir():
        if pattern.match(path.name) and path.name not in keep:
            path.unlink()
