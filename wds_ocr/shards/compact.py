"""The compact record layout (record version 3): what a record stores instead of the full arrays,
how the live pipeline's arrays become it (``pack``) and how it becomes them again (``expand``),
bit for bit.

The live pipeline gives, for a record of side S: ``image`` (S, S, 3) uint8, the resized receipt at
``offset`` and zeros elsewhere (the padding); ``gt``, ``mask``, ``thresh_mask`` (S, S) uint8, 0/1;
``thresh_map`` (S, S) float16, equal to ``fill`` (the float16 of ``targets.thresh_min``) everywhere
except bands around kept text. At S = 640 that is 3.29 MB, most of it bytes a reader can tell in
advance. A record stores instead:

========================  ===========================  =============================================
array                     dtype, shape                 holds
========================  ===========================  =============================================
``image``                 uint8 (h, w, 3)              the resized receipt only (``resized_size``);
                                                       the padding is zero by construction
``map_window``            int32 (4,)                   x, y, width, height: the smallest box holding
                                                       every pixel where a map differs from its
                                                       default; (0, 0, 0, 0) when none does
``map_bits``              uint8 (4, height, ceil(w/8)) the window of ``gt``, ``mask``,
                                                       ``thresh_mask`` and ``band`` (thresh_map !=
                                                       fill), 8 pixels a byte, little-endian bit
                                                       order (pixel x of a row is bit x % 8 of byte
                                                       x // 8), unused bits of a row's last byte 0
``thresh_fill``           float16 (1,)                 thresh_map outside the band
``thresh_values``         float16 (B,)                 thresh_map at the band pixels, row-major;
                                                       B is the number of band bits set
========================  ===========================  =============================================

Outside the window the maps hold their defaults: gt 0, mask 1, thresh_mask 0, band 0. Expansion is
a handful of elementwise operations (unpack bits, place a window and an image, scatter values
where the band is set) that the loader runs on the device (``wds_ocr.loader.batch``); ``expand``
here is the numpy form that verify, inspect and the tests use. ``pack`` refuses (ValueError)
anything it could not restore exactly: padding that is not zero, a 0/1 map holding another value.
"""

from __future__ import annotations

import numpy as np

# The bit planes of map_bits, in order, and the value each holds outside the window.
PLANES = ("gt", "mask", "thresh_mask", "band")
PLANE_DEFAULTS = (0, 1, 0, 0)
BINARY_MAPS = PLANES[:3]
FULL_NAMES = ("image", "gt", "mask", "thresh_map", "thresh_mask")

_F16 = np.dtype("<f2")


def fill_value(thresh_min: float) -> np.ndarray:
    """(1,) float16: thresh_map away from text, exactly as ``data.targets`` computes it."""
    return np.array([np.float32(thresh_min)], dtype=np.float32).astype(_F16)


def pack(image: np.ndarray, maps: dict[str, np.ndarray], offset: tuple[int, int], resized_size: tuple[int, int],
         fill: np.ndarray) -> dict[str, np.ndarray]:
    """The compact arrays of a record (see the module docstring). Raises ValueError when the arrays
    cannot be restored bit for bit from them."""
    side = image.shape[0]
    if image.shape != (side, side, 3) or image.dtype != np.uint8:
        raise ValueError(f"image must be (S, S, 3) uint8, got {image.shape} {image.dtype}")
    (x, y), (width, height) = offset, resized_size
    content = image[y : y + height, x : x + width]
    if content.shape != (height, width, 3):
        raise ValueError(f"resized size {resized_size} at offset {offset} does not fit the {side}x{side} image")
    if _outside_is_nonzero(image, x, y, width, height):
        raise ValueError("the image padding is not zero: it cannot be implied")
    planes = []
    for name in BINARY_MAPS:
        plane = np.asarray(maps[name])
        if plane.shape != (side, side) or plane.dtype != np.uint8 or (plane.size and int(plane.max()) > 1):
            raise ValueError(f"{name} must be ({side}, {side}) uint8 holding only 0 and 1")
        planes.append(plane)
    thresh = np.asarray(maps["thresh_map"])
    if thresh.shape != (side, side) or thresh.dtype != _F16:
        raise ValueError(f"thresh_map must be ({side}, {side}) float16")
    fill = np.asarray(fill, dtype=_F16).reshape(1)
    band = (thresh.view("<u2") != fill.view("<u2")[0]).view(np.uint8)
    planes.append(band)
    differs = np.zeros((side, side), dtype=bool)
    for plane, default in zip(planes, PLANE_DEFAULTS):
        differs |= plane != default
    window = _bounding_box(differs)
    wx, wy, ww, wh = window
    stacked = np.stack([plane[wy : wy + wh, wx : wx + ww] for plane in planes])
    bits = np.packbits(stacked, axis=-1, bitorder="little") if ww else np.zeros((4, wh, 0), dtype=np.uint8)
    return {
        "image": np.ascontiguousarray(content),
        "map_window": np.array(window, dtype="<i4"),
        "map_bits": bits,
        "thresh_fill": fill,
        "thresh_values": np.ascontiguousarray(thresh[band.view(bool)]),
    }


def expand(stored: dict[str, np.ndarray], side: int, offset: tuple[int, int]) -> dict[str, np.ndarray]:
    """The full arrays (``FULL_NAMES``) of a record of side ``side`` from its compact arrays."""
    content = stored["image"]
    height, width = content.shape[:2]
    x, y = offset
    image = np.zeros((side, side, 3), dtype=np.uint8)
    image[y : y + height, x : x + width] = content
    planes = np.empty((4, side, side), dtype=np.uint8)
    for plane, default in zip(planes, PLANE_DEFAULTS):
        plane.fill(default)
    wx, wy, ww, wh = (int(v) for v in stored["map_window"])
    if ww and wh:
        bits = np.unpackbits(stored["map_bits"], axis=-1, bitorder="little")[:, :, :ww]
        planes[:, wy : wy + wh, wx : wx + ww] = bits
    thresh = np.full((side, side), stored["thresh_fill"][0], dtype=_F16)
    thresh[planes[3].view(bool)] = stored["thresh_values"]
    return {"image": image, "gt": planes[0], "mask": planes[1], "thresh_map": thresh, "thresh_mask": planes[2]}


def full_bytes(side: int) -> int:
    """Bytes of the full arrays of a record of side ``side`` (image, three 0/1 maps, float16 thresh_map)."""
    return side * side * (3 + 1 + 1 + 2 + 1)


def _outside_is_nonzero(image: np.ndarray, x: int, y: int, width: int, height: int) -> bool:
    return bool(image[:y].any() or image[y + height :].any() or image[y : y + height, :x].any()
                or image[y : y + height, x + width :].any())


def _bounding_box(differs: np.ndarray) -> tuple[int, int, int, int]:
    rows = np.flatnonzero(differs.any(axis=1))
    if not len(rows):
        return 0, 0, 0, 0
    cols = np.flatnonzero(differs[rows[0] : rows[-1] + 1].any(axis=0))
    return int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)
