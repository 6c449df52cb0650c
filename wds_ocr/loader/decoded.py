"""What a stream keeps of members it has decoded and validated, and how a record's arrays are
placed in a batch buffer.

``ShardStream.read_batch`` lands each member's bytes in the batch buffer; ``record_layout`` says
where its compact arrays lie there and ``sample_info`` copies out the metadata evaluation needs.
A member read again whose bytes pass the manifest's check takes both from the ``DecodeCache``.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from wds_ocr.loader.batch import PackedPolygons, SampleInfo, SampleLayout, word_texts
from wds_ocr.shards.record import Record
from wds_ocr.shards.record_checks import CompactPlace

__all__ = ["DecodeCache", "Known", "record_layout", "sample_info", "shifted_layout"]


def shifted_layout(layout: SampleLayout, start: int) -> SampleLayout:
    """A record-relative layout moved to the record starting at byte ``start`` of the buffer."""
    image, height, width, top, left, bits, wx, wy, ww, wh, values, count = layout
    return SampleLayout(image + start, height, width, top, left, bits + start, wx, wy, ww, wh, values + start, count)


@dataclass(frozen=True)
class Known:
    """A member decoded and validated before: its layout (from byte 0 of its record), where its
    compact maps lie, and its sample information (read-only arrays, shared by every later read)."""

    place: CompactPlace
    header: bytes  # the member's tar header block
    layout: SampleLayout
    info: SampleInfo

    def sample(self) -> SampleInfo:
        info = self.info  # a new SampleInfo each read (positional: dataclasses.replace costs more)
        return SampleInfo(info.key, info.name, info.original_size, info.inverse_matrix, info.polygons,
                          info.dont_care, info.left_out, info.texts)


class DecodeCache:
    """Decoded members of verified reads, per process, up to ``limit`` bytes (estimated).

    A member read again (next epoch) whose bytes pass the manifest's checksum (or sha256) are the
    bytes that were decoded and validated: the loader then takes the layout and sample information
    from here and only re-checks the compact maps' content (``codec.recheck_compact``). With
    verification off nothing is kept: unverified bytes are always decoded. A pickled stream (a
    DataLoader worker's copy) starts with an empty cache of its own."""

    def __init__(self, limit: int):
        self.limit = limit
        self.used = 0
        self._known: dict[tuple[int, int], Known] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._known)

    def __getstate__(self) -> dict[str, Any]:
        return {"limit": self.limit}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["limit"])

    def get(self, shard: int, position: int) -> Known | None:
        return self._known.get((shard, position))

    def put(self, shard: int, position: int, record: Record, length: int, header: bytes, layout: SampleLayout,
            info: SampleInfo) -> Known | None:
        """Keep a decoded member (its arrays become read-only); the entry, or None when full."""
        cost = 1024 + info.polygons.points.nbytes + 104 * len(info.polygons)
        with self._lock:
            if self.used + cost > self.limit or (shard, position) in self._known:
                return None
            for array in (info.inverse_matrix, info.dont_care, info.left_out, info.polygons.points,
                          info.polygons.sizes):
                array.setflags(write=False)
            known = self._known[(shard, position)] = Known(CompactPlace.of(record, length), header, layout, info)
            self.used += cost
            return known


def record_layout(record: Record, start: int) -> SampleLayout:
    """Where ``record``'s compact arrays lie in the batch buffer, the record starting at ``start``."""
    a, at = record.arrays, record.offsets
    height, width = a["image"].shape[:2]
    wx, wy, ww, wh = a["map_window"].tolist()
    left, top = record.meta.offset
    return SampleLayout(start + at["image"], height, width, top, left, start + at["map_bits"], wx, wy, ww, wh,
                        start + at["thresh_values"], a["thresh_values"].shape[0])


def sample_info(key: str, record: Record) -> SampleInfo:
    """The metadata evaluation needs, copied out of the batch buffer (which is recycled)."""
    meta = record.meta
    return SampleInfo(
        key=key,
        name=meta.name,
        original_size=meta.original_size,
        inverse_matrix=np.array(record.arrays["inverse_matrix"]),
        polygons=PackedPolygons(np.array(record.arrays["polygons_original"]),
                                record.arrays["polygon_sizes"].astype(np.int64)),
        dont_care=record.arrays["dont_care"].astype(bool),
        left_out=np.array(record.arrays["left_out"]),
        texts=word_texts(meta.texts),
    )
