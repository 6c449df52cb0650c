"""verify: prove that shards are intact, current, and equal to what the live pipeline produces.

Checks, each reported as one ``Problem`` (shard, key, what):
  * the manifest parses, its schema is known, its fingerprint matches its own settings;
  * staleness: pipeline version and (when a config is given) the config fingerprint;
  * per shard: present, size and sha256 as in the manifest, strict tar parse, member keys /
    offsets / per-member digests as listed, keys unique across shards, every record decodes,
    its dtypes, shapes and value ranges hold, end-of-archive blocks intact;
  * with a source: every record (or ``sample`` of them) equals a fresh run of the live pipeline
    bit for bit, every source sample is either in the shards or in the rejects, and the source
    fingerprint matches.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from wds_ocr.config import PIPELINE_VERSION, Config
from wds_ocr.data.images import read_image_bytes
from wds_ocr.data.pipeline import process_sample
from wds_ocr.data.sources import SourceListing, list_source
from wds_ocr.errors import ManifestError, SampleError, ShardFormatError
from wds_ocr.shards.build import record_key, source_fingerprint
from wds_ocr.shards.codec import ARRAY_SPECS, MEMBER_EXTENSION, Record, decode_record, encode_record
from wds_ocr.shards.manifest import DIGEST_HEX, Manifest, ShardEntry, load_manifest, manifest_path
from wds_ocr.shards.tario import BLOCK, iter_members

_CHUNK = 1 << 22


@dataclass(frozen=True)
class Problem:
    shard: str | None
    key: str | None
    what: str

    def line(self) -> str:
        return f"{self.shard or '-'} {self.key or '-'}: {self.what}"


@dataclass
class VerifyReport:
    location: str
    shards_checked: int = 0
    samples_checked: int = 0
    compared_with_source: int = 0
    stale: bool = False
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def add(self, shard: str | None, key: str | None, what: str) -> None:
        self.problems.append(Problem(shard, key, what))

    def as_dict(self) -> dict[str, Any]:
        body = asdict(self)
        body["ok"] = self.ok
        return body


def _settings_fingerprint(settings: dict[str, Any]) -> str:
    canonical = json.dumps(settings, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for name in sorted(set(a) | set(b)):
            out += _diff(a.get(name), b.get(name), f"{prefix}{name}.")
        return out
    return [] if a == b else [f"{prefix.rstrip('.')}: built with {a!r}, now {b!r}"]


def config_from_manifest(manifest: Manifest) -> Config:
    """The configuration a manifest was built with (the record-relevant parts)."""
    settings = manifest.record_settings
    source = dict(settings["source"], format=manifest.source.get("format", "json"))
    source["dont_care"] = tuple(source["dont_care"])
    return Config(source=source, transform=settings["transform"], targets=settings["targets"])


def check_staleness(manifest: Manifest, config: Config | None, report: VerifyReport) -> None:
    if _settings_fingerprint(manifest.record_settings) != manifest.fingerprint:
        report.add(None, None, "manifest fingerprint does not match its own record_settings (manifest edited?)")
    built = manifest.record_settings.get("pipeline_version")
    if built != PIPELINE_VERSION:
        report.stale = True
        report.add(None, None, f"stale: built by pipeline version {built}, this code is version {PIPELINE_VERSION}; "
                               "rebuild with wds-ocr build-shards")
    if config is not None and config.fingerprint() != manifest.fingerprint:
        report.stale = True
        changes = "; ".join(_diff(manifest.record_settings, config.record_settings())) or "settings differ"
        report.add(None, None, f"stale: shards were built with other settings ({changes}); rebuild them")


def check_record(record: Record, size: int, thresh_range: tuple[float, float]) -> list[str]:
    """Invariants of one decoded record; an empty list when all hold."""
    problems = []
    a = record.arrays
    if a["image"].shape != (size, size, 3):
        problems.append(f"image shape {list(a['image'].shape)}, expected [{size}, {size}, 3]")
    for name in ("gt", "mask", "thresh_map", "thresh_mask"):
        if a[name].shape != (size, size):
            problems.append(f"{name} shape {list(a[name].shape)}, expected [{size}, {size}]")
    for name in ("gt", "mask", "thresh_mask", "dont_care", "ignored"):
        if a[name].size and int(a[name].max()) > 1:
            problems.append(f"{name} holds values other than 0 and 1 (max {int(a[name].max())})")
    thresh = a["thresh_map"].astype(np.float32)
    low, high = thresh_range
    if thresh.size and (not np.isfinite(thresh).all() or thresh.min() < low - 1e-3 or thresh.max() > high + 1e-3):
        problems.append(f"thresh_map outside [{low}, {high}] or not finite")
    sizes = a["polygon_sizes"]
    count = len(sizes)
    vertices = int(sizes.sum()) if count else 0
    if count and int(sizes.min()) < 3:
        problems.append("a polygon has fewer than 3 points")
    for name in ("polygons", "polygons_original"):
        if a[name].shape != (vertices, 2):
            problems.append(f"{name} shape {list(a[name].shape)}, expected [{vertices}, 2] from polygon_sizes")
    for name in ("dont_care", "ignored"):
        if a[name].shape != (count,):
            problems.append(f"{name} has {a[name].shape[0]} flags for {count} polygons")
    meta = record.meta
    for name in ("word_ids", "texts"):
        if not isinstance(meta.get(name), list) or len(meta[name]) != count:
            problems.append(f"meta.{name} must list one entry per polygon ({count})")
    if meta.get("orientation") not in range(1, 9):
        problems.append(f"meta.orientation {meta.get('orientation')!r} is not 1..8")
    if not isinstance(meta.get("name"), str) or not meta.get("name"):
        problems.append("meta.name is missing")
    matrix = a["inverse_matrix"]
    if matrix.shape != (3, 3) or not np.isfinite(matrix).all() or not np.allclose(matrix[2], [0.0, 0.0, 1.0]):
        problems.append("inverse_matrix is not a finite 3x3 affine matrix")
    elif vertices and a["polygons"].shape == (vertices, 2) and a["polygons_original"].shape == (vertices, 2):
        back = a["polygons"] @ matrix[:2, :2].T + matrix[:2, 2]
        if not np.allclose(back, a["polygons_original"], atol=1e-6, rtol=1e-9):
            problems.append("inverse_matrix does not map polygons back onto polygons_original")
    return problems


def describe_difference(shard: Record, live: Record) -> str:
    """Which fields of a shard record differ from the live pipeline's record."""
    diffs = []
    for name in ARRAY_SPECS:
        x, y = shard.arrays[name], live.arrays[name]
        if x.shape != y.shape:
            diffs.append(f"{name} shape {list(x.shape)} vs live {list(y.shape)}")
        elif x.tobytes() != y.tobytes():
            diffs.append(f"{name} differs at {int(np.count_nonzero(x != y))} elements")
    for name in sorted(set(shard.meta) | set(live.meta)):
        if shard.meta.get(name) != live.meta.get(name):
            diffs.append(f"meta.{name} {shard.meta.get(name)!r} vs live {live.meta.get(name)!r}")
    return "; ".join(diffs) or "record bytes differ (header encoding)"


class _SourceCheck:
    """Re-runs the live pipeline for selected records and compares bytes."""

    def __init__(self, listing: SourceListing, config: Config, wanted: set[str] | None):
        self.listing = listing
        self.config = config
        self.wanted = wanted
        self.by_key = {record_key(s.index, s.name): s for s in listing.samples}
        self.seen: set[str] = set()

    def compare(self, shard: str, key: str, data: bytes, report: VerifyReport) -> None:
        self.seen.add(key)
        if self.wanted is not None and key not in self.wanted:
            return
        sample = self.by_key.get(key)
        if sample is None:
            report.add(shard, key, "record has no sample in the source listing (built from another source?)")
            return
        try:
            live = encode_record(process_sample(sample, self.config), key)
        except SampleError as exc:
            report.add(shard, key, f"live pipeline rejects this sample now: {exc.reason}")
            return
        report.compared_with_source += 1
        if live != data:
            what = describe_difference(decode_record(data, shard, key), decode_record(live, "<live>", key))
            report.add(shard, key, f"differs from the live pipeline: {what}")


def _verify_shard(
    folder: Path, entry: ShardEntry, manifest: Manifest, report: VerifyReport, seen_keys: dict[str, str],
    source: _SourceCheck | None,
) -> None:
    path = folder / entry.name
    if not path.is_file():
        report.add(entry.name, None, f"shard missing ({path})")
        return
    size = path.stat().st_size
    if size != entry.bytes:
        report.add(entry.name, None, f"size {size} bytes, manifest says {entry.bytes} (truncated or appended?)")
    thresh_range = (manifest.record_settings["targets"]["thresh_min"], manifest.record_settings["targets"]["thresh_max"])
    whole = hashlib.sha256()
    position = 0
    with open(path, "rb") as handle:
        try:
            for member in iter_members(handle, entry.name, hasher=whole):
                key = member.key
                expected = entry.keys[position] if position < entry.samples else None
                if key in seen_keys:
                    report.add(entry.name, key, f"duplicate key (also in {seen_keys[key]})")
                seen_keys[key] = entry.name
                if expected is None:
                    report.add(entry.name, key, f"member beyond the {entry.samples} the manifest lists")
                elif key != expected:
                    report.add(entry.name, key, f"member {position} should be {expected!r} (deleted, inserted or reordered member)")
                elif member.offset != entry.offsets[position]:
                    report.add(entry.name, key, f"at byte {member.offset}, manifest says {entry.offsets[position]}")
                elif member.span_bytes_digest()[:DIGEST_HEX] != entry.digests[position]:
                    report.add(entry.name, key, "member bytes differ from the manifest digest (corrupt member)")
                position += 1
                if member.extension != MEMBER_EXTENSION:
                    report.add(entry.name, key, f"unexpected member extension {member.extension!r}")
                    continue
                try:
                    record = decode_record(member.data, entry.name, key)
                except ShardFormatError as exc:
                    report.add(entry.name, key, exc.reason)
                    continue
                for problem in check_record(record, manifest.image_size, thresh_range):
                    report.add(entry.name, key, problem)
                report.samples_checked += 1
                if source is not None:
                    source.compare(entry.name, key, member.data, report)
        except ShardFormatError as exc:
            report.add(entry.name, exc.key, exc.reason)
            return
        tail = handle.read()
    whole.update(tail)
    if position < entry.samples:
        missing = ", ".join(entry.keys[position:position + 3])
        report.add(entry.name, entry.keys[position], f"{entry.samples - position} member(s) missing, from {missing}")
    if tail.strip(b"\x00") or len(tail) < 2 * BLOCK:
        report.add(entry.name, None, "end-of-archive blocks are damaged or missing")
    if whole.hexdigest() != entry.sha256:
        report.add(entry.name, None, f"sha256 {whole.hexdigest()[:16]}... differs from the manifest's {entry.sha256[:16]}...")
    report.shards_checked += 1


def _source_digests(listing: SourceListing) -> list[str]:
    digests = []
    for sample in listing.samples:
        try:
            digests.append(hashlib.sha256(read_image_bytes(sample.image_path, sample.name)).hexdigest())
        except SampleError:
            digests.append("unreadable")
    return digests


def _rejected_names(folder: Path) -> set[str]:
    names: set[str] = set()
    for path in folder.glob("rejects*.jsonl"):
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                body = json.loads(line)
                if body.get("kind") == "sample":
                    names.add(body["name"])
    return names


def verify_shards(
    location: str | Path,
    config: Config | None = None,
    against_source: str | Path | None = None,
    sample: int | None = None,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> VerifyReport:
    """Verify a shard folder; ``config`` enables the staleness check against current settings."""
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
        config = config or config_from_manifest(manifest)
        listing = list_source(against_source, manifest.source["split"], config.source)
        wanted = None
        if sample is not None:
            keys = [k for entry in manifest.shards for k in entry.keys]
            wanted = set(random.Random(seed).sample(keys, min(sample, len(keys))))
        source = _SourceCheck(listing, config, wanted)
    seen: dict[str, str] = {}
    for entry in manifest.shards:
        _verify_shard(path.parent, entry, manifest, report, seen, source)
        if progress is not None:
            progress(entry.name)
    if source is not None and listing is not None:
        rejected = _rejected_names(path.parent)
        for key, sample_ in source.by_key.items():
            if key not in source.seen and sample_.name not in rejected:
                report.add(None, key, f"source sample {sample_.name} is neither in the shards nor in the rejects")
        expected = manifest.source.get("fingerprint")
        actual = source_fingerprint(listing.annotation_sha256, [r.name for r in listing.rejects], _source_digests(listing))
        if expected != actual:
            report.add(None, None, "source fingerprint differs: the source images or annotations changed since the build")
    return report
