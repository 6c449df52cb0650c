"""How maps and tasks pass from the main process to its post-processing workers.

- *Maps* go through a ring of preallocated buffers in one anonymous shared-memory file
  (``memfd_create``, or an unlinked temporary file where that is missing), inherited by each worker
  as a descriptor: ``groups`` slots of ``capacity`` maps each (``RingLayout``). The main process
  copies a batch's maps from the device straight into a free group (``MapRing``); a worker reads
  its map in place (a numpy view). Nothing is pickled; memory is bounded by the ring.
- *Everything else* is small msgpack frames (a 4-byte little-endian length, then the body) over
  each worker's stdin/stdout: per image the slot and the ground truth (arrays as raw little-endian
  bytes), back the counts and times.
"""

from __future__ import annotations

import mmap
import os
import struct
import tempfile
from dataclasses import dataclass
from typing import Any, BinaryIO

import msgpack
import numpy as np

from wds_ocr.errors import WdsOcrError
from wds_ocr.eval.cleval import CLEvalCounts
from wds_ocr.infer.scoring import ImageOutcome, ImageTruth, split_polygons, truth_arrays

# The largest frame either side accepts (a truth with thousands of polygons is well under 1 MiB).
MAX_FRAME = 64 << 20
_LENGTH = struct.Struct("<I")


class PostprocessWorkerError(WdsOcrError):
    """A post-processing worker that failed, died or stopped answering."""


def pack_frame(body: dict[str, Any]) -> bytes:
    payload = msgpack.packb(body, use_bin_type=True)
    return _LENGTH.pack(len(payload)) + payload


def _array_bytes(array: np.ndarray, dtype: str) -> bytes:
    return np.ascontiguousarray(array, dtype=np.dtype(dtype)).tobytes()


def truth_message(task: int, group: int, row: int, truth: ImageTruth) -> dict[str, Any]:
    points, sizes = truth_arrays(truth.polygons)
    return {"op": "task", "id": task, "group": group, "row": row, "name": truth.name,
            "size": [int(truth.original_size[0]), int(truth.original_size[1])],
            "inverse": _array_bytes(truth.inverse_matrix, "<f8"), "points": _array_bytes(points, "<f8"),
            "sizes": _array_bytes(sizes, "<i4"), "dont_care": _array_bytes(truth.dont_care, "u1"),
            "left_out": _array_bytes(truth.left_out, "u1"),
            "texts": None if truth.texts is None else list(truth.texts)}


def truth_from_message(message: dict[str, Any]) -> ImageTruth:
    points = np.frombuffer(message["points"], dtype="<f8").reshape(-1, 2)
    sizes = np.frombuffer(message["sizes"], dtype="<i4")
    if int(sizes.sum()) != len(points):
        raise ValueError(f"{message['name']}: polygon sizes add up to {int(sizes.sum())}, {len(points)} points came")
    texts = message["texts"]
    return ImageTruth(message["name"], (int(message["size"][0]), int(message["size"][1])),
                      np.frombuffer(message["inverse"], dtype="<f8").reshape(3, 3),
                      split_polygons(points, sizes), np.frombuffer(message["dont_care"], dtype="u1").astype(bool),
                      np.frombuffer(message["left_out"], dtype="u1"), None if texts is None else tuple(texts))


def outcome_message(task: int, outcome: ImageOutcome) -> dict[str, Any]:
    return {"op": "done", "id": task, "counts": [outcome.detections, outcome.matched, outcome.gt_care,
                                                  outcome.det_care],
            "cleval": None if outcome.cleval is None else outcome.cleval.as_list(),
            "times": [outcome.postprocess_s, outcome.matching_s],
            "alternatives": [list(counts) for counts in outcome.alternatives]}


def outcome_from_message(message: dict[str, Any]) -> ImageOutcome:
    detections, matched, gt_care, det_care = (int(v) for v in message["counts"])
    cleval = None if message["cleval"] is None else CLEvalCounts.from_list(message["cleval"])
    postprocess_s, matching_s = (float(v) for v in message["times"])
    alternatives = tuple((int(a), int(b), int(c)) for a, b, c in message.get("alternatives", ()))
    return ImageOutcome(detections, matched, gt_care, det_care, cleval, postprocess_s, matching_s, alternatives)


class FrameBuffer:
    """Bytes read so far from one pipe, cut into complete frames."""

    def __init__(self, what: str):
        self.what = what
        self.data = bytearray()

    def frames(self) -> list[dict[str, Any]]:
        out = []
        while len(self.data) >= _LENGTH.size:
            (length,) = _LENGTH.unpack_from(self.data)
            if length > MAX_FRAME:
                raise PostprocessWorkerError(f"{self.what} sent a frame of {length} bytes (at most {MAX_FRAME})")
            if len(self.data) < _LENGTH.size + length:
                break
            payload = bytes(self.data[_LENGTH.size : _LENGTH.size + length])
            del self.data[: _LENGTH.size + length]
            out.append(msgpack.unpackb(payload, raw=False))
        return out


@dataclass(frozen=True)
class RingLayout:
    groups: int  # batches in flight at most
    capacity: int  # maps per group (the batch size)
    map_size: int  # S: maps are S x S
    itemsize: int

    @property
    def map_bytes(self) -> int:
        return self.map_size * self.map_size * self.itemsize

    @property
    def nbytes(self) -> int:
        return self.groups * self.capacity * self.map_bytes

    def offset(self, group: int, row: int) -> int:
        return (group * self.capacity + row) * self.map_bytes


def anonymous_file() -> int:
    """A descriptor of an unnamed file (memfd where the OS has it) that children can inherit."""
    if hasattr(os, "memfd_create"):
        return os.memfd_create("wds-ocr-maps")
    handle = tempfile.TemporaryFile()
    descriptor = os.dup(handle.fileno())
    handle.close()
    return descriptor


class MapRing:
    """The parent's side of the ring: one writable mapping of ``fd``, a numpy view per group."""

    def __init__(self, fd: int, layout: RingLayout, dtype: np.dtype):
        self.layout = layout
        self.dtype = np.dtype(dtype)
        os.ftruncate(fd, max(1, layout.nbytes))
        self._map = mmap.mmap(fd, max(1, layout.nbytes))
        self.maps = np.frombuffer(self._map, dtype=self.dtype, count=layout.groups * layout.capacity
                                  * layout.map_size ** 2).reshape(layout.groups, layout.capacity, layout.map_size,
                                                                   layout.map_size)

    def group(self, group: int, count: int) -> np.ndarray:
        """The first ``count`` map buffers of ``group``: (count, S, S), writable, contiguous."""
        return self.maps[group, :count]

    def close(self) -> None:
        self.maps = None  # drop the view before the mapping closes
        try:
            self._map.close()
        except BufferError:  # a caller still holds a view: the mapping goes when it does
            pass


def read_exact(stream: BinaryIO, count: int) -> bytes | None:
    data = bytearray()
    while len(data) < count:
        chunk = stream.read(count - len(data))
        if not chunk:
            return None
        data += chunk
    return bytes(data)


def read_frame(stream: BinaryIO) -> dict[str, Any] | None:
    head = read_exact(stream, _LENGTH.size)
    if head is None:
        return None
    (length,) = _LENGTH.unpack(head)
    if length > MAX_FRAME:
        raise ValueError(f"frame of {length} bytes (at most {MAX_FRAME})")
    payload = read_exact(stream, length)
    if payload is None:
        return None
    return msgpack.unpackb(payload, raw=False)
