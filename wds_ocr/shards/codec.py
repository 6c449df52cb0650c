"""Shard records: one msgpack document per sample, arrays as dtype + shape + raw bytes.

A record is the msgpack array ``[header, blob]``:

* ``header`` (map): ``format``, ``version``, ``meta`` (name, sizes, orientation, word ids ...) and
  ``arrays`` = ``{name: {"dtype": "<f2", "shape": [...], "offset": int, "nbytes": int}}``;
* ``blob`` (bin): every array's little-endian bytes, each starting at a multiple of 64.

Record version 3 stores the image and the DBNet maps compactly and losslessly (``compact``: the
image without its zero padding, the 0/1 maps bit-packed over the window where they differ from
their defaults, thresh_map as its values in the bands around text); ``Record.expand()`` (and the
loader, on the device) restores the full arrays bit for bit. Version 2 records (full arrays) are
refused with a message to rebuild.

Stock msgpack reads it (``header, blob = msgpack.unpackb(data)``; ``np.frombuffer(blob, dtype,
count, offset)``). ``decode_record`` reads only the header with msgpack and returns numpy views
into the record's own bytes: no copy of the pixel data. The header is padded so that the blob
starts 64-byte aligned inside the record. Every declared dtype, shape, offset and length is
checked against the bytes before any view is made; nothing is ever unpickled.

Then every metadata field and array a reader uses is validated, once, here (``_validate``): types
and ranges of the sizes, offset, scale and orientation; the key is the one ``record_key`` makes
of index and name; the inverse matrix is finite, invertible and exactly the one the sizes and
offset imply; polygons are finite, inside their images and consistent with each other; the image
has the resized size, the map window lies inside the record and its bits match its shape, the
threshold values are finite, in [0, 1] and exactly as many as the band bits; left-out codes are
known. A record is therefore either refused with its shard and key (``ShardFormatError``) or safe
for every reader: the loader (with ``on_error="skip"`` too), evaluation, inspect and verify. What
depends on the manifest (the record's side against ``transform.size``, the threshold range) is
checked by its readers.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

import msgpack
import numpy as np

from wds_ocr.data.coverage import LeftOut
from wds_ocr.data.pipeline import ProcessedSample
from wds_ocr.errors import ShardFormatError
from wds_ocr.shards import compact
from wds_ocr.shards.naming import MAX_INDEX, MEMBER_EXTENSION, record_key  # noqa: F401 (MEMBER_EXTENSION re-exported)

RECORD_FORMAT = "wds-ocr/record"
RECORD_VERSION = 3  # 3: compact arrays (see compact); 2: full arrays, refused
ALIGN = 64
MAX_SIDE = 1 << 24  # of a source image (source.max_pixels is at most 2^32)
MAX_PIXELS = 1 << 32
MAX_RECORD_SIDE = 8192
_MAX_TEXT = 1 << 16
_SHA256 = re.compile(r"[0-9a-f]{64}")
_F16_ONE = 0x3C00  # float16 1.0: non-negative float16 bit patterns order like their values
_BIN32 = 0xC6

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

# The arrays that hold the image and the maps in compact form (``Record.expand`` restores them).
COMPACT_ARRAYS = ("image", "map_window", "map_bits", "thresh_fill", "thresh_values")

# Header limits: a hostile header cannot make the unpacker allocate more than these.
_MAX_HEADER = 16 << 20
_HEADER_PREFIX = 8 << 10  # bytes unpacked first (a SROIE receipt's header is about 5 kB)
_UNPACK_LIMITS = dict(
    max_str_len=1 << 20,
    max_bin_len=1 << 20,
    max_array_len=1 << 20,
    max_map_len=1 << 12,
    max_ext_len=0,
)


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


_META_FIELDS = tuple(RecordMeta.__dataclass_fields__)


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


def _pack_polygons(polygons: tuple[np.ndarray, ...]) -> np.ndarray:
    if not polygons:
        return np.zeros((0, 2), dtype="<f8")
    return np.concatenate([np.asarray(p, dtype="<f8") for p in polygons], axis=0)


def full_arrays(sample: ProcessedSample) -> dict[str, np.ndarray]:
    """The live pipeline's full arrays of a sample (what ``Record.expand()`` gives back)."""
    targets = sample.targets
    return {"image": sample.image, "gt": targets.gt, "mask": targets.mask, "thresh_map": targets.thresh_map,
            "thresh_mask": targets.thresh_mask}


def sample_arrays(sample: ProcessedSample, thresh_min: float) -> dict[str, np.ndarray]:
    """The arrays a record stores for a processed sample (``thresh_min``: ``targets.thresh_min``
    of the settings it was processed with), in their storage dtypes."""
    meta = sample.meta
    stored = compact.pack(sample.image, full_arrays(sample), meta.offset, meta.resized_size,
                          compact.fill_value(thresh_min))
    return {
        **stored,
        "inverse_matrix": meta.inverse_matrix,
        "polygons_original": _pack_polygons(meta.polygons_original),
        "polygons": _pack_polygons(meta.polygons),
        "polygon_sizes": np.array([len(p) for p in meta.polygons], dtype="<i4"),
        "dont_care": meta.dont_care,
        "left_out": meta.left_out,
    }


def sample_meta(sample: ProcessedSample, key: str) -> RecordMeta:
    meta = sample.meta
    return RecordMeta(
        key=key,
        index=sample.index,
        name=meta.name,
        source_sha256=meta.source_sha256,
        orientation=meta.orientation,
        stored_size=tuple(meta.stored_size),
        original_size=tuple(meta.original_size),
        side=int(sample.image.shape[0]),
        resized_size=tuple(meta.resized_size),
        offset=tuple(meta.offset),
        scale=tuple(float(s) for s in meta.scale),
        word_ids=tuple(meta.word_ids),
        texts=tuple(meta.texts),
    )


def encode_arrays(meta: RecordMeta | dict[str, Any], arrays: dict[str, np.ndarray]) -> bytes:
    """Serialize a header + blob record; arrays are cast to their declared storage dtypes.

    ``meta`` as a dict is written as given (tests use that to craft hostile records)."""
    if isinstance(meta, RecordMeta):
        meta = meta.as_dict()
    specs: dict[str, dict[str, Any]] = {}
    chunks: list[bytes] = []
    cursor = 0
    for name, (dtype, _rank) in ARRAY_SPECS.items():
        array = np.ascontiguousarray(np.asarray(arrays[name]).astype(dtype, copy=False))
        padding = (-cursor) % ALIGN
        if padding:
            chunks.append(b"\x00" * padding)
            cursor += padding
        raw = array.tobytes()
        specs[name] = {"dtype": dtype, "shape": list(array.shape), "offset": cursor, "nbytes": len(raw)}
        chunks.append(raw)
        cursor += len(raw)
    blob_header = bytes([_BIN32]) + cursor.to_bytes(4, "big")
    header: dict[str, Any] = {"format": RECORD_FORMAT, "version": RECORD_VERSION, "meta": meta, "arrays": specs}
    # Pad the header so the blob starts on a 64-byte boundary inside the record. The packed pad
    # grows by one byte per character but by two at 32 (str8 adds a length byte), so pads 0..63
    # miss one residue; pads 32..95 (all str8) cover all 64.
    for pad in range(2 * ALIGN):
        header["pad"] = "\x00" * pad
        packed = msgpack.packb(header, use_bin_type=True)
        if (1 + len(packed) + len(blob_header)) % ALIGN == 0:
            break
    else:  # unreachable: 64 consecutive str8 lengths cover every residue
        raise RuntimeError("cannot align the record blob")
    return b"\x92" + packed + blob_header + b"".join(chunks)


def encode_record(sample: ProcessedSample, key: str, thresh_min: float) -> bytes:
    """The record of a processed sample (``thresh_min``: see ``sample_arrays``)."""
    return encode_arrays(sample_meta(sample, key), sample_arrays(sample, thresh_min))


def _fail(shard: str, key: str | None, reason: str) -> ShardFormatError:
    return ShardFormatError(shard, key, reason)


def _read_header(view: memoryview, shard: str, key: str | None) -> tuple[dict[str, Any], int]:
    """The header map and where the blob starts. The header is unpacked from a prefix of the
    record (most headers take a few kB), four times larger each time until the header fits, up to
    16 MiB."""
    if len(view) < 8 or view[0] != 0x92:
        raise _fail(shard, key, "not a wds-ocr record: expected a 2-element msgpack array [header, blob]")
    prefix = _HEADER_PREFIX
    while True:
        end = min(len(view), 1 + prefix)
        try:
            header = msgpack.unpackb(view[1:end], raw=False, strict_map_key=True, **_UNPACK_LIMITS)
            used = end - 1
        except msgpack.ExtraData as exc:
            header, used = exc.unpacked, end - 1 - len(exc.extra)
        except ValueError as exc:
            if "incomplete input" not in str(exc):
                raise _fail(shard, key, f"record header is not valid msgpack: {exc}") from None
            if end >= len(view):
                raise _fail(shard, key, f"record is truncated: its {len(view)} bytes end inside the header") from None
            if prefix >= _MAX_HEADER:
                raise _fail(shard, key, "record header is larger than 16 MiB") from None
            prefix *= 4
            continue
        except (msgpack.FormatError, msgpack.StackError) as exc:
            raise _fail(shard, key, f"record header is not valid msgpack: {exc}") from None
        break
    if not isinstance(header, dict):
        raise _fail(shard, key, "record header must be a msgpack map")
    return header, 1 + used


# msgpack bin families: marker -> bytes of the big-endian length that follows it. wds-ocr writes
# bin32; a record re-encoded by another msgpack writer may use the smallest that fits.
_BIN_LENGTH_BYTES = {0xC4: 1, 0xC5: 2, _BIN32: 4}


def _blob(view: memoryview, start: int, shard: str, key: str | None) -> tuple[memoryview, int]:
    """The blob's bytes and where they start in the record."""
    width = _BIN_LENGTH_BYTES.get(view[start]) if start < len(view) else None
    if width is None or start + 1 + width > len(view):
        raise _fail(shard, key, "record blob missing: expected msgpack bin data after the header")
    length = int.from_bytes(view[start + 1 : start + 1 + width], "big")
    body = start + 1 + width
    if body + length != len(view):
        raise _fail(shard, key, f"record blob declares {length} bytes but {len(view) - body} follow the header")
    return view[body:], body


def _is_size(value: Any) -> bool:
    return type(value) is int and value >= 0


_DTYPES = {name: np.dtype(dtype) for name, (dtype, _) in ARRAY_SPECS.items()}
_MAX_DIM = 1 << 31


def _array(blob: memoryview, name: str, spec: Any, shard: str, key: str | None) -> np.ndarray:
    expected_dtype, rank = ARRAY_SPECS[name]
    if not isinstance(spec, dict):
        raise _fail(shard, key, f"array {name}: spec must be a map")
    dtype, shape, offset, nbytes = spec.get("dtype"), spec.get("shape"), spec.get("offset"), spec.get("nbytes")
    if dtype != expected_dtype:
        raise _fail(shard, key, f"array {name}: dtype {dtype!r}, expected {expected_dtype!r}")
    count = 1
    if type(shape) is list and len(shape) == rank:
        for d in shape:
            if type(d) is not int or not 0 <= d < _MAX_DIM:
                break
            count *= d
        else:
            shape = tuple(shape)
    if type(shape) is not tuple:
        raise _fail(shard, key, f"array {name}: shape {shape!r} is not a list of {rank} sizes")
    if not _is_size(offset) or not _is_size(nbytes):
        raise _fail(shard, key, f"array {name}: offset/nbytes must be non-negative integers")
    numpy_dtype = _DTYPES[name]
    if count * numpy_dtype.itemsize != nbytes:
        raise _fail(shard, key, f"array {name}: shape {list(shape)} x {numpy_dtype.itemsize} bytes != declared "
                                f"{nbytes} bytes")
    if offset + nbytes > len(blob):
        raise _fail(
            shard, key, f"array {name}: bytes {offset}..{offset + nbytes} lie beyond the {len(blob)}-byte blob"
        )
    return np.ndarray(shape, numpy_dtype, blob, offset)


def decode_record(data: bytes | memoryview, shard: str = "<record>", key: str | None = None) -> Record:
    """Decode a record into numpy views over ``data`` (read-only, no copy). Raises ShardFormatError."""
    view = memoryview(data)
    header, start = _read_header(view, shard, key)
    if header.get("format") != RECORD_FORMAT:
        raise _fail(shard, key, f"record format {header.get('format')!r}, expected {RECORD_FORMAT!r}")
    if header.get("version") != RECORD_VERSION:
        raise _fail(
            shard, key, f"record version {header.get('version')!r} is not supported (this code reads {RECORD_VERSION}); "
            "rebuild the shards or upgrade wds-ocr"
        )
    meta = header.get("meta")
    specs = header.get("arrays")
    if not isinstance(meta, dict) or not isinstance(specs, dict):
        raise _fail(shard, key, "record header lacks its 'meta' or 'arrays' map")
    unknown = sorted(set(specs) - set(ARRAY_SPECS))
    missing = sorted(set(ARRAY_SPECS) - set(specs))
    if unknown or missing:
        raise _fail(shard, key, f"record arrays: unknown {unknown}, missing {missing}")
    blob, body = _blob(view, start, shard, key)
    arrays = {name: _array(blob, name, specs[name], shard, key) for name in ARRAY_SPECS}
    own_key = meta.get("key")
    if not isinstance(own_key, str):
        raise _fail(shard, key, "record meta lacks its 'key'")
    if key is not None and own_key != key:
        raise _fail(shard, key, f"record says its key is {own_key!r}, but its tar member is {key!r}")
    try:
        typed = _validate(meta, arrays)
    except _Invalid as exc:
        raise _fail(shard, key, f"record {exc}") from None
    return Record(own_key, typed, arrays, {name: body + specs[name]["offset"] for name in ARRAY_SPECS})


# ----------------------------------------------------------------------------- validation


class _Invalid(Exception):
    """One reason a decoded record is unusable (turned into a ShardFormatError with its place)."""


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _pair(meta: dict[str, Any], name: str, low: int, high: int) -> tuple[int, int]:
    value = meta[name]
    if not isinstance(value, list) or len(value) != 2 or not all(type(v) is int and low <= v <= high for v in value):
        raise _Invalid(f"meta.{name} must be [x, y], two integers from {low} to {high}, got {_shown(value)}")
    return value[0], value[1]


def _text(value: Any, what: str, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, str) or len(value) > _MAX_TEXT:
        raise _Invalid(f"{what} must be a string of at most {_MAX_TEXT} characters, got {_shown(value)}")


_TEXT_KINDS = frozenset({str})
_DONT_CARE = int(LeftOut.DONT_CARE)
_TEXT_OR_NONE_KINDS = frozenset({str, type(None)})


def _texts(values: list, what: str, allow_none: bool) -> None:
    """Every value is a string of at most _MAX_TEXT characters (or None); checked in C-level
    passes, then element by element only to name the first bad one."""
    kinds = set(map(type, values))
    if kinds <= (_TEXT_OR_NONE_KINDS if allow_none else _TEXT_KINDS) and \
            max(map(len, filter(None, values)), default=0) <= _MAX_TEXT:
        return
    for value in values:
        _text(value, what, allow_none)


def _validate_meta(meta: dict[str, Any]) -> RecordMeta:
    missing = [f for f in _META_FIELDS if f not in meta]
    unknown = sorted(set(meta) - set(_META_FIELDS))
    if missing or unknown:
        raise _Invalid(f"meta fields: missing {missing}, unknown {unknown}")
    side = meta["side"]
    if type(side) is not int or not 1 <= side <= MAX_RECORD_SIDE:
        raise _Invalid(f"meta.side {_shown(side)} is not a record side from 1 to {MAX_RECORD_SIDE}")
    index = meta["index"]
    if type(index) is not int or not 0 <= index < MAX_INDEX:
        raise _Invalid(f"meta.index must be a listing position, got {_shown(index)}")
    name = meta["name"]
    _text(name, "meta.name")
    if not name or "/" in name or "\\" in name or "\x00" in name or name in (".", ".."):
        raise _Invalid(f"meta.name {_shown(name)} is not a plain file name")
    if record_key(index, name) != meta["key"]:
        raise _Invalid(f"key {meta['key']!r} is not the key of index {index} and name {_shown(name)}")
    if not isinstance(meta["source_sha256"], str) or not _SHA256.fullmatch(meta["source_sha256"]):
        raise _Invalid("meta.source_sha256 must be 64 lowercase hex digits")
    orientation = meta["orientation"]
    if type(orientation) is not int or not 1 <= orientation <= 8:
        raise _Invalid(f"meta.orientation {_shown(orientation)} is not 1..8")
    stored = _pair(meta, "stored_size", 1, MAX_SIDE)
    original = _pair(meta, "original_size", 1, MAX_SIDE)
    if original[0] * original[1] > MAX_PIXELS:
        raise _Invalid(f"meta.original_size {list(original)} holds more than {MAX_PIXELS} pixels")
    if original != (stored if orientation <= 4 else stored[::-1]):
        raise _Invalid(f"meta.original_size {list(original)} is not stored_size {list(stored)} "
                       f"under orientation {orientation}")
    resized = _pair(meta, "resized_size", 1, side)
    offset = _pair(meta, "offset", 0, side)
    if offset[0] + resized[0] > side or offset[1] + resized[1] > side or max(resized) != side:
        raise _Invalid(f"meta.resized_size {list(resized)} at offset {list(offset)} does not fit the "
                       f"{side}x{side} record with its longest side")
    scale = meta["scale"]
    if not isinstance(scale, list) or len(scale) != 2 or not all(type(v) is float for v in scale) or \
            scale != [resized[0] / original[0], resized[1] / original[1]]:
        raise _Invalid(f"meta.scale {_shown(scale)} is not resized_size / original_size")
    word_ids, texts = meta["word_ids"], meta["texts"]
    if not isinstance(word_ids, list) or not isinstance(texts, list):
        raise _Invalid("meta.word_ids and meta.texts must be lists")
    _texts(word_ids, "a word id", allow_none=False)
    _texts(texts, "a transcription", allow_none=True)
    return RecordMeta(meta["key"], index, name, meta["source_sha256"], orientation, stored, original, side,
                      resized, offset, (scale[0], scale[1]), tuple(word_ids), tuple(texts))


def _validate_compact(typed: RecordMeta, arrays: dict[str, np.ndarray]) -> None:
    """The compact image and maps (see ``compact``) restore to side x side arrays of valid values."""
    side = typed.side
    width, height = typed.resized_size
    if arrays["image"].shape != (height, width, 3):
        raise _Invalid(f"image shape {list(arrays['image'].shape)}, expected [{height}, {width}, 3] "
                       "(meta.resized_size)")
    window = arrays["map_window"]
    if window.shape != (4,):
        raise _Invalid(f"map_window shape {list(window.shape)}, expected [4]")
    wx, wy, ww, wh = (int(v) for v in window)
    if min(wx, wy, ww, wh) < 0 or wx + ww > side or wy + wh > side or (ww == 0) != (wh == 0):
        raise _Invalid(f"map_window {[wx, wy, ww, wh]} is not a box inside the {side}x{side} record")
    bits = arrays["map_bits"]
    row_bytes = (ww + 7) // 8
    if bits.shape != (len(compact.PLANES), wh, row_bytes):
        raise _Invalid(f"map_bits shape {list(bits.shape)}, expected [{len(compact.PLANES)}, {wh}, {row_bytes}] "
                       "from map_window")
    fill, values = arrays["thresh_fill"], arrays["thresh_values"]
    if fill.shape != (1,):
        raise _Invalid(f"thresh_fill shape {list(fill.shape)}, expected [1]")
    _check_compact_content(bits, ww, fill, values)


def _check_compact_content(bits: np.ndarray, window_width: int, fill: np.ndarray, values: np.ndarray) -> None:
    """What the compact maps' bytes (not their shapes) must satisfy: no bit set beyond the window's
    width, threshold values finite and in [0, 1], one value per band pixel."""
    # ufunc.reduce rather than .max(): the loader runs this for every member it reads again
    if window_width % 8 and bits.size and int(np.maximum.reduce(bits[:, :, -1], axis=None)) >> (window_width % 8):
        raise _Invalid("map_bits sets bits beyond the window's width")
    if int(fill.view("<u2")[0]) > _F16_ONE or (values.size and int(np.maximum.reduce(values.view("<u2"))) > _F16_ONE):
        raise _Invalid("thresh_map holds values outside [0, 1] or not finite")
    band = _popcount(bits[3]) if bits.size else 0
    if band != values.shape[0]:
        raise _Invalid(f"thresh_values holds {values.shape[0]} values for {band} band pixels")


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
        raise _fail(shard, key, f"record is {len(data)} bytes, {place.length} when it was decoded")
    row_bytes = (place.window_width + 7) // 8
    bits = np.ndarray((len(compact.PLANES), place.window_height, row_bytes), np.uint8, data, place.bits)
    fill = np.ndarray((1,), _DTYPES["thresh_fill"], data, place.fill)
    values = np.ndarray((place.count,), _DTYPES["thresh_values"], data, place.values)
    try:
        _check_compact_content(bits, place.window_width, fill, values)
    except _Invalid as exc:
        raise _fail(shard, key, f"record {exc}") from None
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


def _validate(meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> RecordMeta:
    typed = _validate_meta(meta)
    _validate_compact(typed, arrays)
    sizes = arrays["polygon_sizes"]
    count = sizes.shape[0]
    vertices = int(sizes.sum(dtype=np.int64)) if count else 0
    if count and int(sizes.min()) < 3:
        raise _Invalid("a polygon has fewer than 3 points")
    for name in ("polygons", "polygons_original"):
        if arrays[name].shape != (vertices, 2):
            raise _Invalid(f"{name} shape {list(arrays[name].shape)}, expected [{vertices}, 2] from polygon_sizes")
    dont_care, left_out = arrays["dont_care"], arrays["left_out"]
    for name in ("dont_care", "left_out"):
        if arrays[name].shape != (count,):
            raise _Invalid(f"{name} has {arrays[name].shape[0]} flags for {count} polygons")
    if len(typed.word_ids) != count or len(typed.texts) != count:
        raise _Invalid(f"meta.word_ids and meta.texts must list one entry per polygon ({count})")
    if count:
        if int(dont_care.max()) > 1:
            raise _Invalid("dont_care holds values other than 0 and 1")
        highest = int(left_out.max())
        if highest >= len(LeftOut):
            raise _Invalid(f"left_out holds codes other than 0..{len(LeftOut) - 1} (max {highest})")
        if not np.array_equal(left_out == _DONT_CARE, dont_care.view(bool)):
            raise _Invalid("left_out and dont_care disagree on which words are don't-care")
    sx, sy = typed.scale
    ox, oy = typed.offset
    matrix = arrays["inverse_matrix"]
    # exact float comparison, as np.array_equal: NaN or any other bit pattern is refused
    if matrix.shape != (3, 3) or matrix.tolist() != [[1.0 / sx, 0.0, -ox / sx], [0.0, 1.0 / sy, -oy / sy],
                                                       [0.0, 0.0, 1.0]]:
        raise _Invalid("inverse_matrix is not the finite, invertible map back to the original image that "
                       "meta.scale and meta.offset define")
    if vertices:
        original = arrays["polygons_original"]
        transformed = arrays["polygons"]
        if not (np.isfinite(original).all() and np.isfinite(transformed).all()):
            raise _Invalid("polygons hold NaN or infinity")
        width, height = typed.original_size
        low, high = original.min(axis=0), original.max(axis=0)
        if min(low[0], low[1]) < 0.0 or high[0] > width or high[1] > height:
            raise _Invalid(f"polygons_original lie outside the {width}x{height} original image")
        back = transformed * (1.0 / sx, 1.0 / sy)
        back += (-ox / sx, -oy / sy)
        if float(np.abs(back - original).max()) > 1e-6 * max(width, height):
            raise _Invalid("inverse_matrix does not map polygons back onto polygons_original")
    return typed
