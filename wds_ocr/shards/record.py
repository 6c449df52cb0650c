"""The record schema: format and version, the arrays a record holds (``ARRAY_SPECS``), its
validated metadata (``RecordMeta``) and the decoded ``Record``. Encoding and decoding: ``codec``;
the checks every decoded record passes: ``record_checks``."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from wds_ocr.shards import compact

RECORD_FORMAT = "wds-ocr/record"
RECORD_VERSION = 3  # 3: compact arrays (see compact); 2: full arrays, refused
ALIGN = 64
MAX_SIDE = 1 << 24  # of a source image (source.max_pixels is at most 2^32)
MAX_PIXELS = 1 << 32
MAX_RECORD_SIDE = 8192
MAX_TEXT = 1 << 16
SHA256_HEX = re.compile(r"[0-9a-f]{64}")
F16_ONE = 0x3C00  # float16 1.0: non-negative float16 bit patterns order like their values

# name -> (dtype, rank). The only arrays a record may hold, all required, in blob order.
ARRAY_SPECS: dict[str, tuple[str, int]] = {
    "image": ("|u1", 3),  # (h, w, 3): the resized image, without its zero padding
    "map_window": ("<i4", 1),  # (4,) x, y, width, height of the window the maps are stored over
    "map_bits": ("|u1", 3),  # (4, height, ceil(width / 8)): gt, mask, thresh_mask, thresh band (compact.PLANES)
    "thresh_fill": ("<f2", 1),  # (1,) thresh_map outside the band
    "thresh_values": ("<f2", 1),  # (B,) thresh_map at the band pixels, row-major
    "inverse_matrix": ("<f8", 2),
    "polygons_original": ("<f8", 2),
    "polygons": ("<f8", 2),
    "polygon_sizes": ("<i4", 1),
    "dont_care": ("|u1", 1),
    "left_out": ("|u1", 1),  # LeftOut code per polygon (wds_ocr.data.targets): 0 = in the targets
}

# Each array's numpy dtype.
DTYPES = {name: np.dtype(dtype) for name, (dtype, _) in ARRAY_SPECS.items()}

# The arrays that hold the image and the maps in compact form (``Record.expand`` restores them).
COMPACT_ARRAYS = ("image", "map_window", "map_bits", "thresh_fill", "thresh_values")

@dataclass(frozen=True)
class RecordMeta:
    """The header's ``meta`` map, validated (see the module docstring)."""

    key: str
    index: int  # listing position of the sample
    name: str  # file name in the source
    source_sha256: str
    orientation: int  # EXIF orientation found in the file, 1..8
    stored_size: tuple[int, int]  # (width, height) as stored in the file
    original_size: tuple[int, int]  # (width, height) of the displayed image
    side: int  # the record is side x side pixels (transform.size)
    resized_size: tuple[int, int]
    offset: tuple[int, int]
    scale: tuple[float, float]
    word_ids: tuple[str, ...]
    texts: tuple[str | None, ...]

    def as_dict(self) -> dict[str, Any]:
        body = asdict(self)
        return {name: list(value) if isinstance(value, tuple) else value for name, value in body.items()}


META_FIELDS = tuple(RecordMeta.__dataclass_fields__)


@dataclass(frozen=True)
class Record:
    """A decoded record: validated metadata and read-only numpy views into the record bytes
    (the stored, compact arrays; ``expand()`` gives the full ones)."""

    key: str
    meta: RecordMeta
    arrays: dict[str, np.ndarray]
    # byte offset of each array in the record's bytes (the loader places batches by them)
    offsets: dict[str, int] = field(default_factory=dict, repr=False, compare=False)
    _full: dict[str, np.ndarray] = field(default_factory=dict, repr=False, compare=False)

    def expand(self) -> dict[str, np.ndarray]:
        """The full arrays (image, gt, mask, thresh_map, thresh_mask) of side x side, as the live
        pipeline made them (computed once, then kept)."""
        if not self._full:
            self._full.update(compact.expand(self.arrays, self.meta.side, self.meta.offset))
        return self._full

    def polygons(self, name: str = "polygons", copy: bool = False) -> list[np.ndarray]:
        """Split the packed (V, 2) vertex array back into one (K, 2) array per polygon (views into
        the record, or into one copy of the vertices with ``copy``)."""
        sizes = self.arrays["polygon_sizes"]
        if not len(sizes):
            return []
        points = np.array(self.arrays[name]) if copy else self.arrays[name]
        ends = np.cumsum(sizes, dtype=np.int64).tolist()
        return [points[start:end] for start, end in zip([0, *ends[:-1]], ends)]
