"""Shard records: exact round trip (stored and expanded), 64-byte alignment, stock-msgpack
readability, strict decoding of the compact layout."""

from __future__ import annotations

import dataclasses

import tracemalloc
from pathlib import Path

import msgpack
import numpy as np
import pytest

from wds_ocr.config import load_config
from wds_ocr.data.pipeline import ProcessedSample, process_sample
from wds_ocr.data.sources import list_source
from wds_ocr.errors import ShardFormatError
from wds_ocr.shards.codec import decode_record, encode_arrays, encode_record, full_arrays, sample_arrays, sample_meta
from wds_ocr.shards.record import ALIGN, ARRAY_SPECS, RECORD_FORMAT, RECORD_VERSION

SHARD = "shard-000003.tar"
KEY = "0000002_synth_0003"  # record_key(2, "synth_0003.jpg"): the codec checks it


@pytest.fixture(scope="module")
def processed(synth_root: Path) -> ProcessedSample:
    """synth_0003.jpg: stored with an EXIF orientation tag, 64x64 records."""
    config = load_config(None, ["transform.size=64"])
    listing = list_source(synth_root, "train", config.source)
    sample = next(s for s in listing.samples if s.name == "synth_0003.jpg")
    return process_sample(sample, config)


THRESH_MIN = 0.3


@pytest.fixture(scope="module")
def record_bytes(processed: ProcessedSample) -> bytes:
    return encode_record(processed, KEY, THRESH_MIN)


def blob_start(data: bytes) -> int:
    _, blob = msgpack.unpackb(data)
    return len(data) - len(blob)


def repack(data: bytes, edit) -> bytes:
    """Decode with stock msgpack, let ``edit`` change the header, re-encode with a bin32 blob."""
    header, blob = msgpack.unpackb(data)
    edit(header)
    return b"\x92" + msgpack.packb(header) + b"\xc6" + len(blob).to_bytes(4, "big") + blob


def decode_error(data: bytes) -> ShardFormatError:
    with pytest.raises(ShardFormatError) as caught:
        decode_record(data, SHARD, KEY)
    error = caught.value
    assert (error.shard, error.key) == (SHARD, KEY)
    assert str(error) == f"{SHARD} [{KEY}]: {error.reason}"
    return error


def test_round_trip_is_bit_exact(processed, record_bytes):
    assert processed.meta.orientation != 1  # the EXIF-tagged sample
    record = decode_record(record_bytes, SHARD, KEY)
    expected = sample_arrays(processed, THRESH_MIN)
    assert list(record.arrays) == list(ARRAY_SPECS)
    for name, (dtype, rank) in ARRAY_SPECS.items():
        array = record.arrays[name]
        assert array.dtype == np.dtype(dtype), name
        assert array.ndim == rank and array.shape == expected[name].shape, name
        assert array.tobytes() == np.asarray(expected[name]).astype(dtype).tobytes(), name
    width, height = processed.meta.resized_size
    assert record.arrays["image"].shape == (height, width, 3) and max(width, height) == 64
    assert record.meta == sample_meta(processed, KEY) and record.meta.side == 64
    assert record.meta.name == "synth_0003.jpg"
    assert record.key == KEY
    polygons = record.polygons("polygons_original")
    assert len(polygons) == len(processed.meta.polygons_original) > 0
    for got, want in zip(polygons, processed.meta.polygons_original):
        assert got.tobytes() == want.astype("<f8").tobytes()


def test_the_record_expands_to_the_live_arrays_bit_for_bit(processed, record_bytes):
    full = decode_record(record_bytes, SHARD, KEY).expand()
    live = full_arrays(processed)
    assert list(full) == ["image", "gt", "mask", "thresh_map", "thresh_mask"]
    for name, array in live.items():
        assert full[name].dtype == array.dtype and full[name].shape == array.shape == full["image"].shape[: array.ndim]
        assert full[name].tobytes() == array.tobytes(), name
    record = decode_record(record_bytes)
    stored = sum(record.arrays[name].nbytes for name in ("image", "map_window", "map_bits", "thresh_fill",
                                                          "thresh_values"))
    assert stored < sum(a.nbytes for a in live.values()) / 2  # the point of the compact layout


def test_decoded_arrays_are_read_only_views_into_the_record(record_bytes):
    record = decode_record(record_bytes)
    buffer = np.frombuffer(record_bytes, dtype=np.uint8)
    for name, array in record.arrays.items():
        assert not array.flags.writeable, name
        if array.size:
            assert np.shares_memory(array, buffer), name


def test_blob_and_every_array_start_64_byte_aligned(record_bytes):
    start = blob_start(record_bytes)
    assert start % ALIGN == 0
    header, _ = msgpack.unpackb(record_bytes)
    assert all(spec["offset"] % ALIGN == 0 for spec in header["arrays"].values())


def test_alignment_holds_for_every_header_length():
    # Regression: a header needing a 33-character pad used to leave the blob misaligned.
    arrays = {name: np.zeros((1,) * rank, dtype=dtype) for name, (dtype, rank) in ARRAY_SPECS.items()}
    misaligned = [n for n in range(200) if blob_start(encode_arrays({"key": "k", "name": "x" * n}, arrays)) % ALIGN]
    assert misaligned == []


def test_stock_msgpack_and_frombuffer_read_a_record(processed, record_bytes):
    header, blob = msgpack.unpackb(record_bytes)
    assert header["format"] == RECORD_FORMAT and header["version"] == RECORD_VERSION
    assert header["meta"]["key"] == KEY
    for name, spec in header["arrays"].items():
        count = int(np.prod(spec["shape"]))
        array = np.frombuffer(blob, spec["dtype"], count, spec["offset"]).reshape(spec["shape"])
        assert array.tobytes() == np.asarray(sample_arrays(processed, THRESH_MIN)[name]).astype(spec["dtype"]).tobytes()


def test_a_record_without_polygons_round_trips(processed):
    arrays = dict(sample_arrays(processed, THRESH_MIN))
    arrays.update(
        polygons_original=np.zeros((0, 2)), polygons=np.zeros((0, 2)), polygon_sizes=np.zeros(0, dtype="<i4"),
        dont_care=np.zeros(0, dtype=bool), left_out=np.zeros(0, dtype=np.uint8),
    )
    meta = dataclasses.replace(sample_meta(processed, KEY), word_ids=(), texts=())
    record = decode_record(encode_arrays(meta, arrays))
    assert record.arrays["polygons"].shape == (0, 2)
    assert record.arrays["left_out"].shape == (0,)
    assert record.polygons() == []


def test_same_sample_encodes_to_the_same_bytes(processed, record_bytes):
    assert encode_record(processed, KEY, THRESH_MIN) == record_bytes


def test_wrong_format_and_version_are_refused(record_bytes):
    error = decode_error(repack(record_bytes, lambda h: h.update(format="other/record")))
    assert error.reason == "record format 'other/record', expected 'wds-ocr/record'"
    error = decode_error(repack(record_bytes, lambda h: h.update(version=1)))
    assert error.reason == ("record version 1 is not supported (this code reads 3); "
                            "rebuild the shards or upgrade wds-ocr")
    error = decode_error(repack(record_bytes, lambda h: h.update(version=2)))  # full arrays, before compact
    assert error.reason == ("record version 2 is not supported (this code reads 3); "
                            "rebuild the shards or upgrade wds-ocr")
    error = decode_error(b"PK\x03\x04 a zip file, not a record")
    assert error.reason == "not a wds-ocr record: expected a 2-element msgpack array [header, blob]"
    error = decode_error(b"\x92" + msgpack.packb([1, 2]) + b"\xc6\x00\x00\x00\x00")
    assert error.reason == "record header must be a msgpack map"


def test_truncated_records_are_refused(record_bytes):
    error = decode_error(record_bytes[:-100])
    blob_bytes = len(record_bytes) - blob_start(record_bytes)
    assert error.reason == f"record blob declares {blob_bytes} bytes but {blob_bytes - 100} follow the header"
    error = decode_error(record_bytes[:50])
    assert error.reason == "record is truncated: its 50 bytes end inside the header"
    error = decode_error(record_bytes[: blob_start(record_bytes) - 5])
    assert error.reason == "record blob missing: expected msgpack bin data after the header"


def test_a_record_reencoded_by_stock_msgpack_still_decodes(record_bytes):
    header, blob = msgpack.unpackb(record_bytes)
    reencoded = msgpack.packb([header, blob], use_bin_type=True)  # stock packer: smallest bin type
    assert len(blob) < 1 << 16 and reencoded[len(reencoded) - len(blob) - 3] == 0xC5  # bin16, not bin32
    original = decode_record(record_bytes)
    again = decode_record(reencoded)
    assert again.meta == original.meta
    for name, array in original.arrays.items():
        assert np.array_equal(again.arrays[name], array)


def test_shape_that_disagrees_with_its_bytes_is_refused(record_bytes):
    error = decode_error(repack(record_bytes, lambda h: h["arrays"]["map_window"].update(shape=[3])))
    assert error.reason == "array map_window: shape [3] x 4 bytes != declared 16 bytes"
    error = decode_error(repack(record_bytes, lambda h: h["arrays"]["image"].update(shape=[64, 64])))
    assert error.reason == "array image: shape [64, 64] is not a list of 3 sizes"
    error = decode_error(repack(record_bytes, lambda h: h["arrays"]["map_bits"].update(shape=[4, -64, 8])))
    assert error.reason == "array map_bits: shape [4, -64, 8] is not a list of 3 sizes"


def test_offset_beyond_the_blob_is_refused(record_bytes):
    header, blob = msgpack.unpackb(record_bytes)
    image = header["arrays"]["image"]["nbytes"]
    error = decode_error(repack(record_bytes, lambda h: h["arrays"]["image"].update(offset=len(blob) - 100)))
    assert error.reason == (f"array image: bytes {len(blob) - 100}..{len(blob) - 100 + image} "
                            f"lie beyond the {len(blob)}-byte blob")
    error = decode_error(repack(record_bytes, lambda h: h["arrays"]["map_bits"].update(offset=-64)))
    assert error.reason == "array map_bits: offset/nbytes must be non-negative integers"


def test_unknown_or_missing_arrays_are_refused(record_bytes):
    def add(header):
        header["arrays"]["logits"] = dict(header["arrays"]["map_bits"])

    error = decode_error(repack(record_bytes, add))
    assert error.reason == "record arrays: unknown ['logits'], missing []"
    error = decode_error(repack(record_bytes, lambda h: h["arrays"].pop("thresh_values")))
    assert error.reason == "record arrays: unknown [], missing ['thresh_values']"
    old = {name: {"dtype": "|u1", "shape": [0], "offset": 0, "nbytes": 0} for name in ("gt", "thresh_map")}
    error = decode_error(repack(record_bytes, lambda h: h["arrays"].update(old)))
    assert error.reason == "record arrays: unknown ['gt', 'thresh_map'], missing []"
    error = decode_error(repack(record_bytes, lambda h: h.pop("meta")))
    assert error.reason == "record header lacks its 'meta' or 'arrays' map"


def test_wrong_dtype_is_refused(record_bytes):
    error = decode_error(repack(record_bytes, lambda h: h["arrays"]["thresh_values"].update(dtype="<f4")))
    assert error.reason == "array thresh_values: dtype '<f4', expected '<f2'"
    error = decode_error(repack(record_bytes, lambda h: h["arrays"]["image"].update(dtype="O")))
    assert error.reason == "array image: dtype 'O', expected '|u1'"


def test_oversized_declared_shape_is_refused_before_any_allocation(record_bytes):
    huge = [2**30, 2**30, 3]
    matching = repack(record_bytes, lambda h: h["arrays"]["image"].update(shape=huge, nbytes=3 * 2**60))
    mismatched = repack(record_bytes, lambda h: h["arrays"]["image"].update(shape=huge))
    too_wide = repack(record_bytes, lambda h: h["arrays"]["image"].update(shape=[2**31, 1, 3]))
    tracemalloc.start()
    try:
        errors = [decode_error(data) for data in (matching, mismatched, too_wide)]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 18  # the records are ~15 kB; nothing near the declared 3 EiB was allocated
    spec = msgpack.unpackb(record_bytes)[0]["arrays"]["image"]
    offset = spec["offset"]
    assert errors[0].reason.startswith(f"array image: bytes {offset}..{offset + 3 * 2**60} lie beyond the ")
    assert errors[1].reason == f"array image: shape {huge} x 1 bytes != declared {spec['nbytes']} bytes"
    assert errors[2].reason == "array image: shape [2147483648, 1, 3] is not a list of 3 sizes"


def test_key_must_match_the_member(record_bytes):
    with pytest.raises(ShardFormatError) as caught:
        decode_record(record_bytes, SHARD, "0000009_other")
    assert caught.value.reason == f"record says its key is '{KEY}', but its tar member is '0000009_other'"


# --- the compact arrays: hostile values a manifest could agree with -------------------------------


def poke(record_bytes: bytes, name: str, position: int, value: bytes) -> bytes:
    """The record with ``value`` written at byte ``position`` of array ``name``."""
    header, blob = msgpack.unpackb(record_bytes)
    blob = bytearray(blob)
    at = header["arrays"][name]["offset"] + position
    blob[at : at + len(value)] = value
    return b"\x92" + msgpack.packb(header) + b"\xc6" + len(blob).to_bytes(4, "big") + bytes(blob)


def test_a_window_outside_the_record_is_refused(record_bytes):
    window = decode_record(record_bytes).arrays["map_window"].tolist()
    moved = poke(record_bytes, "map_window", 0, (64 - window[2] + 1).to_bytes(4, "little", signed=True))
    assert decode_error(moved).reason == (f"record map_window {[64 - window[2] + 1, *window[1:]]} is not a box "
                                          "inside the 64x64 record")
    negative = poke(record_bytes, "map_window", 4, (-1).to_bytes(4, "little", signed=True))
    assert decode_error(negative).reason.startswith(f"record map_window [{window[0]}, -1, ")


def test_bits_beyond_the_window_width_are_refused(record_bytes):
    record = decode_record(record_bytes)
    width = int(record.arrays["map_window"][2])
    assert width % 8, "this record's window must end inside a byte"
    _, height, row_bytes = record.arrays["map_bits"].shape
    last_byte_of_gt_row0 = row_bytes - 1
    value = bytes([record.arrays["map_bits"][0, 0, -1] | 0x80])
    error = decode_error(poke(record_bytes, "map_bits", last_byte_of_gt_row0, value))
    assert error.reason == "record map_bits sets bits beyond the window's width"


def test_threshold_values_must_match_the_band_and_be_finite(record_bytes):
    record = decode_record(record_bytes)
    count = record.arrays["thresh_values"].shape[0]
    assert count > 0
    nan = poke(record_bytes, "thresh_values", 2 * (count - 1), (0x7E00).to_bytes(2, "little"))
    assert decode_error(nan).reason == "record thresh_map holds values outside [0, 1] or not finite"
    above_one = poke(record_bytes, "thresh_fill", 0, (0x3C01).to_bytes(2, "little"))
    assert decode_error(above_one).reason == "record thresh_map holds values outside [0, 1] or not finite"
    bits = record.arrays["map_bits"]
    band = bits[3]
    width = int(record.arrays["map_window"][2])
    pixels = np.unpackbits(band, axis=-1, bitorder="little")[:, :width]
    row, x = map(int, np.argwhere(pixels == 0)[0])  # a pixel of the window outside the band
    column, bit = divmod(x, 8)
    position = (3 * bits.shape[1] + row) * bits.shape[2] + column
    extra = poke(record_bytes, "map_bits", position, bytes([band[row, column] | 1 << bit]))
    assert decode_error(extra).reason == f"record thresh_values holds {count} values for {count + 1} band pixels"


def test_the_stored_image_must_have_the_resized_size_and_the_side_must_be_sane(record_bytes):
    def shrink(header):
        spec = header["arrays"]["image"]
        spec["shape"] = [spec["shape"][0] - 1, spec["shape"][1], 3]
        spec["nbytes"] = spec["shape"][0] * spec["shape"][1] * 3

    error = decode_error(repack(record_bytes, shrink))
    width, height = decode_record(record_bytes).meta.resized_size
    assert error.reason == (f"record image shape [{height - 1}, {width}, 3], expected [{height}, {width}, 3] "
                            "(meta.resized_size)")
    error = decode_error(repack(record_bytes, lambda h: h["meta"].update(side=0)))
    assert error.reason == "record meta.side 0 is not a record side from 1 to 8192"
    error = decode_error(repack(record_bytes, lambda h: h["meta"].update(side=128)))
    assert error.reason.startswith("record meta.resized_size ")  # the image no longer spans the side
