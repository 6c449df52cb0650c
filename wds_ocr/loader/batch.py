"""What the loader delivers: a ``Batch`` of compact records in one buffer, and the torch code that
expands it into the full image and maps — on the device (``loader.device.to_device``), or on the
CPU when a caller asks the host batch for them.

A batch's records are read straight into one buffer, member after member (tar header, record,
padding), so ``payload`` holds their bytes exactly as stored; ``layouts`` says where each record's
compact arrays lie in it (``SampleLayout``: byte offsets from the validated record header). Moving
a batch to the device is one copy of ``payload`` — a quarter of the full arrays' bytes — then
per record: place the image (h, w, 3) in a zero (S, S, 3) frame, unpack the four bit planes of
its map window (shift, and) and place them in frames holding the planes' defaults; per batch:
scatter the threshold values where the band plane is set (``masked_scatter_``, row-major, so
the records' values concatenated in order land where they belong). Every step is an exact
integer or copy operation: the result equals the live pipeline's arrays bit for bit (tests).

``Batch.images``, ``.gt``, ``.mask``, ``.thresh_map``, ``.thresh_mask`` and ``.tensors()`` give the
full host tensors, expanded on the CPU on first use (evaluation, tests, code written for the
full-array batches); a ``Batch`` can also be made from full tensors directly (a stand-in batch).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch

from wds_ocr.loader.policy import Skipped
from wds_ocr.loader.ring import Lease
from wds_ocr.shards.compact import PLANE_DEFAULTS, PLANES
from wds_ocr.shards.naming import MAP_NAMES

# Batch field -> (dtype, rank): the image, then the maps in MAP_NAMES order.
FIELDS: dict[str, tuple[torch.dtype, int]] = {
    "images": (torch.uint8, 3), **{name: (torch.float16 if name == "thresh_map" else torch.uint8, 2)
                                   for name in MAP_NAMES}}


@dataclass
class SampleInfo:
    """Per-sample metadata evaluation needs (original-frame polygons, inverse matrix, ...)."""

    key: str
    name: str
    original_size: tuple[int, int]
    inverse_matrix: np.ndarray
    polygons: Sequence[np.ndarray]  # original-image frame: a list, or PackedPolygons from a worker
    dont_care: np.ndarray  # (P,) bool, from the annotations
    left_out: np.ndarray  # (P,) uint8 LeftOut codes: why a polygon is not in the training targets (0: it is)
    texts: tuple[str, ...] = ()  # (P,) transcriptions as CLEval counts them ("" where a word has none)

    def __reduce__(self) -> tuple[Any, tuple]:
        # To another process (DataLoader workers): the polygons as one vertex array and their
        # sizes, not one pickled array each (a receipt has ~60: pickling them one by one cost
        # 0.3 ms a sample, more than reading it).
        points, sizes = _polygon_arrays(self.polygons)
        return _unpickle_sample_info, (self.key, self.name, self.original_size, self.inverse_matrix, points, sizes,
                                       self.dont_care, self.left_out, self.texts)


def _unpickle_sample_info(key: str, name: str, original_size: tuple[int, int], inverse_matrix: np.ndarray,
                          points: np.ndarray, sizes: np.ndarray, dont_care: np.ndarray,
                          left_out: np.ndarray, texts: tuple[str, ...]) -> SampleInfo:
    return SampleInfo(key, name, original_size, inverse_matrix, PackedPolygons(points, sizes), dont_care, left_out,
                      texts)


def word_texts(texts: Sequence[str | None]) -> tuple[str, ...]:
    """Transcriptions as CLEval counts them: a word without one has no characters."""
    return tuple("" if text is None else str(text) for text in texts)


def info_from_meta(meta: Any, key: str | None = None) -> SampleInfo:
    """The SampleInfo of a live-pipeline sample (a ``SampleMeta``): what its record would give."""
    return SampleInfo(key if key is not None else meta.name, meta.name,
                      (int(meta.original_size[0]), int(meta.original_size[1])),
                      np.asarray(meta.inverse_matrix, dtype=np.float64), tuple(meta.polygons_original),
                      np.asarray(meta.dont_care, dtype=bool), np.asarray(meta.left_out, dtype=np.uint8),
                      word_texts(meta.texts))


def _polygon_arrays(polygons: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(V, 2) float64 vertices and (K,) int64 sizes of a sample's polygons."""
    if isinstance(polygons, PackedPolygons):
        return polygons.points, polygons.sizes
    sizes = np.array([len(p) for p in polygons], dtype=np.int64)
    points = np.concatenate(polygons) if len(polygons) else np.zeros((0, 2), dtype=np.float64)
    return points, sizes


def pack_info(info: Sequence[SampleInfo]) -> tuple:
    """A batch's sample information as a few arrays for the way to another process: its
    SampleInfos one by one made some 40 numpy arrays per batch of 8 to pickle (0.6 ms in the
    worker, 0.16 ms to unpickle in the main process), more than reading the batch's bytes."""
    polygons = [_polygon_arrays(i.polygons) for i in info]
    counts = np.array([len(sizes) for _, sizes in polygons], dtype=np.int64)
    inverse = np.stack([i.inverse_matrix for i in info]) if info else np.zeros((0, 3, 3), dtype=np.float64)

    def joined(arrays: list[np.ndarray], empty: np.ndarray) -> np.ndarray:
        return np.concatenate(arrays) if arrays else empty

    return ([i.key for i in info], [i.name for i in info], [i.original_size for i in info], inverse, counts,
            joined([p for p, _ in polygons], np.zeros((0, 2), dtype=np.float64)),
            joined([s for _, s in polygons], np.zeros(0, dtype=np.int64)),
            joined([i.dont_care for i in info], np.zeros(0, dtype=bool)),
            joined([i.left_out for i in info], np.zeros(0, dtype=np.uint8)),
            [i.texts for i in info])


def unpack_info(packed: tuple) -> list[SampleInfo]:
    """The SampleInfos ``pack_info`` packed: views into its arrays, polygons as PackedPolygons."""
    keys, names, sizes_hw, inverse, counts, points, sizes, dont_care, left_out, texts = packed
    ends = np.cumsum(counts).tolist()
    starts = [0, *ends[:-1]]
    vertex_ends = np.cumsum(sizes).tolist()
    out = []
    for index, (start, end) in enumerate(zip(starts, ends)):
        first = vertex_ends[start - 1] if start else 0
        last = vertex_ends[end - 1] if end else 0
        out.append(SampleInfo(keys[index], names[index], sizes_hw[index], inverse[index],
                              PackedPolygons(points[first:last], sizes[start:end]), dont_care[start:end],
                              left_out[start:end], texts[index]))
    return out


class PackedPolygons(Sequence):
    """A sample's polygons as one (V, 2) vertex array and their sizes, split into (K, 2) views
    only when first looked at (training never looks: only evaluation matches polygons)."""

    __slots__ = ("points", "sizes", "_split")

    def __init__(self, points: np.ndarray, sizes: np.ndarray):
        self.points, self.sizes = points, sizes
        self._split: list[np.ndarray] | None = None

    def _polygons(self) -> list[np.ndarray]:
        if self._split is None:
            ends = np.cumsum(self.sizes).tolist()
            self._split = [self.points[start:end] for start, end in zip([0, *ends[:-1]], ends)]
        return self._split

    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, index):
        return self._polygons()[index]

    def __iter__(self):
        return iter(self._polygons())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and len(self) == len(other) and all(
            np.array_equal(a, b) for a, b in zip(self, other))

    def __repr__(self) -> str:
        return f"PackedPolygons({len(self)} polygons, {len(self.points)} vertices)"

    def __reduce__(self):
        return PackedPolygons, (self.points, self.sizes)


class SampleLayout(NamedTuple):
    """Where one record's compact arrays lie in its batch's payload (byte offsets) and where
    they go in the side x side record."""

    image: int  # the (height, width, 3) uint8 image
    height: int
    width: int
    top: int  # the image's place in the record (meta.offset)
    left: int
    bits: int  # map_bits: (4, window_height, ceil(window_width / 8)) uint8
    window_x: int
    window_y: int
    window_width: int
    window_height: int
    values: int  # thresh_values: (count,) float16
    count: int

    @property
    def image_bytes(self) -> int:
        return self.height * self.width * 3

    @property
    def row_bytes(self) -> int:
        return (self.window_width + 7) // 8


@dataclass
class Packed:
    """A batch's records as read: one uint8 payload, and the layout of each record in it."""

    payload: torch.Tensor  # (bytes,) uint8 (None only in transit from a worker's board slot)
    layouts: tuple[SampleLayout, ...]
    size: int  # records are size x size
    fill: float  # thresh_map outside the band (a float16 value)
    nbytes: int = 0  # the payload's length, where it travels without it


class Batch:
    """A batch of records: compact (``packed``, what the loader reads) or full tensors.

    Full fields (N = ``len(batch)``, S = the record side): ``images`` (N, S, S, 3) uint8 RGB,
    ``gt``, ``mask``, ``thresh_mask`` (N, S, S) uint8 0/1, ``thresh_map`` (N, S, S) float16. Plus
    ``info`` (one ``SampleInfo`` per record), ``index`` (batch number within this rank's epoch)
    and ``skipped`` (shard, key, reason of each record skipped).
    """

    def __init__(self, images: torch.Tensor | None = None, gt: torch.Tensor | None = None,
                 mask: torch.Tensor | None = None, thresh_map: torch.Tensor | None = None,
                 thresh_mask: torch.Tensor | None = None, info: list[SampleInfo] | None = None, index: int = 0,
                 skipped: list[Skipped] | None = None, packed: Packed | None = None, lease: Lease | None = None):
        given = {"images": images, "gt": gt, "mask": mask, "thresh_map": thresh_map, "thresh_mask": thresh_mask}
        if packed is None and any(t is None for t in given.values()):
            raise ValueError("a Batch needs either its packed records or all five full tensors")
        self.packed = packed
        self.lease = lease  # the buffer ``packed.payload`` lies in (None: not from a ring)
        self.info = info if info is not None else []
        self.index = index
        self.skipped = skipped if skipped is not None else []
        self._full: dict[str, torch.Tensor] = {k: v for k, v in given.items() if v is not None}

    def __len__(self) -> int:
        return len(self.packed.layouts) if self.packed is not None else int(self._full["images"].shape[0])

    def __repr__(self) -> str:
        kind = f"packed, {self.packed.payload.numel():,} bytes" if self.packed is not None else "full"
        return f"Batch(index={self.index}, {len(self)} records, {kind})"

    @property
    def keys(self) -> list[str]:
        return [i.key for i in self.info]

    @property
    def images(self) -> torch.Tensor:
        if "images" not in self._full:
            self._full["images"] = expand_images(self.packed.payload, self.packed.layouts, self.packed.size)
        return self._full["images"]

    @property
    def gt(self) -> torch.Tensor:
        return self._map("gt")

    @property
    def mask(self) -> torch.Tensor:
        return self._map("mask")

    @property
    def thresh_map(self) -> torch.Tensor:
        return self._map("thresh_map")

    @property
    def thresh_mask(self) -> torch.Tensor:
        return self._map("thresh_mask")

    def _map(self, name: str) -> torch.Tensor:
        if name not in self._full:
            self._full.update(expand_maps(self.packed.payload, self.packed.layouts, self.packed.size,
                                          self.packed.fill))
        return self._full[name]

    def tensors(self) -> dict[str, torch.Tensor]:
        """The five full host tensors (expanded on the CPU from the packed records on first use)."""
        self.images
        for name in MAP_NAMES:
            self._map(name)
        return {name: self._full[name] for name in FIELDS}

    def pin_memory(self) -> "Batch":
        """Called by DataLoader(pin_memory=True) in the main process."""
        if self.packed is not None:
            payload = self.packed.payload
            pinned = Packed(payload if payload.is_pinned() else payload.pin_memory(), self.packed.layouts,
                            self.packed.size, self.packed.fill)
            return Batch(info=self.info, index=self.index, skipped=self.skipped, packed=pinned)
        full = {name: t if t.is_pinned() else t.pin_memory() for name, t in self.tensors().items()}
        return Batch(**full, info=self.info, index=self.index, skipped=self.skipped)

    def __getstate__(self) -> dict[str, Any]:
        # To the main process: the packed payload or the full tensors, never CPU expansions made
        # in a worker. A payload in a board slot (``ring.ReleaseBoard``) crosses as its (worker,
        # slot) origin and length only: the main process maps that slot already. Any other
        # payload goes as a shared tensor.
        full = self._full if self.packed is None else {}
        origin = self.lease.origin if self.lease is not None else None
        packed = self.packed
        if packed is not None and origin is not None:
            packed = Packed(None, packed.layouts, packed.size, packed.fill, packed.payload.numel())
        return {"packed": packed, "info": pack_info(self.info), "index": self.index, "skipped": self.skipped,
                "full": full, "origin": origin}

    def __setstate__(self, state: dict[str, Any]) -> None:
        # A slot payload stays None until the receiving loader puts it in (``ProcessLoader``).
        self.packed, self.info, self.index = state["packed"], unpack_info(state["info"]), state["index"]
        self.skipped, self._full = state["skipped"], dict(state["full"])
        self.lease = Lease(self.packed.payload, origin=state["origin"]) if state["origin"] is not None else None


# ----------------------------------------------------------------------------- expansion

_SHIFTS: dict[torch.device, torch.Tensor] = {}


def _shifts(device: torch.device) -> torch.Tensor:
    shifts = _SHIFTS.get(device)
    if shifts is None:
        shifts = _SHIFTS[device] = torch.arange(8, dtype=torch.uint8, device=device)
    return shifts


def expand_images(payload: torch.Tensor, layouts: tuple[SampleLayout, ...], size: int) -> torch.Tensor:
    """(N, size, size, 3) uint8 on ``payload``'s device: each record's image placed at its offset
    in a zero frame (the padding the record leaves out)."""
    images = torch.zeros((len(layouts), size, size, 3), dtype=torch.uint8, device=payload.device)
    for row, at in enumerate(layouts):
        if at.image_bytes:
            content = payload[at.image : at.image + at.image_bytes].view(at.height, at.width, 3)
            images[row, at.top : at.top + at.height, at.left : at.left + at.width] = content
    return images


def expand_maps(payload: torch.Tensor, layouts: tuple[SampleLayout, ...], size: int,
                fill: float) -> dict[str, torch.Tensor]:
    """gt, mask, thresh_mask ((N, size, size) uint8 0/1) and thresh_map ((N, size, size) float16)
    on ``payload``'s device, from each record's bit planes and threshold values."""
    device = payload.device
    n = len(layouts)
    planes = torch.empty((len(PLANES), n, size, size), dtype=torch.uint8, device=device)
    for plane, default in zip(planes, PLANE_DEFAULTS):
        plane.fill_(default)
    shifts = _shifts(device)
    pieces = []
    for row, at in enumerate(layouts):
        if at.window_width and at.window_height:
            packed = payload[at.bits : at.bits + len(PLANES) * at.window_height * at.row_bytes]
            packed = packed.view(len(PLANES), at.window_height, at.row_bytes, 1)
            bits = (packed >> shifts).bitwise_and_(1).view(len(PLANES), at.window_height, at.row_bytes * 8)
            planes[:, row, at.window_y : at.window_y + at.window_height,
                   at.window_x : at.window_x + at.window_width] = bits[:, :, : at.window_width]
        if at.count:
            piece = payload[at.values : at.values + 2 * at.count]
            pieces.append(piece if at.values % 2 == 0 else piece.clone())
    thresh = torch.full((n, size, size), fill, dtype=torch.float16, device=device)
    if pieces:
        values = (torch.cat(pieces) if len(pieces) > 1 else pieces[0]).view(torch.float16)
        thresh.masked_scatter_(planes[3].bool(), values)
    return {"gt": planes[0], "mask": planes[1], "thresh_map": thresh, "thresh_mask": planes[2]}


__all__ = ["Batch", "FIELDS", "Packed", "PackedPolygons", "SampleInfo", "SampleLayout", "expand_images", "expand_maps"]
