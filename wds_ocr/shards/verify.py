"""verify: prove that shards are intact, current, and equal to what the live pipeline produces.

Checks, each reported as one ``Problem`` (shard, key, what):
  * the manifest parses, its schema is known, its fingerprint matches its own settings;
  * staleness: pipeline version and (when a config is given) the config fingerprint;
  * per shard: a regular file, size and sha256 as in the manifest, strict tar parse, member keys /
    offsets / per-member digests and checksums as listed, keys unique across shards, every record
    decodes and passes the codec's validation, its side and threshold range match the manifest,
    end-of-archive blocks intact;
  * the folder: no shard file of the build's prefixes that the manifest does not list (an entry
    removed from the manifest), shard numbers consecutive, the rejects file agrees with
    counts.rejected / counts.words_skipped, and every listed sample is in the shards or the rejects;
  * with a source: every record (or ``sample`` of them) equals a fresh run of the live pipeline
    bit for bit, both as stored (the compact record's bytes) and expanded (the full image and
    maps ``Record.expand`` restores equal the live pipeline's arrays), every source sample is
    either in the shards or in the rejects, and the source fingerprint matches.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from wds_ocr.config import PIPELINE_VERSION, Config, build_config, recorded, settings_changes, settings_fingerprint
from wds_ocr.data.coverage import Coverage
from wds_ocr.data.sources import SourceListing, list_source
from wds_ocr.errors import ConfigError, ManifestError, ShardFormatError
from wds_ocr.shards.against_source import SourceCheck
from wds_ocr.shards.fingerprint import image_digest, source_fingerprint
from wds_ocr.shards.codec import decode_record
from wds_ocr.shards.record import Record
from wds_ocr.shards.manifest import DIGEST_HEX, Manifest, ShardEntry, load_manifest, manifest_path
from wds_ocr.shards.naming import (MEMBER_EXTENSION, PART_MANIFEST_PATTERN, SHARD_PATTERN, key_index, record_key,
                                   rejects_name)
from wds_ocr.shards.rejects import Reject, read_rejects
from wds_ocr.shards.tario import BLOCK, Member, iter_members


@dataclass(frozen=True)
class Problem:
    shard: str | None
    key: str | None
    what: str

    def line(self) -> str:
        """'shard key: what', 'shard: what', or just what for a problem of the whole folder."""
        where = " ".join(part for part in (self.shard, self.key) if part)
        return f"{where}: {self.what}" if where else self.what


@dataclass
class VerifyReport:
    location: str
    shards_checked: int = 0
    samples_checked: int = 0
    compared_with_source: int = 0
    stale: bool = False
    problems: list[Problem] = field(default_factory=list)
    # words of the records checked: in the training targets, or left out and why
    coverage: dict[str, int] = field(default_factory=lambda: Coverage().as_dict())

    @property
    def ok(self) -> bool:
        return not self.problems

    def add(self, shard: str | None, key: str | None, what: str) -> None:
        self.problems.append(Problem(shard, key, what))

    def as_dict(self) -> dict[str, Any]:
        body = asdict(self)
        body["ok"] = self.ok
        return body


def config_from_manifest(manifest: Manifest) -> Config:
    """The configuration a manifest was built with (the record-relevant parts). Raises ManifestError."""
    settings = manifest.record_settings
    try:
        source = dict(settings["source"], format=manifest.source.get("format", "json"))
        return build_config(recorded({"source": source, "transform": settings["transform"],
                                      "targets": settings["targets"]}))
    except (KeyError, TypeError, ValueError, ConfigError) as exc:
        raise ManifestError(f"the manifest's record_settings are not a valid configuration: {exc}") from None


def check_staleness(manifest: Manifest, config: Config | None, report: VerifyReport) -> None:
    if settings_fingerprint(manifest.record_settings) != manifest.fingerprint:
        report.add(None, None, "manifest fingerprint does not match its own record_settings (manifest edited?)")
    built = manifest.record_settings.get("pipeline_version")
    if built != PIPELINE_VERSION:
        report.stale = True
        report.add(None, None, f"stale: built by pipeline version {built}, this code is version {PIPELINE_VERSION}; "
                               "rebuild with wds-ocr build-shards")
    if config is not None and config.fingerprint() != manifest.fingerprint:
        report.stale = True
        changes = "; ".join(settings_changes(manifest.record_settings, config.record_settings())) or "settings differ"
        report.add(None, None, f"stale: shards were built with other settings ({changes}); rebuild them")


def check_record(record: Record, size: int, thresh_range: tuple[float, float]) -> list[str]:
    """What a decoded (so already validated, see ``codec``) record must also agree on with its
    manifest: its side and the threshold range. An empty list when both hold."""
    problems = []
    if record.meta.side != size:
        problems.append(f"record side {record.meta.side}, expected {size} (transform.size)")
    a = record.arrays
    thresh = np.concatenate([a["thresh_fill"], a["thresh_values"]]).astype(np.float32)
    low, high = thresh_range
    if thresh.min() < low - 1e-3 or thresh.max() > high + 1e-3:
        problems.append(f"thresh_map outside [{low}, {high}]")
    return problems


@dataclass
class _ShardState:
    next_position: int = 0  # the manifest position after the furthest member seen
    next_offset: int = 0  # where the next member header should start
    shifted: bool = False  # a member is missing or extra: later offsets are expected to move


def _member_problems(member: Member, entry: ShardEntry, listed: dict[str, list[int]], state: _ShardState,
                     report: VerifyReport) -> None:
    """Where a member sits against the manifest: listed, in order, at its offset, with its digest."""
    key = member.key
    positions = listed.get(key)
    if positions is None:
        state.shifted = True
        report.add(entry.name, key, "member is not listed in the manifest (inserted member?)")
        return
    # A key listed twice (itself a problem, reported as a duplicate) takes its next free position.
    position = next((p for p in positions if p >= state.next_position), positions[0])
    if position > state.next_position:
        state.shifted = True
        for missing in entry.keys[state.next_position:position]:
            report.add(entry.name, missing, "listed in the manifest but missing from the shard (deleted member?)")
    elif position < state.next_position:
        state.shifted = True
        report.add(entry.name, key, f"member is listed at position {position} but comes after position "
                                    f"{state.next_position - 1} (reordered or repeated member)")
    if not state.shifted and member.offset != entry.offsets[position]:
        report.add(entry.name, key, f"at byte {member.offset}, manifest says {entry.offsets[position]}")
    if member.span_bytes_digest()[:DIGEST_HEX] != entry.digests[position]:
        report.add(entry.name, key, "member bytes differ from the manifest digest (corrupt member)")
    elif member.span_checksum() != entry.checksums[position]:
        report.add(entry.name, key, "member checksum differs from the manifest's while its sha256 digest matches "
                                    "(manifest edited?)")
    state.next_position = max(state.next_position, position + 1)


def _verify_shard(
    folder: Path, entry: ShardEntry, manifest: Manifest, report: VerifyReport, seen_keys: dict[str, str],
    source: SourceCheck | None,
) -> None:
    path = folder / entry.name
    if not path.exists():
        report.add(entry.name, None, f"shard missing ({path})")
        return
    if not path.is_file():
        report.add(entry.name, None, f"{path} is not a regular file")
        return
    size = path.stat().st_size
    if size != entry.bytes:
        report.add(entry.name, None, f"size {size} bytes, manifest says {entry.bytes} (truncated or appended?)")
    thresh_range = manifest.thresh_range
    listed: dict[str, list[int]] = {}
    for position, key in enumerate(entry.keys):
        listed.setdefault(key, []).append(position)
    by_offset = dict(zip(entry.offsets, entry.keys))
    state = _ShardState()
    whole = hashlib.sha256()
    with open(path, "rb") as handle:
        try:
            for member in iter_members(handle, entry.name, hasher=whole):
                key = member.key
                state.next_offset = member.offset + member.span
                if key in seen_keys:
                    report.add(entry.name, key, f"duplicate key (also in {seen_keys[key]})")
                seen_keys[key] = entry.name
                _member_problems(member, entry, listed, state, report)
                if member.extension != MEMBER_EXTENSION:
                    report.add(entry.name, key, f"unexpected member extension {member.extension!r}")
                    continue
                try:
                    record = decode_record(member.data, entry.name, key)
                except ShardFormatError as exc:
                    report.add(entry.name, key, exc.reason)
                    continue
                problems = check_record(record, manifest.image_size, thresh_range)
                for problem in problems:
                    report.add(entry.name, key, problem)
                if not problems:
                    report.coverage = (Coverage.from_dict(report.coverage)
                                       + Coverage.from_codes(record.arrays["left_out"])).as_dict()
                report.samples_checked += 1
                if source is not None:
                    source.compare(entry.name, key, member.data, report)
        except ShardFormatError as exc:
            # A broken header names no key: the manifest says which member starts at that byte.
            report.add(entry.name, exc.key or by_offset.get(state.next_offset), exc.reason)
            return
        end = state.next_offset
        tail = handle.read()
    whole.update(tail)
    for missing in entry.keys[state.next_position:]:
        report.add(entry.name, missing, "listed in the manifest but missing from the shard (deleted member?)")
    # iter_members consumed the first end-of-archive block; the second and the padding follow.
    if tail.strip(b"\x00") or len(tail) < BLOCK:
        report.add(entry.name, None, "end-of-archive blocks are damaged or missing")
    elif end != entry.members_end and not state.shifted:
        report.add(entry.name, None, f"members end at byte {end}, manifest says {entry.members_end}")
    if whole.hexdigest() != entry.sha256:
        report.add(entry.name, None, f"sha256 {whole.hexdigest()[:16]}... differs from the manifest's {entry.sha256[:16]}...")
    report.shards_checked += 1


def _read_own_rejects(folder: Path, manifest: Manifest, report: VerifyReport) -> list[Reject] | None:
    """The rejects file written with this manifest; None (and a problem) when it is unusable."""
    part = (manifest.partition.index, manifest.partition.count) if manifest.partition else None
    try:
        return read_rejects(folder / rejects_name(part))
    except ManifestError as exc:
        report.add(None, None, str(exc))
        return None


def _check_folder(folder: Path, manifest: Manifest, report: VerifyReport) -> None:
    """Shard files the manifest does not list (an entry removed?), and numbering without gaps."""
    numbers: dict[str, list[int]] = {}
    for entry in manifest.shards:
        match = SHARD_PATTERN.fullmatch(entry.name)
        numbers.setdefault(match.group(1), []).append(int(match.group(2)))
    for prefix, found in numbers.items():
        if sorted(found) != list(range(len(found))):
            report.add(None, None, f"the manifest's {prefix} shards are not numbered 0..{len(found) - 1} "
                                   "without gaps (an entry removed?)")
    listed = {entry.name for entry in manifest.shards}
    whole = manifest.partition is None  # a part's folder also holds the other parts' files
    # A merged manifest's shards are named shard-pIIIofNNN-...: its parts' manifests belong to it.
    merged_counts = {prefix[len("shard-p") + 3 + 2:] for prefix in numbers if prefix.startswith("shard-p")}
    for path in sorted(folder.iterdir()):
        match = SHARD_PATTERN.fullmatch(path.name)
        if match and match.group(1) in numbers and path.name not in listed:
            report.add(path.name, None, "shard file in the folder is not listed in the manifest (entry removed "
                                        "from the manifest?)")
        elif whole and match and path.name not in listed:
            report.add(path.name, None, "shard file in the folder that this manifest does not account for (another "
                                        "build's: a whole and a partitioned build into one folder?); remove it or "
                                        "rebuild the folder")
        elif whole and (part := PART_MANIFEST_PATTERN.fullmatch(path.name)) and part.group(2) not in merged_counts:
            report.add(None, None, f"{path.name} is a part manifest of a partitioned build whose shards this "
                                   "manifest does not hold (another build's?); remove it or rebuild the folder")


def _check_rejects(manifest: Manifest, rejects: list[Reject], report: VerifyReport) -> None:
    """The rejects file against counts.rejected / counts.words_skipped and the listing."""
    where = rejects_name((manifest.partition.index, manifest.partition.count) if manifest.partition else None)
    samples = [r for r in rejects if r.kind == "sample"]
    words = len(rejects) - len(samples)
    counts = manifest.counts
    if len(samples) != counts.rejected or words != counts.words_skipped:
        report.add(None, None, f"{where} lists {len(samples)} rejected samples and {words} skipped words, the "
                               f"manifest counts {counts.rejected} and {counts.words_skipped}")
        return
    keys = {key_index(key) for entry in manifest.shards for key in entry.keys}
    listing = [r for r in samples if r.index is None]
    if manifest.partition is None or manifest.partition.index == 0:
        if len(listing) != len(manifest.source["listing_rejects"]):
            report.add(None, None, f"{where} lists {len(listing)} samples rejected while listing, the manifest's "
                                   f"source.listing_rejects names {len(manifest.source['listing_rejects'])}")
    indices = [r.index for r in samples if r.index is not None]
    both = sorted(keys.intersection(indices))
    if both or len(set(indices)) != len(indices):
        report.add(None, None, f"{where}: samples both written and rejected, or rejected twice "
                               f"(listing positions {both[:5]})")
        return
    if manifest.partition is None:
        missing = manifest.source["listed"] - len(keys) - len(indices) - len(listing)
        if missing:
            report.add(None, None, f"{missing} listed samples are neither in the shards nor in {where} "
                                   "(a shard entry removed from the manifest?)")


def _check_source_coverage(manifest: Manifest, listing: SourceListing, source: SourceCheck, folder: Path,
                           report: VerifyReport) -> None:
    """Every source sample of the manifest's range is in the shards or the rejects; images unchanged."""
    lo, hi = (manifest.partition.lo, manifest.partition.hi) if manifest.partition else (0, len(listing.samples))
    rejects = _read_own_rejects(folder, manifest, report) or []
    rejected = {r.name for r in rejects if r.kind == "sample"}
    for sample in listing.samples[lo:hi]:
        key = record_key(sample.index, sample.name)
        if key not in source.seen and sample.name not in rejected:
            report.add(None, key, f"source sample {sample.name} is neither in the shards nor in the rejects")
    digests = [image_digest(sample, source.config.source.max_file_bytes) for sample in listing.samples[lo:hi]]
    if manifest.partition:
        changed = manifest.source_digests != tuple(digests)
    else:
        rejected_names = [r.name for r in listing.rejects]
        changed = manifest.source.get("fingerprint") != source_fingerprint(listing.annotation_sha256, rejected_names, digests)
    if changed or manifest.source.get("annotation_sha256") != listing.annotation_sha256:
        report.add(None, None, "source fingerprint differs: the source images or annotations changed since the build")


def verify_shards(
    location: str | Path,
    config: Config | None = None,
    against_source: str | Path | None = None,
    sample: int | None = None,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> VerifyReport:
    """Verify a shard folder; ``config`` enables the staleness check against current settings.

    ``against_source`` re-runs the live pipeline under the settings the shards were built with
    (a changed ``config`` is reported as stale, not as a difference in every record).
    """
    path = manifest_path(location)
    report = VerifyReport(str(path))
    try:
        manifest = load_manifest(path)
    except ManifestError as exc:
        report.add(None, None, str(exc))
        return report
    check_staleness(manifest, config, report)
    source = None
    listing = None
    if against_source is not None:
        try:
            built_with = config_from_manifest(manifest)
        except ManifestError as exc:
            report.add(None, None, f"{exc}; cannot compare with the source")
        else:
            listing = list_source(against_source, manifest.source.get("split", ""), built_with.source)
            wanted = None
            if sample is not None:
                keys = [k for entry in manifest.shards for k in entry.keys]
                wanted = set(random.Random(seed).sample(keys, min(sample, len(keys))))
            source = SourceCheck(listing, built_with, wanted)
    seen: dict[str, str] = {}
    for entry in manifest.shards:
        _verify_shard(path.parent, entry, manifest, report, seen, source)
        if progress is not None:
            progress(entry.name)
    _check_folder(path.parent, manifest, report)
    rejects = _read_own_rejects(path.parent, manifest, report)
    if rejects is not None:
        _check_rejects(manifest, rejects, report)
    if source is not None and listing is not None:
        _check_source_coverage(manifest, listing, source, path.parent, report)
    words = manifest.counts.words.as_dict()
    if report.ok and report.coverage != words:
        report.add(None, None, f"the records' word coverage {report.coverage} differs from the manifest's "
                               f"counts.words {words} (manifest edited?)")
    return report
