"""build-shards: run the live pipeline once per sample and write reproducible, resumable shards.

Order and bytes depend only on the source and the record settings: samples are processed in
listing order (N worker processes compute, the parent writes in order), so 1 or N workers give
byte-identical shards. Shards are written by ``writer.ShardSink`` (temporary name, fsync, rename,
journal entry); a build killed at any point and run again keeps the shards the journal vouches for
(``journal.reusable_entries``), continues after them, and ends byte-identical to an uninterrupted
build. The rejects file and then the manifest are written last; the journal is then removed. A
rerun over an unchanged source with the same settings finds the manifest current and rewrites
nothing. ``--partition i/n`` builds a disjoint, contiguous part of the listing; ``merge_parts``
joins the part manifests.

A folder that holds shards built with other settings (another config fingerprint, other shard
settings, another split or source format, a manifest this version cannot read, an interrupted
build under other settings, or shard files nothing accounts for) is refused unless
``overwrite=True`` (``--overwrite``): replacing them silently would pull the bytes from under a
reader. Readers notice a rebuild (see ``wds_ocr.loader.stream``).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from wds_ocr.config import Config, settings_changes
from wds_ocr.data.coverage import Coverage
from wds_ocr.data.sources import SourceListing, list_source
from wds_ocr.errors import BuildError, ManifestError, OlderManifestError, UsageError
from wds_ocr.shards.fingerprint import environment, image_digest, source_fingerprint
from wds_ocr.shards.journal import BuildLock, FolderLock, Journal, file_sha256, remove_strays, reusable_entries
from wds_ocr.shards.manifest import (SCHEMA_VERSION, Counts, Manifest, PartRange, ShardEntry, load_manifest,
                                     write_manifest)
from wds_ocr.shards.naming import (PART_MANIFEST_PATTERN, MANIFEST_NAME, lock_name, manifest_name, record_key,
                                   rejects_name, shard_name, shard_prefix, stray_pattern)
from wds_ocr.shards.rejects import Reject, write_rejects
from wds_ocr.shards.workers import Workers, outcomes
from wds_ocr.shards.writer import ShardSink

__all__ = ["BuildResult", "Partition", "Progress", "build_shards", "image_digest", "record_key", "write_rejects"]


@dataclass(frozen=True)
class Partition:
    index: int
    count: int

    @classmethod
    def parse(cls, text: str) -> "Partition":
        match = re.fullmatch(r"\s*([0-9]{1,6})\s*/\s*([0-9]{1,6})\s*", text)
        if not match:
            raise UsageError(f"--partition {text!r} must look like i/n, e.g. 0/4 (i counts from 0)")
        index, count = int(match.group(1)), int(match.group(2))
        if count < 1:
            raise UsageError(f"--partition {text!r}: n is the number of parts, at least 1")
        if not 0 <= index < count:
            raise UsageError(f"--partition {text!r}: part i of n counts from 0, so it needs 0 <= i < n "
                             f"(here 0/{count} .. {count - 1}/{count})")
        if count > 999:
            raise UsageError(f"--partition {text!r}: at most 999 parts")
        return cls(index, count)

    def bounds(self, total: int) -> tuple[int, int]:
        """Contiguous [lo, hi) range of listing positions this part builds."""
        return self.index * total // self.count, (self.index + 1) * total // self.count

    @property
    def pair(self) -> tuple[int, int]:
        return self.index, self.count


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
    rejects: list[Reject]
    reused_shards: int
    up_to_date: bool = False


def _listing_rejects(listing: SourceListing) -> list[Reject]:
    return [Reject.sample(None, r.name, r.reason) for r in listing.rejects]


def _names(partition: Partition | None) -> tuple[str, str, str]:
    pair = partition.pair if partition is not None else None
    return shard_prefix(pair), manifest_name(pair), rejects_name(pair)


@dataclass(frozen=True)
class _Plan:
    """What one build (or part) covers and depends on."""

    listing: SourceListing
    split: str
    config: Config
    partition: Partition | None
    lo: int
    hi: int

    @property
    def partitioned(self) -> bool:
        return self.partition is not None and self.partition.count > 1

    @property
    def listing_rejects(self) -> list[Reject]:
        """Samples rejected while listing: counted once, by the whole build or by part 0."""
        return _listing_rejects(self.listing) if not self.partitioned or self.partition.index == 0 else []

    def source_fields(self, digests: list[str]) -> dict[str, Any]:
        listing = self.listing
        rejected_names = sorted(r.name for r in listing.rejects)
        return {
            "format": listing.format,
            "split": self.split,
            "annotation_sha256": listing.annotation_sha256,
            "fingerprint": None if self.partitioned else source_fingerprint(listing.annotation_sha256, rejected_names, digests),
            "listed": listing.total,
            "listing_rejects": rejected_names,
        }

    def partition_fields(self) -> PartRange | None:
        if not self.partitioned:
            return None
        return PartRange(self.partition.index, self.partition.count, self.lo, self.hi)

    def manifest(self, entries: list[ShardEntry], digests: list[str], rejects: int, skips: int,
                 coverage: Coverage) -> Manifest:
        samples_in = (self.hi - self.lo) + len(self.listing_rejects)
        written = sum(entry.samples for entry in entries)
        if written + rejects != samples_in:
            raise BuildError(f"internal count mismatch: {samples_in} samples in, {written} written, {rejects} rejected")
        return Manifest(
            fingerprint=self.config.fingerprint(),
            record_settings=self.config.record_settings(),
            source=self.source_fields(digests),
            counts=Counts(samples_in, written, rejects, skips, coverage),
            shard_settings=self.config.shards.model_dump(mode="json"),
            shards=tuple(entries),
            environment=environment(),
            partition=self.partition_fields(),
            source_digests=tuple(digests) if self.partitioned else None,
        )

    def digest_at(self, position: int) -> str:
        return image_digest(self.listing.samples[position], self.config.source.max_file_bytes)


def _current_manifest(manifest_file: Path, rejects_file: Path, plan: _Plan) -> Manifest | None:
    """The existing manifest if it is exactly what this build would write now, else None.

    Cheap checks first (settings, listing, file sizes), then the source images, then the shards.
    """
    try:
        manifest = load_manifest(manifest_file)
    except ManifestError:
        return None
    config = plan.config
    if (
        manifest.fingerprint != config.fingerprint()
        or manifest.shard_settings != config.shards.model_dump(mode="json")
        or manifest.partition != plan.partition_fields()
        or not rejects_file.is_file()
    ):
        return None
    folder = manifest_file.parent
    for entry in manifest.shards:
        path = folder / entry.name
        if not path.is_file() or path.stat().st_size != entry.bytes:
            return None
    digests = [plan.digest_at(position) for position in range(plan.lo, plan.hi)]
    if manifest.source != plan.source_fields(digests):
        return None
    if plan.partitioned and manifest.source_digests != tuple(digests):
        return None
    if any(file_sha256(folder / entry.name) != entry.sha256 for entry in manifest.shards):
        return None
    return manifest


def settings_changes_of(manifest: Manifest, config: Config, split: str, source_format: str) -> list[str]:
    """What differs between the build a manifest describes and this one (empty: the same kind)."""
    line = "{field}: {built!r} there, {now!r} now"
    changes = []
    if manifest.fingerprint != config.fingerprint():
        changes = settings_changes(manifest.record_settings, config.record_settings(), line) or \
            ["the config fingerprint differs"]
    changes += settings_changes(manifest.shard_settings, config.shards.model_dump(mode="json"), line, "shards.")
    changes += settings_changes({"split": manifest.source.get("split"), "format": manifest.source.get("format")},
                                {"split": split, "format": source_format}, line, "source.")
    return changes


def _check_folder(out_dir: Path, prefix: str, plan: _Plan, journal: Journal) -> None:
    """BuildError when ``out_dir`` holds shards this build would replace but did not make."""
    config = plan.config
    refuse = (f"{out_dir} holds shards built with other settings (%s); pass --overwrite (overwrite=True) to "
              "replace them (a run reading them will stop with an error), or build into another --out")
    listed: set[str] = set()
    for path in sorted(out_dir.iterdir()):
        if path.name != MANIFEST_NAME and not PART_MANIFEST_PATTERN.fullmatch(path.name):
            continue
        try:
            existing = load_manifest(path)
        except OlderManifestError as exc:
            raise BuildError(f"{out_dir} holds shards written by an older wds-ocr ({path.name} has schema_version "
                             f"{exc.version}; this one reads {SCHEMA_VERSION}, compact records): pass --overwrite "
                             f"(overwrite=True) to rebuild them there, remove {out_dir}, or build into another "
                             "--out") from None
        except ManifestError as exc:
            raise BuildError(refuse % f"{path.name} cannot be used by this wds-ocr: {exc}") from None
        changes = settings_changes_of(existing, config, plan.split, plan.listing.format)
        if changes:
            raise BuildError(refuse % f"{path.name}: {'; '.join(changes)}")
        listed.update(entry.name for entry in existing.shards)
    stored = journal.stored_settings()
    if stored is not None:
        for name in ("fingerprint", "shard_settings"):
            if stored.get(name) != journal.settings[name]:
                raise BuildError(refuse % f"an interrupted build under other settings left {journal.folder.name}")
        return
    pattern = stray_pattern(prefix)
    unknown = sorted(p.name for p in out_dir.iterdir()
                     if pattern.match(p.name) and not p.name.endswith(".tmp") and p.name not in listed)
    if unknown:
        raise BuildError(refuse % f"{', '.join(unknown[:3])}{' ...' if len(unknown) > 3 else ''} "
                                  "belong to no manifest or journal here")


def build_shards(
    source: str | Path,
    split: str,
    out_dir: str | Path,
    config: Config,
    workers: int = 1,
    partition: Partition | None = None,
    progress: Callable[[Progress], None] | None = None,
    overwrite: bool = False,
    on_shard: Callable[[Path, ShardEntry], None] | None = None,
) -> BuildResult:
    """Build (or resume, or confirm up to date) the shards of one split.

    Refuses (BuildError) a folder holding shards built with other settings unless ``overwrite``.
    With ``workers`` > 1 the worker processes start first, in the background, so that its start
    (a fork server importing the pipeline) overlaps the listing and the folder checks.
    ``on_shard(path, entry)`` is called for each shard once it is final on disk (written and
    journaled, or kept from an interrupted build), in order: a bucket build uploads it then.
    """
    starting = Workers(workers, config) if workers > 1 else None
    try:
        return _build(source, split, Path(out_dir), config, starting, partition, progress, overwrite, on_shard)
    finally:
        if starting is not None:
            starting.close()


class _Announcing:
    """A journal that calls ``on_shard`` after recording each finished shard."""

    def __init__(self, journal: Journal, out_dir: Path, on_shard: Callable[[Path, ShardEntry], None]):
        self.journal, self.out_dir, self.on_shard = journal, out_dir, on_shard

    def add(self, entry: Any) -> None:
        self.journal.add(entry)
        self.on_shard(self.out_dir / entry.shard.name, entry.shard)


def _build(source: str | Path, split: str, out_dir: Path, config: Config, starting: Workers | None,
           partition: Partition | None, progress: Callable[[Progress], None] | None, overwrite: bool,
           on_shard: Callable[[Path, ShardEntry], None] | None = None) -> BuildResult:
    listing = list_source(source, split, config.source)
    out_dir.mkdir(parents=True, exist_ok=True)
    prefix, manifest_name, rejects_name = _names(partition)
    lo, hi = partition.bounds(len(listing.samples)) if partition else (0, len(listing.samples))
    plan = _Plan(listing, split, config, partition, lo, hi)
    manifest_file = out_dir / manifest_name
    rejects_file = out_dir / rejects_name

    with FolderLock(out_dir, shared=partition is not None and partition.count > 1), \
            BuildLock(out_dir / lock_name(prefix)):
        journal = Journal(out_dir, prefix, {
            "fingerprint": config.fingerprint(),
            "shard_settings": config.shards.model_dump(mode="json"),
            "annotation_sha256": listing.annotation_sha256,
            "names_sha256": hashlib.sha256("\n".join(s.name for s in listing.samples).encode()).hexdigest(),
            "range": [lo, hi],
        })
        if not overwrite:
            _check_folder(out_dir, prefix, plan, journal)
        current = _current_manifest(manifest_file, rejects_file, plan)
        if current is not None:
            journal.remove()  # left over when a build was killed between the manifest and its cleanup
            remove_strays(out_dir, prefix, {entry.name for entry in current.shards})
            return BuildResult(out_dir, current, manifest_file, rejects_file, [], len(current.shards), True)
        manifest_file.unlink(missing_ok=True)
        entries = journal.load()
        kept = reusable_entries(entries, out_dir, prefix, lo, plan.digest_at)
        if len(kept) < len(entries):
            journal.drop_from(shard_name(prefix, len(kept)))
        remove_strays(out_dir, prefix, {e.shard.name for e in kept})

        resume_at = kept[-1].next if kept else lo
        reused = [entry.shard for entry in kept]
        if on_shard is not None:
            for entry in reused:
                on_shard(out_dir / entry.name, entry)
        sink = ShardSink(out_dir, prefix, config.shards.max_samples, config.shards.max_bytes,
                         journal if on_shard is None else _Announcing(journal, out_dir, on_shard), reused)
        written = sum(entry.samples for entry in reused)
        counts = Progress(resume_at - lo, hi - lo, written, sum(len(e.rejects) for e in kept), written)
        try:
            for outcome in outcomes(listing.samples, config, range(resume_at, hi), starting):
                sink.consume(outcome)
                counts.done += 1
                if outcome.record is not None:
                    counts.written += 1
                else:
                    counts.rejected += 1
                if progress is not None:
                    progress(counts)
            sink.close(next_position=hi)
        except BaseException:
            sink.abort()
            raise
        # Every outcome is now in a journal entry, or in the tail after the last shard.
        done = [*journal.load(), sink.tail]
        rejects = plan.listing_rejects + [r for e in done for r in e.rejects]
        skips = [s for e in done for s in e.skips]
        digests = [d for e in done for d in e.digests]
        coverage = sum((e.coverage for e in done), Coverage())
        manifest = plan.manifest(sink.entries, digests, len(rejects), len(skips), coverage)
        write_rejects(rejects_file, rejects + skips)
        write_manifest(manifest_file, manifest)
        journal.remove()
    return BuildResult(out_dir, manifest, manifest_file, rejects_file, rejects + skips, len(kept))
