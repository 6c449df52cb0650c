"""merge: join the manifests of a partitioned build (``build-shards --partition i/n``).

Every part must be present exactly once, agree on the fingerprint, record and shard settings,
source listing and part count, and cover consecutive ranges of the listing. The merged manifest
is what an unpartitioned build would have recorded (counts, source fingerprint), with the parts'
shards in part order. The rejects of all parts are joined into rejects.jsonl; the manifest is
written last.
"""

from __future__ import annotations

from functools import reduce
from pathlib import Path
from typing import Any, Callable

from wds_ocr.errors import ManifestError
from wds_ocr.shards.fingerprint import environment, source_fingerprint
from wds_ocr.shards.journal import FolderLock
from wds_ocr.shards.manifest import Manifest, load_manifest, write_manifest
from wds_ocr.shards.naming import MANIFEST_NAME, PART_MANIFEST_PATTERN, REJECTS_NAME, rejects_name
from wds_ocr.shards.rejects import Reject, read_rejects, write_rejects


def _agree(parts: list[tuple[Path, Manifest]], what: str, value_of: Callable[[Manifest], Any]) -> None:
    first_path, first = parts[0]
    for path, part in parts[1:]:
        if value_of(part) != value_of(first):
            raise ManifestError(
                f"{path.name} and {first_path.name} disagree on {what}: "
                f"{value_of(part)!r} vs {value_of(first)!r}; rebuild the parts with the same source and config"
            )


def _read_part(path: Path) -> Manifest:
    manifest = load_manifest(path)
    match = PART_MANIFEST_PATTERN.fullmatch(path.name)
    tag = (int(match.group(1)), int(match.group(2))) if match else None
    part = manifest.partition
    if part is None or tag != (part.index, part.count):
        raise ManifestError(f"{path}: its partition field {part!r} does not match its file name")
    return manifest


def _read_rejects(path: Path, part: Manifest) -> list[Reject]:
    if not path.exists():
        raise ManifestError(f"{path} is missing: rebuild that part (build-shards --partition "
                            f"{part.partition.index}/{part.partition.count})")
    rejects = read_rejects(path)
    if len(rejects) != part.counts.rejected + part.counts.words_skipped:
        raise ManifestError(f"{path} holds {len(rejects)} lines, its manifest counts "
                            f"{part.counts.rejected} rejects + {part.counts.words_skipped} skipped words")
    return rejects


def merge_parts(folder: str | Path) -> tuple[Manifest, Path]:
    """Merge ``manifest.part-*.json`` in ``folder`` into ``manifest.json`` (holding the folder's
    lock: never while a part or a whole build is writing there)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ManifestError(f"{folder} is not a folder of part manifests")
    with FolderLock(folder, shared=False):
        return _merge_parts(folder)


def _merge_parts(folder: Path) -> tuple[Manifest, Path]:
    found = sorted(p for p in folder.glob("manifest.part-*.json") if PART_MANIFEST_PATTERN.fullmatch(p.name))
    if not found:
        raise ManifestError(f"{folder} holds no part manifests (manifest.part-pIIIofNNN.json); "
                            "run build-shards --partition i/n first")
    parts = [(path, _read_part(path)) for path in found]
    _agree(parts, "the part count", lambda m: m.partition.count)
    count = parts[0][1].partition.count
    missing = sorted(set(range(count)) - {m.partition.index for _, m in parts})
    if missing:
        raise ManifestError(f"{folder}: parts {missing} of {count} are missing; build them before merging")
    _agree(parts, "the config fingerprint", lambda m: m.fingerprint)
    _agree(parts, "the shard settings", lambda m: m.shard_settings)
    _agree(parts, "the source listing", lambda m: {k: m.source.get(k) for k in ("format", "split", "annotation_sha256", "listed", "listing_rejects")})
    parts.sort(key=lambda item: item[1].partition.index)
    expected_lo = 0
    for path, part in parts:
        if part.partition.lo != expected_lo:
            raise ManifestError(f"{path.name} starts at sample {part.partition.lo}, expected {expected_lo}")
        expected_lo = part.partition.hi
    first = parts[0][1]
    listed = first.source.get("listed", 0) - len(first.source.get("listing_rejects", []))
    if expected_lo != listed:
        raise ManifestError(f"the parts cover samples 0..{expected_lo}, the source listing holds {listed}")
    digests = [d for _, part in parts for d in part.source_digests]
    source = dict(first.source)
    source["fingerprint"] = source_fingerprint(source["annotation_sha256"], source.get("listing_rejects", []), digests)
    merged = Manifest(
        fingerprint=first.fingerprint,
        record_settings=first.record_settings,
        source=source,
        counts=reduce(lambda a, b: a + b, (part.counts for _, part in parts)),
        shard_settings=first.shard_settings,
        shards=tuple(entry for _, part in parts for entry in part.shards),
        environment=environment(),
    )
    rejects: list[Reject] = []
    for _, part in parts:
        rejects += _read_rejects(folder / rejects_name((part.partition.index, count)), part)
    write_rejects(folder / REJECTS_NAME, rejects)
    out = folder / MANIFEST_NAME
    write_manifest(out, merged)
    return merged, out
