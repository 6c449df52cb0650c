"""inspect: what a shard folder holds, and a picture of one record.

The record is read with one positioned read of its manifest span from a shard that must be a
regular file of the manifest's size, and decoded (so validated) by the codec: a hostile record is
a ShardFormatError naming shard and key, never a traceback.
"""

from __future__ import annotations

import io

from dataclasses import dataclass, field
from pathlib import Path

from wds_ocr.data.coverage import Coverage
from wds_ocr.errors import ManifestError, ShardFormatError, UsageError
from wds_ocr.shards import compact
from wds_ocr.shards.codec import decode_record
from wds_ocr.shards.record import Record
from wds_ocr.shards.manifest import Manifest, load_manifest, manifest_path
from wds_ocr.shards.naming import record_key
from wds_ocr.shards.tario import iter_members, read_span


@dataclass
class InspectSummary:
    manifest: Manifest
    record: Record
    shard: str
    png: Path | None
    arrays: list[tuple[str, str, tuple[int, ...], int]] = field(default_factory=list)

    def lines(self) -> list[str]:
        m = self.manifest
        total = sum(e.bytes for e in m.shards)
        c = m.counts
        out = [
            f"shards: {len(m.shards)}  samples: {m.total_samples}  bytes: {total:,} "
            f"({total / max(m.total_samples, 1) / 1e6:.2f} MB per sample)",
            f"source: {m.source.get('format')} split {m.source.get('split')}; in {c.samples_in}, "
            f"written {c.written}, rejected {c.rejected}, words skipped {c.words_skipped}",
            m.coverage.summary(),
            f"settings: size {m.image_size}, fingerprint {m.fingerprint[:16]}...",
        ]
        for entry in m.shards:
            out.append(f"  {entry.name}: {entry.samples} samples, {entry.bytes:,} bytes, "
                       f"{entry.first_key} .. {entry.last_key}, sha256 {entry.sha256[:16]}...")
        meta = self.record.meta
        out.append(f"record {self.record.key} (in {self.shard}): {meta.name}, original "
                   f"{meta.original_size[0]}x{meta.original_size[1]}, orientation {meta.orientation}, "
                   f"{len(meta.word_ids)} polygons")
        out.append(f"  {Coverage.from_codes(self.record.arrays['left_out']).summary()}")
        for name, dtype, shape, nbytes in self.arrays:
            out.append(f"  {name:18s} {dtype:4s} {str(list(shape)):16s} {nbytes:>10,} bytes")
        stored = sum(nbytes for *_, nbytes in self.arrays)
        full = compact.full_bytes(meta.side)
        out.append(f"  stored arrays {stored:,} bytes; expanded on the device to image + maps of {full:,} bytes "
                   f"({full / max(stored, 1):.1f}x)")
        if self.png is not None:
            out.append(f"wrote {self.png}")
        return out


def resolve_key(manifest: Manifest, wanted: str, where: str) -> str:
    """The record key ``wanted`` names: a key (0000007_sroie_010), the source file's name or stem
    (sroie_010.jpg, sroie_010), or a prefix of exactly one key or stem. Raises UsageError
    naming the candidates when it names none or several."""
    keys = [key for entry in manifest.shards for key in entry.keys]
    if wanted in keys:
        return wanted
    stem = record_key(0, wanted).split("_", 1)[1]  # the file name as keys hold it (no extension, safe chars)
    for candidates in ([k for k in keys if k.split("_", 1)[1] == stem],
                       sorted({k for k in keys if k.startswith(wanted) or k.split("_", 1)[1].startswith(stem)})):
        if len(candidates) == 1:
            return candidates[0]
        if len(candidates) > 1:
            shown = ", ".join(candidates[:5]) + (f" and {len(candidates) - 5} more" if len(candidates) > 5 else "")
            raise UsageError(f"{where}: --key {wanted!r} names {len(candidates)} records ({shown}); give more of the key")
    examples = ", ".join(keys[:3])
    raise UsageError(f"{where}: no record has the key, file name or key prefix {wanted!r} (keys look like "
                     f"{examples}; --key takes a key, a source file name or a unique prefix of either)")


def read_record(folder: Path, manifest: Manifest, key: str | None) -> tuple[Record, str]:
    """One record by key (default: the first), read with a single seek from the manifest offsets."""
    for entry in manifest.shards:
        if key is None or key in entry.keys:
            position = 0 if key is None else entry.keys.index(key)
            start, stop = entry.span(position)
            span = read_span(folder / entry.name, entry.name, start, stop, entry.bytes)
            member = next(iter_members(io.BytesIO(span), entry.name, start, stop))
            if member.key != entry.keys[position]:
                raise ShardFormatError(entry.name, entry.keys[position], f"member at byte {start} is "
                                                                         f"{member.key!r}, the manifest lists "
                                                                         f"{entry.keys[position]!r}")
            return decode_record(member.data, entry.name, member.key), entry.name
    raise ShardFormatError(str(folder), key, "no such key in the manifest; list keys with tar tf on a shard")


def inspect_shards(location: str | Path, key: str | None = None, png: Path | None = None) -> InspectSummary:
    path = manifest_path(location)
    manifest = load_manifest(path)
    if not manifest.shards:
        raise ManifestError(f"{path} lists no shards")
    record, shard = read_record(path.parent, manifest, None if key is None else resolve_key(manifest, key, str(path.parent)))
    arrays = [(n, a.dtype.str.lstrip("<|"), a.shape, a.nbytes) for n, a in record.arrays.items()]
    if png is not None:
        from wds_ocr.report.draw import record_panel, write_png

        full = record.expand()
        panel = record_panel(
            full["image"], record.polygons(), record.arrays["left_out"], full["gt"], full["mask"],
            full["thresh_map"], manifest.thresh_range,
        )
        write_png(png, panel)
    return InspectSummary(manifest, record, shard, png, arrays)
