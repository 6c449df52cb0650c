"""verify --against-source: a record re-made by the live pipeline must equal the stored one bit for
bit, as stored (the compact record's bytes) and expanded (``Record.expand`` against the live
pipeline's full arrays); a difference is described field by field."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from wds_ocr.config import Config
from wds_ocr.data.pipeline import process_sample
from wds_ocr.data.sources import SourceListing
from wds_ocr.errors import SampleError
from wds_ocr.shards.codec import decode_record, encode_record, full_arrays
from wds_ocr.shards.naming import record_key
from wds_ocr.shards.record import ARRAY_SPECS, COMPACT_ARRAYS, Record

if TYPE_CHECKING:
    from wds_ocr.shards.verify import VerifyReport


def describe_difference(shard: Record, live: Record) -> str:
    """Which fields of a shard record differ from the live pipeline's record: the full image and
    maps (as expanded), then the other arrays and the metadata."""
    diffs = []
    if shard.meta.side != live.meta.side:
        return f"meta.side {shard.meta.side} vs live {live.meta.side}"
    for name, expanded in shard.expand().items():
        other = live.expand()[name]
        if expanded.tobytes() != other.tobytes():
            diffs.append(f"{name} differs at {int(np.count_nonzero(expanded != other))} elements")
    for name in ARRAY_SPECS:
        if name in COMPACT_ARRAYS:
            continue
        x, y = shard.arrays[name], live.arrays[name]
        if x.shape != y.shape:
            diffs.append(f"{name} shape {list(x.shape)} vs live {list(y.shape)}")
        elif x.tobytes() != y.tobytes():
            diffs.append(f"{name} differs at {int(np.count_nonzero(x != y))} elements")
    for name in shard.meta.__dataclass_fields__:
        if getattr(shard.meta, name) != getattr(live.meta, name):
            diffs.append(f"meta.{name} {getattr(shard.meta, name)!r} vs live {getattr(live.meta, name)!r}")
    return "; ".join(diffs) or "record bytes differ (header encoding)"


class SourceCheck:
    """Re-runs the live pipeline for selected records and compares bytes."""

    def __init__(self, listing: SourceListing, config: Config, wanted: set[str] | None):
        self.listing = listing
        self.config = config
        self.wanted = wanted
        self.by_key = {record_key(s.index, s.name): s for s in listing.samples}
        self.seen: set[str] = set()

    def compare(self, shard: str, key: str, data: bytes, report: "VerifyReport") -> None:
        self.seen.add(key)
        if self.wanted is not None and key not in self.wanted:
            return
        sample = self.by_key.get(key)
        if sample is None:
            report.add(shard, key, "record has no sample in the source listing (built from another source?)")
            return
        try:
            processed = process_sample(sample, self.config)
        except SampleError as exc:
            report.add(shard, key, f"live pipeline rejects this sample now: {exc.reason}")
            return
        live = encode_record(processed, key, self.config.targets.thresh_min)
        report.compared_with_source += 1
        if live != data:
            what = describe_difference(decode_record(data, shard, key), decode_record(live, "<live>", key))
            report.add(shard, key, f"differs from the live pipeline: {what}")
            return
        # Equal bytes; and what they expand to is the live pipeline's full arrays (lossless layout).
        expanded = decode_record(data, shard, key).expand()
        for name, array in full_arrays(processed).items():
            if expanded[name].dtype != array.dtype or expanded[name].tobytes() != array.tobytes():
                report.add(shard, key, f"{name} expanded from the record differs from the live pipeline's")


__all__ = ["SourceCheck", "describe_difference"]
