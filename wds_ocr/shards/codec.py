"""Shard records: one msgpack document per sample, arrays as dtype + shape + raw bytes.

A record is the msgpack array ``[header, blob]``:

* ``header`` (map): ``format``, ``version``, ``meta`` (name, sizes, orientation, word ids ...) and
  ``arrays`` = ``{name: {"dtype": "<f2", "shape": [...], "offset": int, "nbytes": int}}``;
* ``blob`` (bin): every array's little-endian bytes, each starting at a multiple of 64.

Stock msgpack reads it (``header, blob = msgpack.unpackb(data)``; ``np.frombuffer(blob, dtype,
count, offset)``). ``decode_record`` reads only the header with msgpack and returns numpy views
into the record's own bytes: no copy of the pixel data. The header is padded so that the blob
starts 64-byte aligned inside the record. Every declared dtype, shape, offset and length is
checked against the bytes before any view is made; nothing is ever unpickled.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np

from wds_ocr.data.pipeline import ProcessedSample
from wds_ocr.errors import ShardFormatError

RECORD_FORMAT = "wds-ocr/record"
RECORD_VERSION = 2
MEMBER_EXTENSION = "msgpack"
ALIGN = 64
_BIN32 = 0xC6

# name -> (dtype, rank). The only arrays a record may hold, all required.
ARRAY_SPECS: dict[str, tuple[str, int]] = {
    "image": ("|u1", 3),
    "gt": ("|u1", 2),
    "mask": ("|u1", 2),
    "thresh_map": ("<f2", 2),
    "thresh_mask": ("|u1", 2),
    "inverse_matrix": ("<f8", 2),
    "polygons_original": ("<f8", 2),
    "polygons": ("<f8", 2),
    "polygon_sizes": ("<i4", 1),
    "dont_care": ("|u1", 1),
    "left_out": ("|u1", 1),  # LeftOut code per polygon (wds_ocr.data.targets): 0 = in the targets
}
MAP_NAMES = ("gt", "mask", "thresh_map", "thresh_mask")

# Header limits: a hostile header cannot make the unpacker allocate more than these.
_MAX_HEADER = 16 << 20
_UNPACK_LIMITS = dict(
    max_str_len=1 << 20,
    max_bin_len=1 << 20,
    max_array_len=1 << 20,
    max_map_len=1 << 12,
    max_ext_len=0,
)


@dataclass(frozen=True)
class Record:
    """A decoded record: header metadata and read-only numpy views into the record bytes."""

    key: str
    meta: dict[str, Any]
    arrays: dict[str, np.ndarray]

    def polygons(self, name: str = "polygons") -> list[np.ndarray]:
        """Split the packed (V, 2) vertex array back into one (K, 2) array per polygon."""
        sizes = self.arrays["polygon_sizes"]
        return np.split(self.arrays[name], np.cumsum(sizes)[:-1]) if len(sizes) else []


def _pack_polygons(polygons: tuple[np.ndarray, ...]) -> np.ndarray:
    if not polygons:
        return np.zeros((0, 2), dtype="<f8")
    return np.concatenate([np.asarray(p, dtype="<f8") for p in polygons], axis=0)


def sample_arrays(sample: ProcessedSample) -> dict[str, np.ndarray]:
    """The arrays a record stores for a processed sample, in their storage dtypes."""
    meta = sample.meta
    targets = sample.targets
    return {
        "image": sample.image,
        "gt": targets.gt,
        "mask": targets.mask,
        "thresh_map": targets.thresh_map,
        "thresh_mask": targets.thresh_mask,
        "inverse_matrix": meta.inverse_matrix,
        "polygons_original": _pack_polygons(meta.polygons_original),
        "polygons": _pack_polygons(meta.polygons),
        "polygon_sizes": np.array([len(p) for p in meta.polygons], dtype="<i4"),
        "dont_care": meta.dont_care,
        "left_out": meta.left_out,
    }


def sample_meta(sample: ProcessedSample, key: str) -> dict[str, Any]:
    meta = sample.meta
    return {
        "key": key,
        "index": sample.index,
        "name": meta.name,
        "source_sha256": meta.source_sha256,
        "orientation": meta.orientation,
        "stored_size": list(meta.stored_size),
        "original_size": list(meta.original_size),
        "resized_size": list(meta.resized_size),
        "offset": list(meta.offset),
        "scale": [float(s) for s in meta.scale],
        "word_ids": list(meta.word_ids),
        "texts": list(meta.texts),
    }


def encode_arrays(meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> bytes:
    """Serialize a header + blob record; arrays are cast to their declared storage dtypes."""
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


def encode_record(sample: ProcessedSample, key: str) -> bytes:
    return encode_arrays(sample_meta(sample, key), sample_arrays(sample))


def _fail(shard: str, key: str | None, reason: str) -> ShardFormatError:
    return ShardFormatError(shard, key, reason)


def _read_header(view: memoryview, shard: str, key: str | None) -> tuple[dict[str, Any], int]:
    if len(view) < 8 or view[0] != 0x92:
        raise _fail(shard, key, "not a wds-ocr record: expected a 2-element msgpack array [header, blob]")
    chunk = 1 << 16
    # read_size: the unpacker's initial buffer (1 MiB by default, allocated on every decode).
    unpacker = msgpack.Unpacker(
        raw=False, strict_map_key=True, max_buffer_size=_MAX_HEADER, read_size=chunk, **_UNPACK_LIMITS
    )
    fed = 1
    while True:
        end = min(len(view), fed + chunk)
        unpacker.feed(view[fed:end])
        fed = end
        try:
            header = unpacker.unpack()
            break
        except msgpack.OutOfData:
            if fed >= len(view):
                raise _fail(shard, key, f"record is truncated: its {len(view)} bytes end inside the header") from None
            if fed > _MAX_HEADER:
                raise _fail(shard, key, "record header is larger than 16 MiB") from None
        except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
            raise _fail(shard, key, f"record header is not valid msgpack: {exc}") from None
    if not isinstance(header, dict):
        raise _fail(shard, key, "record header must be a msgpack map")
    return header, 1 + unpacker.tell()


# msgpack bin families: marker -> bytes of the big-endian length that follows it. wds-ocr writes
# bin32; a record re-encoded by another msgpack writer may use the smallest that fits.
_BIN_LENGTH_BYTES = {0xC4: 1, 0xC5: 2, _BIN32: 4}


def _blob(view: memoryview, start: int, shard: str, key: str | None) -> memoryview:
    width = _BIN_LENGTH_BYTES.get(view[start]) if start < len(view) else None
    if width is None or start + 1 + width > len(view):
        raise _fail(shard, key, "record blob missing: expected msgpack bin data after the header")
    length = int.from_bytes(view[start + 1 : start + 1 + width], "big")
    body = start + 1 + width
    if body + length != len(view):
        raise _fail(shard, key, f"record blob declares {length} bytes but {len(view) - body} follow the header")
    return view[body:]


def _is_size(value: Any) -> bool:
    return type(value) is int and value >= 0


def _array(blob: memoryview, name: str, spec: Any, shard: str, key: str | None) -> np.ndarray:
    expected_dtype, rank = ARRAY_SPECS[name]
    if not isinstance(spec, dict):
        raise _fail(shard, key, f"array {name}: spec must be a map")
    dtype, shape, offset, nbytes = (spec.get(f) for f in ("dtype", "shape", "offset", "nbytes"))
    if dtype != expected_dtype:
        raise _fail(shard, key, f"array {name}: dtype {dtype!r}, expected {expected_dtype!r}")
    if not isinstance(shape, list) or len(shape) != rank or not all(_is_size(d) and d < (1 << 31) for d in shape):
        raise _fail(shard, key, f"array {name}: shape {shape!r} is not a list of {rank} sizes")
    if not _is_size(offset) or not _is_size(nbytes):
        raise _fail(shard, key, f"array {name}: offset/nbytes must be non-negative integers")
    itemsize = np.dtype(dtype).itemsize
    count = 1
    for d in shape:
        count *= d
    if count * itemsize != nbytes:
        raise _fail(shard, key, f"array {name}: shape {shape} x {itemsize} bytes != declared {nbytes} bytes")
    if offset + nbytes > len(blob):
        raise _fail(
            shard, key, f"array {name}: bytes {offset}..{offset + nbytes} lie beyond the {len(blob)}-byte blob"
        )
    return np.frombuffer(blob, dtype=dtype, count=count, offset=offset).reshape(shape)


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
    blob = _blob(view, start, shard, key)
    arrays = {name: _array(blob, name, specs[name], shard, key) for name in ARRAY_SPECS}
    record_key = meta.get("key")
    if not isinstance(record_key, str):
        raise _fail(shard, key, "record meta lacks its 'key'")
    if key is not None and record_key != key:
        raise _fail(shard, key, f"record says its key is {record_key!r}, but its tar member is {key!r}")
    return Record(record_key, meta, arrays)
