"""The checks every decoded record passes before any reader sees it (see ``codec``): metadata
types and ranges, the key, the inverse matrix, polygons, the compact image and maps."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from wds_ocr.data.coverage import LeftOut
from wds_ocr.errors import ShardFormatError
from wds_ocr.shards import compact
from wds_ocr.shards.naming import MAX_INDEX, record_key
from wds_ocr.shards.record import (DTYPES, F16_ONE, MAX_TEXT, META_FIELDS, SHA256_HEX, MAX_PIXELS,
                                   MAX_RECORD_SIDE, MAX_SIDE, Record, RecordMeta)


def fail(shard: str, key: str | None, reason: str) -> ShardFormatError:
    return ShardFormatError(shard, key, reason)


class Invalid(Exception):
    """One reason a decoded record is unusable (turned into a ShardFormatError with its place)."""


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _pair(meta: dict[str, Any], name: str, low: int, high: int) -> tuple[int, int]:
    value = meta[name]
    if not isinstance(value, list) or len(value) != 2 or not all(type(v) is int and low <= v <= high for v in value):
        raise Invalid(f"meta.{name} must be [x, y], two integers from {low} to {high}, got {_shown(value)}")
    return value[0], value[1]


def _text(value: Any, what: str, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, str) or len(value) > MAX_TEXT:
        raise Invalid(f"{what} must be a string of at most {MAX_TEXT} characters, got {_shown(value)}")


_TEXT_KINDS = frozenset({str})
_DONT_CARE = int(LeftOut.DONT_CARE)
_TEXT_OR_NONE_KINDS = frozenset({str, type(None)})


def _texts(values: list, what: str, allow_none: bool) -> None:
    """Every value is a string of at most MAX_TEXT characters (or None); checked in C-level
    passes, then element by element only to name the first bad one."""
    kinds = set(map(type, values))
    if kinds <= (_TEXT_OR_NONE_KINDS if allow_none else _TEXT_KINDS) and \
            max(map(len, filter(None, values)), default=0) <= MAX_TEXT:
        return
    for value in values:
        _text(value, what, allow_none)


def _validate_meta(meta: dict[str, Any]) -> RecordMeta:
    missing = [f for f in META_FIELDS if f not in meta]
    unknown = sorted(set(meta) - set(META_FIELDS))
    if missing or unknown:
        raise Invalid(f"meta fields: missing {missing}, unknown {unknown}")
    side = meta["side"]
    if type(side) is not int or not 1 <= side <= MAX_RECORD_SIDE:
        raise Invalid(f"meta.side {_shown(side)} is not a record side from 1 to {MAX_RECORD_SIDE}")
    index = meta["index"]
    if type(index) is not int or not 0 <= index < MAX_INDEX:
        raise Invalid(f"meta.index must be a listing position, got {_shown(index)}")
    name = meta["name"]
    _text(name, "meta.name")
    if not name or "/" in name or "\\" in name or "\x00" in name or name in (".", ".."):
        raise Invalid(f"meta.name {_shown(name)} is not a plain file name")
    if record_key(index, name) != meta["key"]:
        raise Invalid(f"key {meta['key']!r} is not the key of index {index} and name {_shown(name)}")
    if not isinstance(meta["source_sha256"], str) or not SHA256_HEX.fullmatch(meta["source_sha256"]):
        raise Invalid("meta.source_sha256 must be 64 lowercase hex digits")
    orientation = meta["orientation"]
    if type(orientation) is not int or not 1 <= orientation <= 8:
        raise Invalid(f"meta.orientation {_shown(orientation)} is not 1..8")
    stored = _pair(meta, "stored_size", 1, MAX_SIDE)
    original = _pair(meta, "original_size", 1, MAX_SIDE)
    if original[0] * original[1] > MAX_PIXELS:
        raise Invalid(f"meta.original_size {list(original)} holds more than {MAX_PIXELS} pixels")
    if original != (stored if orientation <= 4 else stored[::-1]):
        raise Invalid(f"meta.original_size {list(original)} is not stored_size {list(stored)} "
                       f"under orientation {orientation}")
    resized = _pair(meta, "resized_size", 1, side)
    offset = _pair(meta, "offset", 0, side)
    if offset[0] + resized[0] > side or offset[1] + resized[1] > side or max(resized) != side:
        raise Invalid(f"meta.resized_size {list(resized)} at offset {list(offset)} does not fit the "
                       f"{side}x{side} record with its longest side")
    scale = meta["scale"]
    if not isinstance(scale, list) or len(scale) != 2 or not all(type(v) is float for v in scale) or \
            scale != [resized[0] / original[0], resized[1] / original[1]]:
        raise Invalid(f"meta.scale {_shown(scale)} is not resized_size / original_size")
    word_ids, texts = meta["word_ids"], meta["texts"]
    if not isinstance(word_ids, list) or not isinstance(texts, list):
        raise Invalid("meta.word_ids and meta.texts must be lists")
    _texts(word_ids, "a word id", allow_none=False)
    _texts(texts, "a transcription", allow_none=True)
    return RecordMeta(meta["key"], index, name, meta["source_sha256"], orientation, stored, original, side,
                      resized, offset, (scale[0], scale[1]), tuple(word_ids), tuple(texts))


def _validate_compact(typed: RecordMeta, arrays: dict[str, np.ndarray]) -> None:
    """The compact image and maps (see ``compact``) restore to side x side arrays of valid values."""
    side = typed.side
    width, height = typed.resized_size
    if arrays["image"].shape != (height, width, 3):
        raise Invalid(f"image shape {list(arrays['image'].shape)}, expected [{height}, {width}, 3] "
                       "(meta.resized_size)")
    window = arrays["map_window"]
    if window.shape != (4,):
        raise Invalid(f"map_window shape {list(window.shape)}, expected [4]")
    wx, wy, ww, wh = (int(v) for v in window)
    if min(wx, wy, ww, wh) < 0 or wx + ww > side or wy + wh > side or (ww == 0) != (wh == 0):
        raise Invalid(f"map_window {[wx, wy, ww, wh]} is not a box inside the {side}x{side} record")
    bits = arrays["map_bits"]
    row_bytes = (ww + 7) // 8
    if bits.shape != (len(compact.PLANES), wh, row_bytes):
        raise Invalid(f"map_bits shape {list(bits.shape)}, expected [{len(compact.PLANES)}, {wh}, {row_bytes}] "
                       "from map_window")
    fill, values = arrays["thresh_fill"], arrays["thresh_values"]
    if fill.shape != (1,):
        raise Invalid(f"thresh_fill shape {list(fill.shape)}, expected [1]")
    _check_compact_content(bits, ww, fill, values)


def _check_compact_content(bits: np.ndarray, window_width: int, fill: np.ndarray, values: np.ndarray) -> None:
    """What the compact maps' bytes (not their shapes) must satisfy: no bit set beyond the window's
    width, threshold values finite and in [0, 1], one value per band pixel."""
    # ufunc.reduce rather than .max(): the loader runs this for every member it reads again
    if window_width % 8 and bits.size and int(np.maximum.reduce(bits[:, :, -1], axis=None)) >> (window_width % 8):
        raise Invalid("map_bits sets bits beyond the window's width")
    if int(fill.view("<u2")[0]) > F16_ONE or (values.size and int(np.maximum.reduce(values.view("<u2"))) > F16_ONE):
        raise Invalid("thresh_map holds values outside [0, 1] or not finite")
    band = _popcount(bits[3]) if bits.size else 0
    if band != values.shape[0]:
        raise Invalid(f"thresh_values holds {values.shape[0]} values for {band} band pixels")


@dataclass(frozen=True)
class CompactPlace:
    """Where a validated record's compact maps lie in its bytes, and their shapes: what
    ``recheck_compact`` needs to check the same member's bytes again without decoding them."""

    length: int  # bytes of the record
    bits: int  # offset of map_bits, (4, window_height, row_bytes) uint8
    window_width: int
    window_height: int
    fill: int  # offset of thresh_fill, (1,) float16
    values: int  # offset of thresh_values, (count,) float16
    count: int

    @classmethod
    def of(cls, record: "Record", length: int) -> "CompactPlace":
        a, at = record.arrays, record.offsets
        _, wh, _ = a["map_bits"].shape
        return cls(length, at["map_bits"], int(a["map_window"][2]), wh, at["thresh_fill"], at["thresh_values"],
                   a["thresh_values"].shape[0])


def recheck_compact(data: bytes | memoryview, place: CompactPlace, shard: str = "<record>",
                    key: str | None = None) -> int:
    """Check a record's bytes that a validated decode of the same member (``place``) did not fix:
    the compact maps' content (``_check_compact_content``). Returns thresh_fill as a float16 bit
    pattern (int). The loader calls this instead of ``decode_record`` when it has decoded the
    member before and its checksum still matches: the shapes, offsets and metadata come from that
    decode, so even bytes crafted to collide with the checksum cannot change what is allocated or
    where anything is written, and the content checks keep the expansion exact."""
    if len(data) != place.length:
        raise fail(shard, key, f"record is {len(data)} bytes, {place.length} when it was decoded")
    row_bytes = (place.window_width + 7) // 8
    bits = np.ndarray((len(compact.PLANES), place.window_height, row_bytes), np.uint8, data, place.bits)
    fill = np.ndarray((1,), DTYPES["thresh_fill"], data, place.fill)
    values = np.ndarray((place.count,), DTYPES["thresh_values"], data, place.values)
    try:
        _check_compact_content(bits, place.window_width, fill, values)
    except Invalid as exc:
        raise fail(shard, key, f"record {exc}") from None
    return int(fill.view("<u2")[0])


def _popcount(bits: np.ndarray) -> int:
    """Set bits in a contiguous uint8 array (8 bytes at a time where numpy has bitwise_count)."""
    counter = getattr(np, "bitwise_count", None)  # numpy >= 2.0
    if counter is None:
        return int(np.unpackbits(bits).sum(dtype=np.int64))
    flat = bits.reshape(-1)
    whole = flat.size - flat.size % 8
    count = int(np.add.reduce(counter(flat[:whole].view("<u8")), dtype=np.int64)) if whole else 0
    return count + (int(np.add.reduce(counter(flat[whole:]), dtype=np.int64)) if whole < flat.size else 0)


def validate_record(meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> RecordMeta:
    typed = _validate_meta(meta)
    _validate_compact(typed, arrays)
    sizes = arrays["polygon_sizes"]
    count = sizes.shape[0]
    vertices = int(sizes.sum(dtype=np.int64)) if count else 0
    if count and int(sizes.min()) < 3:
        raise Invalid("a polygon has fewer than 3 points")
    for name in ("polygons", "polygons_original"):
        if arrays[name].shape != (vertices, 2):
            raise Invalid(f"{name} shape {list(arrays[name].shape)}, expected [{vertices}, 2] from polygon_sizes")
    dont_care, left_out = arrays["dont_care"], arrays["left_out"]
    for name in ("dont_care", "left_out"):
        if arrays[name].shape != (count,):
            raise Invalid(f"{name} has {arrays[name].shape[0]} flags for {count} polygons")
    if len(typed.word_ids) != count or len(typed.texts) != count:
        raise Invalid(f"meta.word_ids and meta.texts must list one entry per polygon ({count})")
    if count:
        if int(dont_care.max()) > 1:
            raise Invalid("dont_care holds values other than 0 and 1")
        highest = int(left_out.max())
        if highest >= len(LeftOut):
            raise Invalid(f"left_out holds codes other than 0..{len(LeftOut) - 1} (max {highest})")
        if not np.array_equal(left_out == _DONT_CARE, dont_care.view(bool)):
            raise Invalid("left_out and dont_care disagree on which words are don't-care")
    sx, sy = typed.scale
    ox, oy = typed.offset
    matrix = arrays["inverse_matrix"]
    # exact float comparison, as np.array_equal: NaN or any other bit pattern is refused
    if matrix.shape != (3, 3) or matrix.tolist() != [[1.0 / sx, 0.0, -ox / sx], [0.0, 1.0 / sy, -oy / sy],
                                                       [0.0, 0.0, 1.0]]:
        raise Invalid("inverse_matrix is not the finite, invertible map back to the original image that "
                       "meta.scale and meta.offset define")
    if vertices:
        original = arrays["polygons_original"]
        transformed = arrays["polygons"]
        if not (np.isfinite(original).all() and np.isfinite(transformed).all()):
            raise Invalid("polygons hold NaN or infinity")
        width, height = typed.original_size
        low, high = original.min(axis=0), original.max(axis=0)
        if min(low[0], low[1]) < 0.0 or high[0] > width or high[1] > height:
            raise Invalid(f"polygons_original lie outside the {width}x{height} original image")
        back = transformed * (1.0 / sx, 1.0 / sy)
        back += (-ox / sx, -oy / sy)
        if float(np.abs(back - original).max()) > 1e-6 * max(width, height):
            raise Invalid("inverse_matrix does not map polygons back onto polygons_original")
    return typed
