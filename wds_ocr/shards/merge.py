"""merge: join the manifests of a partitioned build (``build-shards --partition i/n``).

Every part must be present exactly once, agree on the fingerprint, record and shard settings,
source listing and part count, and cover consecutive ranges of the listing. The merged manifest
is what an unpartitioned build would have recorded (counts, source fingerprint), with the parts'
shards in part order. The rejects of all parts are joined into rejects.jsonl; the manifest is
written last.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable

from wds_ocr.data.coverage import Coverage
from wds_ocr.errors import ManifestError
from wds_ocr.shards.build import environment, source_fingerprint, write_rejects
from wds_ocr.shards.manifest import MANIFEST_NAME, Manifest, parse_manifest, write_manifest

_PART = re.compile(r"^manifest\.part-p(\d{3})of(\d{3})\.json$")


def _agree(parts: list[tuple[Path, Manifest]], what: str, value_of: Callable[[Manifest], Any]) -> None:
    first_path, first = parts[0]
    for path, part in parts[1:]:
        if value_of(part) != value_of(first):
            raise ManifestError(
                f"{path.name} and {first_path.name} disagree on {what}: "
                f"{value_of(part)!r} vs {value_of(first)!r}; rebuild the parts with the same source and config"
            )


def _read_part(path: Path) -> Manifest:
    manifest = parse_manifest(path.read_bytes(), str(path))
    match = _PART.match(path.name)
    tag = (int(match.group(1)), int(match.group(2))) if match else None
    if manifest.partition is None or tag != (manifest.partition["index"], manifest.partition["count"]):
        raise ManifestError(f"{path}: its partition field {manifest.partition!r} does not match its file name")
    return manifest


def _read_rejects(path: Path, part: Manifest) -> list[dict[str, Any]]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ManifestError(f"{path} is missing: rebuild that part (build-shards --partition "
                            f"{part.partition['index']}/{part.partition['count']})") from None
    try:
        rejects = [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{path} is not valid JSON lines: {exc}") from None
    if len(rejects) != part.counts.get("rejected", 0) + part.counts.get("words_skipped", 0):
        raise ManifestError(f"{path} holds {len(rejects)} lines, its manifest counts "
                            f"{part.counts.get('rejected')} rejects + {part.counts.get('words_skipped')} skipped words")
    return rejects


def merge_parts(folder: str | Path) -> tuple[Manifest, Path]:
    """Merge ``manifest.part-*.json`` in ``folder`` into ``manifest.json``."""
    folder = Path(folder)
    found = sorted(p for p in folder.glob("manifest.part-*.json") if _PART.match(p.name))
    if not found:
        raise ManifestError(f"{folder} holds no part manifests (manifest.part-pIIIofNNN.json); "
                            "run build-shards --partition i/n first")
    parts = [(path, _read_part(path)) for path in found]
    _agree(parts, "the part count", lambda m: m.partition["count"])
    count = parts[0][1].partition["count"]
    missing = sorted(set(range(count)) - {m.partition["index"] for _, m in parts})
    if missing:
        raise ManifestError(f"{folder}: parts {missing} of {count} are missing; build them before merging")
    _agree(parts, "the config fingerprint", lambda m: m.fingerprint)
    _agree(parts, "the shard settings", lambda m: m.shard_settings)
    _agree(parts, "the source listing", lambda m: {k: m.source.get(k) for k in ("format", "split", "annotation_sha256", "listed", "listing_rejects")})
    parts.sort(key=lambda item: item[1].partition["index"])
    expected_lo = 0
    for path, part in parts:
        if part.partition["lo"] != expected_lo:
            raise ManifestError(f"{path.name} starts at sample {part.partition['lo']}, expected {expected_lo}")
        expected_lo = part.partition["hi"]
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
        counts={**{name: sum(part.counts[name] for _, part in parts) for name in first.counts if name != "words"},
                "words": sum((part.coverage for _, part in parts), Coverage()).as_dict()},
        shard_settings=first.shard_settings,
        shards=tuple(entry for _, part in parts for entry in part.shards),
        environment=environment(),
    )
    rejects = []
    for _, part in parts:
        tag = f"p{part.partition['index']:03d}of{count:03d}"
        rejects += _read_rejects(folder / f"rejects.part-{tag}.jsonl", part)
    write_rejects(folder / "rejects.jsonl", rejects)
    out = folder / MANIFEST_NAME
    write_manifest(out, merged)
    return merged, out
