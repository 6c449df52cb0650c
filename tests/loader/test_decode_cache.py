"""The loader's decode cache: a member read again with bytes that pass the manifest's checksum is
taken from its earlier validated decode, and only its compact maps' content is checked again."""

from __future__ import annotations

import dataclasses
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest

from wds_ocr.errors import IntegrityError, ShardFormatError
from wds_ocr.loader import stream as stream_module
from wds_ocr.loader.batch import pack_info, unpack_info
from wds_ocr.loader.ring import BufferRing
from wds_ocr.loader.loaders import make_loader
from wds_ocr.loader.stream import ShardStream
from wds_ocr.shards.codec import decode_record
from wds_ocr.shards.record_checks import CompactPlace, recheck_compact
from wds_ocr.shards.manifest import load_manifest
from wds_ocr.shards.tario import BLOCK

from conftest import build_small_shards


@pytest.fixture(scope="module")
def shards_128(synth_root, tmp_path_factory) -> Path:
    """The 9 synthetic train receipts at 128 px in 3 shards."""
    return build_small_shards(synth_root, tmp_path_factory.mktemp("cache") / "s", size=128, max_samples=4)


def counted_decodes(monkeypatch) -> list[str]:
    calls: list[str] = []
    real = stream_module.decode_record

    def counting(data, shard="<record>", key=None):
        calls.append(key)
        return real(data, shard, key)

    monkeypatch.setattr(stream_module, "decode_record", counting)
    return calls


def epoch(stream: ShardStream) -> list:
    """One pass, each batch's payload bytes, layouts and sample information copied out."""
    out = []
    for batch in make_loader(stream, 0, mode="threads"):
        out.append((bytes(batch.packed.payload.numpy()), batch.packed.layouts,
                    [(i.key, i.name, i.original_size, i.inverse_matrix.tolist(), [p.tolist() for p in i.polygons],
                      i.dont_care.tolist(), i.left_out.tolist()) for i in batch.info]))
    return out


def test_a_second_epoch_decodes_nothing_and_gives_the_same_batches(shards_128, monkeypatch):
    calls = counted_decodes(monkeypatch)
    stream = ShardStream(shards_128, batch_size=4)
    first = epoch(stream)
    assert len(calls) == 9 and len(stream.decoded) == 9
    second = epoch(stream)
    assert len(calls) == 9  # every member came from the cache
    assert second == first
    assert sum(len(b[2]) for b in first) == 9


@pytest.mark.parametrize("verify", [False, "sha256"])
def test_only_verified_reads_use_the_cache(shards_128, monkeypatch, verify):
    calls = counted_decodes(monkeypatch)
    stream = ShardStream(shards_128, batch_size=4, verify_hashes=verify)
    epoch(stream)
    epoch(stream)
    assert len(calls) == (18 if verify is False else 9)
    assert len(stream.decoded) == (0 if verify is False else 9)


def test_sample_information_from_the_cache_is_read_only_and_each_read_has_its_own(shards_128):
    stream = ShardStream(shards_128, batch_size=9)
    plan = stream.plans()[0]
    first = stream.read_batch(plan, ring=BufferRing())
    first.info[0].polygons = []  # a consumer's own SampleInfo: the next read is not affected
    again = stream.read_batch(plan, ring=BufferRing())
    assert len(again.info[0].polygons) > 0 and again.info[0] is not first.info[0]
    assert not hasattr(again.info[0].polygons, "clear")  # one shared, read-only sequence
    info = again.info[1]
    for array in (info.inverse_matrix, info.dont_care, info.left_out, info.polygons[0], info.polygons.points):
        assert not array.flags.writeable
        with pytest.raises(ValueError, match="read-only"):
            array[...] = 0


def test_the_cache_stops_at_its_byte_limit(shards_128, monkeypatch):
    monkeypatch.setattr(stream_module, "DECODE_CACHE_BYTES", 6000)
    calls = counted_decodes(monkeypatch)
    stream = ShardStream(shards_128, batch_size=4)
    first = epoch(stream)
    kept = len(stream.decoded)
    assert 0 < kept < 9 and stream.decoded.used <= 6000
    assert epoch(stream) == first
    assert len(calls) == 9 + (9 - kept)


def _band_bit(folder: Path) -> tuple[Path, int, str, bytes]:
    """(shard file, byte offset of a band byte with a clear bit, the member's key, its original bytes)."""
    manifest = load_manifest(folder)
    entry = manifest.shards[0]
    data = (folder / entry.name).read_bytes()
    for position, key in enumerate(entry.keys):
        start, stop = entry.span(position)
        member = data[start:stop]
        size = int(member[124:136].rstrip(b"\x00 "), 8)
        record = decode_record(member[BLOCK : BLOCK + size], entry.name, key)
        place = CompactPlace.of(record, size)
        row_bytes = (place.window_width + 7) // 8
        band = start + BLOCK + place.bits + 3 * place.window_height * row_bytes
        for at in range(band, band + place.window_height * row_bytes):
            if data[at] != 0xFF and (at - band) % row_bytes < place.window_width // 8:
                return folder / entry.name, at, key, member
    raise AssertionError("no band byte with a clear bit")


def test_bytes_that_collide_with_the_checksum_are_still_checked(shards_128, tmp_path, monkeypatch):
    folder = Path(shutil.copytree(shards_128, tmp_path / "s"))
    stream = ShardStream(folder, batch_size=9)
    epoch(stream)  # every member decoded and kept
    shard, at, key, original = _band_bit(folder)
    data = bytearray(shard.read_bytes())
    clear = ~data[at] & 0xFF
    data[at] |= clear & -clear  # set the lowest clear bit: one band pixel more than values
    shard.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="bytes differ from the manifest's checksum"):
        epoch(stream)  # what the checksum catches on its own
    # A deliberate xxh3 collision: the replaced member passes the manifest's checksum.
    real = stream_module.span_checksum
    start = load_manifest(folder).shards[0].span(load_manifest(folder).shards[0].keys.index(key))[0]
    replaced = bytes(data[start : start + len(original)])
    monkeypatch.setattr(stream_module, "span_checksum",
                        lambda span: real(original) if bytes(span) == replaced else real(span))
    calls = counted_decodes(monkeypatch)
    with pytest.raises(ShardFormatError) as caught:
        epoch(stream)
    assert key not in calls  # caught by the re-check of the kept decode, not by decoding again
    assert caught.value.shard == load_manifest(folder).shards[0].name and caught.value.key == key
    assert "record thresh_values holds" in str(caught.value) and "band pixels" in str(caught.value)
    skipping = ShardStream(folder, batch_size=9, on_error="skip")
    skipping.decoded = stream.decoded  # the same process's kept decodes
    batch = next(iter(make_loader(skipping, 0, mode="threads")))
    assert len(batch) == 8 and [s.key for s in batch.skipped] == [key]


def test_sample_information_crosses_processes_as_one_vertex_array(shards_128):
    stream = ShardStream(shards_128, batch_size=9)
    info = stream.read_batch(stream.plans()[0], ring=BufferRing()).info
    many = max(info, key=lambda i: len(i.polygons))
    assert len(many.polygons) >= 5
    _, parts = many.__reduce__()
    arrays = [part for part in parts if isinstance(part, np.ndarray)]
    assert not any(isinstance(part, list) for part in parts)  # no list of per-polygon arrays
    assert len(arrays) == 5 and arrays[1].shape == (sum(len(p) for p in many.polygons), 2)
    data = pickle.dumps(many, protocol=pickle.HIGHEST_PROTOCOL)
    back = pickle.loads(data)
    assert (back.key, back.name, back.original_size) == (many.key, many.name, many.original_size)
    assert [p.tolist() for p in back.polygons] == [p.tolist() for p in many.polygons]
    assert all(p.dtype == np.float64 and p.shape[1] == 2 for p in back.polygons)
    assert back.inverse_matrix.tolist() == many.inverse_matrix.tolist()
    assert back.dont_care.tolist() == many.dont_care.tolist() and back.left_out.tolist() == many.left_out.tolist()
    # the transcriptions travel too (CLEval counts their characters): one per polygon
    assert len(many.texts) == len(many.polygons) and all(isinstance(t, str) for t in many.texts)
    assert any(many.texts) and back.texts == many.texts
    unpacked = unpack_info(pickle.loads(pickle.dumps(pack_info(info))))
    assert [i.texts for i in unpacked] == [i.texts for i in info] and [i.key for i in unpacked] == [i.key for i in info]
    empty = pickle.loads(pickle.dumps(dataclasses.replace(many, polygons=[], dont_care=many.dont_care[:0],
                                                          left_out=many.left_out[:0])))
    assert empty.polygons == []


def test_a_member_whose_size_changed_since_its_decode_is_refused_by_name(shards_128):
    entry = load_manifest(shards_128).shards[0]
    data = (shards_128 / entry.name).read_bytes()
    start, stop = entry.span(0)
    member = data[start:stop]
    size = int(member[124:136].rstrip(b"\x00 "), 8)
    record = decode_record(member[BLOCK : BLOCK + size], entry.name, entry.keys[0])
    place = CompactPlace.of(record, size)
    with pytest.raises(ShardFormatError) as caught:
        recheck_compact(member[BLOCK : BLOCK + size - 2], place, entry.name, entry.keys[0])
    assert (caught.value.shard, caught.value.key) == (entry.name, entry.keys[0])
    assert f"record is {size - 2} bytes, {size} when it was decoded" in str(caught.value)


def test_a_member_whose_header_block_changed_is_parsed_and_decoded_again(shards_128, tmp_path, monkeypatch):
    # The kept decode is used only for the header block it was made from: a colliding member with
    # another header (here: another size field and header checksum) goes through the full checks.
    folder = Path(shutil.copytree(shards_128, tmp_path / "s"))
    stream = ShardStream(folder, batch_size=9)
    first = epoch(stream)
    entry = load_manifest(folder).shards[0]
    shard = folder / entry.name
    data = bytearray(shard.read_bytes())
    start, stop = entry.span(1)
    original = bytes(data[start:stop])
    size = int(original[124:136].rstrip(b"\x00 "), 8)
    data[start + 124 : start + 136] = b"%011o\x00" % (size - 1)  # one byte shorter; header checksum now wrong
    shard.write_bytes(bytes(data))
    real = stream_module.span_checksum
    replaced = bytes(data[start:stop])
    monkeypatch.setattr(stream_module, "span_checksum",
                        lambda span: real(original) if bytes(span) == replaced else real(span))
    calls = counted_decodes(monkeypatch)
    with pytest.raises(ShardFormatError) as caught:
        epoch(stream)
    assert (caught.value.shard, caught.value.key) == (entry.name, entry.keys[1])
    assert "header checksum mismatch (corrupt shard)" in str(caught.value)
    assert calls == []  # refused by the header's own checks, before any decode
    shard.write_bytes(bytes(data[:start]) + original + bytes(data[stop:]))
    assert epoch(stream) == first and calls == []  # the original header: the kept decodes again
