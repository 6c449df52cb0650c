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

Then every metadata field and array a reader uses is validated, once (``record_checks.validate_record``): types
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

from typing import Any

import msgpack
import numpy as np

from wds_ocr.data.pipeline import ProcessedSample
from wds_ocr.shards import compact
from wds_ocr.shards.record import DTYPES, ALIGN, ARRAY_SPECS, RECORD_FORMAT, RECORD_VERSION, Record, RecordMeta
from wds_ocr.shards.record_checks import Invalid, fail, validate_record
from wds_ocr.shards.naming import MAX_INDEX, MEMBER_EXTENSION, record_key  # noqa: F401 (MEMBER_EXTENSION re-exported)

_BIN32 = 0xC6
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


def _read_header(view: memoryview, shard: str, key: str | None) -> tuple[dict[str, Any], int]:
    """The header map and where the blob starts. The header is unpacked from a prefix of the
    record (most headers take a few kB), four times larger each time until the header fits, up to
    16 MiB."""
    if len(view) < 8 or view[0] != 0x92:
        raise fail(shard, key, "not a wds-ocr record: expected a 2-element msgpack array [header, blob]")
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
                raise fail(shard, key, f"record header is not valid msgpack: {exc}") from None
            if end >= len(view):
                raise fail(shard, key, f"record is truncated: its {len(view)} bytes end inside the header") from None
            if prefix >= _MAX_HEADER:
                raise fail(shard, key, "record header is larger than 16 MiB") from None
            prefix *= 4
            continue
        except (msgpack.FormatError, msgpack.StackError) as exc:
            raise fail(shard, key, f"record header is not valid msgpack: {exc}") from None
        break
    if not isinstance(header, dict):
        raise fail(shard, key, "record header must be a msgpack map")
    return header, 1 + used


# msgpack bin families: marker -> bytes of the big-endian length that follows it. wds-ocr writes
# bin32; a record re-encoded by another msgpack writer may use the smallest that fits.
_BIN_LENGTH_BYTES = {0xC4: 1, 0xC5: 2, _BIN32: 4}


def _blob(view: memoryview, start: int, shard: str, key: str | None) -> tuple[memoryview, int]:
    """The blob's bytes and where they start in the record."""
    width = _BIN_LENGTH_BYTES.get(view[start]) if start < len(view) else None
    if width is None or start + 1 + width > len(view):
        raise fail(shard, key, "record blob missing: expected msgpack bin data after the header")
    length = int.from_bytes(view[start + 1 : start + 1 + width], "big")
    body = start + 1 + width
    if body + length != len(view):
        raise fail(shard, key, f"record blob declares {length} bytes but {len(view) - body} follow the header")
    return view[body:], body


def _is_size(value: Any) -> bool:
    return type(value) is int and value >= 0


_MAX_DIM = 1 << 31


def _array(blob: memoryview, name: str, spec: Any, shard: str, key: str | None) -> np.ndarray:
    expected_dtype, rank = ARRAY_SPECS[name]
    if not isinstance(spec, dict):
        raise fail(shard, key, f"array {name}: spec must be a map")
    dtype, shape, offset, nbytes = spec.get("dtype"), spec.get("shape"), spec.get("offset"), spec.get("nbytes")
    if dtype != expected_dtype:
        raise fail(shard, key, f"array {name}: dtype {dtype!r}, expected {expected_dtype!r}")
    count = 1
    if type(shape) is list and len(shape) == rank:
        for d in shape:
            if type(d) is not int or not 0 <= d < _MAX_DIM:
                break
            count *= d
        else:
            shape = tuple(shape)
    if type(shape) is not tuple:
        raise fail(shard, key, f"array {name}: shape {shape!r} is not a list of {rank} sizes")
    if not _is_size(offset) or not _is_size(nbytes):
        raise fail(shard, key, f"array {name}: offset/nbytes must be non-negative integers")
    numpy_dtype = DTYPES[name]
    if count * numpy_dtype.itemsize != nbytes:
        raise fail(shard, key, f"array {name}: shape {list(shape)} x {numpy_dtype.itemsize} bytes != declared "
                                f"{nbytes} bytes")
    if offset + nbytes > len(blob):
        raise fail(
            shard, key, f"array {name}: bytes {offset}..{offset + nbytes} lie beyond the {len(blob)}-byte blob"
        )
    return np.ndarray(shape, numpy_dtype, blob, offset)


def decode_record(data: bytes | memoryview, shard: str = "<record>", key: str | None = None) -> Record:
    """Decode a record into numpy views over ``data`` (read-only, no copy). Raises ShardFormatError."""
    view = memoryview(data)
    header, start = _read_header(view, shard, key)
    if header.get("format") != RECORD_FORMAT:
        raise fail(shard, key, f"record format {header.get('format')!r}, expected {RECORD_FORMAT!r}")
    if header.get("version") != RECORD_VERSION:
        raise fail(
            shard, key, f"record version {header.get('version')!r} is not supported (this code reads {RECORD_VERSION}); "
            "rebuild the shards or upgrade wds-ocr"
        )
    meta = header.get("meta")
    specs = header.get("arrays")
    if not isinstance(meta, dict) or not isinstance(specs, dict):
        raise fail(shard, key, "record header lacks its 'meta' or 'arrays' map")
    unknown = sorted(set(specs) - set(ARRAY_SPECS))
    missing = sorted(set(ARRAY_SPECS) - set(specs))
    if unknown or missing:
        raise fail(shard, key, f"record arrays: unknown {unknown}, missing {missing}")
    blob, body = _blob(view, start, shard, key)
    arrays = {name: _array(blob, name, specs[name], shard, key) for name in ARRAY_SPECS}
    own_key = meta.get("key")
    if not isinstance(own_key, str):
        raise fail(shard, key, "record meta lacks its 'key'")
    if key is not None and own_key != key:
        raise fail(shard, key, f"record says its key is {own_key!r}, but its tar member is {key!r}")
    try:
        typed = validate_record(meta, arrays)
    except Invalid as exc:
        raise fail(shard, key, f"record {exc}") from None
    return Record(own_key, typed, arrays, {name: body + specs[name]["offset"] for name in ARRAY_SPECS})
