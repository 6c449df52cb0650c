"""merge: join the manifests of a partitioned build (``build-shards --partition i/n``).

Every part must be present exactly once, agree on the fingerprint, record and shard settings,
source listing and part count, and cover consecutive ranges of the listing. The merged manifest
is what an unpartitioned build would have recorded (counts, source fingerprint), with the parts'
shards in part order. It is written last; the rejects of all parts are joined into rejects.jsonl.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from wds_ocr.errors import ManifestError
from wds_ocr.shards.build import environment, source_fingerprint, write_rejects
from wds_ocr.shards.manifest import MANIFEST_NAME, Manifest, parse_manifest, write_manifest

_PART = re.compile(r"^manifest\.part-p(\d{3})of(\d{3})\.json$")


def _agree(parts: list[tuple[Path, Manifest]], field: str, value_of) -> None:
    first_path, first = parts[0]
    for path, part in parts[1:]:
        if value_of(part) != value_of(first):
            raise ManifestError(
                f"{path.name} and {first_path.name} disagree on {field}: "
                f"{value_of(part)!r} vs {value_of(first)!r}; rebuild the parts with the same source and config"
            )


def merge_parts(folder: str | Path) -> tuple[Manifest, Path]:
    """Merge ``manifest.part-*.json`` in ``folder`` into ``manifest.json``."""
    folder = Path(folder)
    found = sorted(p for p in folder.glob("manifest.part-*.json") if _PART.match(p.name))
    if not found:
        raise ManifestError(f"{folder} holds no part manifests (manifest.part-pIIIofNNN.json); "
                            "run build-shards --partition i/n first")
    parts = [(path, parse_manifest(path.read_bytes(), str(path))) for path in found]
    _agree(parts, "the part count", lambda m: (m.partition or {}).get("count"))
    count = parts[0][1].partition["count"]
    indices = [m.partition["index"] for _, m in parts]
    missing = sorted(set(range(count)) - set(indices))
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
    digests = [d for _, part in parts for d in (part.source_digests or ())]
    counts = {name: sum(part.counts[name] for _, part in parts) for name in first.counts}
    source = dict(first.source)
    source["fingerprint"] = source_fingerprint(source["annotation_sha256"], source.get("listing_rejects", []), digests)
    merged = Manifest(
        fingerprint=first.fingerprint,
        record_settings=first.record_settings,
        source=source,
        counts=counts,
        shard_settings=first.shard_settings,
        shards=tuple(entry for _, part in parts for entry in part.shards),
        environment=environment(),
    )
    rejects = []
    for index in range(count):
        path = folder / f"rejects.part-p{index:03d}of{count:03d}.jsonl"
        if path.is_file():
            rejects += [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    write_rejects(folder / "rejects.jsonl", rejects)
    out = folder / MANIFEST_NAME
    write_manifest(out, merged)
    return merged, out
