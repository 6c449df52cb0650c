"""Hostile records (issue 9, points 4 and 5): corrupt bytes on the default read path never reach a
batch, and records with hostile metadata — even in a shard whose manifest agrees with them — are
refused with shard and key by every reader (loader with on_error="skip", inspect, verify), never
crash one."""

from __future__ import annotations

import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from conftest import copy_shards, rewrite_record
from wds_ocr.config import load_config
from wds_ocr.data.geometry import valid_region
from wds_ocr.errors import IntegrityError, ShardFormatError
from wds_ocr.loader.device import content_regions
from wds_ocr.loader.loaders import make_loader
from wds_ocr.loader.stream import ShardStream
from wds_ocr.shards.inspect import inspect_shards
from wds_ocr.shards.manifest import load_manifest
from wds_ocr.shards.verify import verify_shards


def rewrite(folder: Path, key: str, edit) -> None:
    """Re-encode one record after ``edit(header, blob)``, manifest made to agree."""
    rewrite_record(folder, key, edit, with_blob=True)


def all_batches(folder: Path, **kwargs):
    stream = ShardStream(folder, batch_size=4, **kwargs)
    return stream, list(make_loader(stream, 2, mode="threads"))


@pytest.fixture
def folder(uneven_shards, tmp_path) -> Path:
    return copy_shards(uneven_shards, tmp_path / "s")


# --- corrupt bytes on the default path ---------------------------------------------------------


def test_random_byte_flips_never_reach_a_batch(folder):
    """400 flips at random places of the members: every one is an error naming its shard and key."""
    manifest = load_manifest(folder)
    stream = ShardStream(folder, batch_size=1)
    rng = np.random.default_rng(9)
    started = time.perf_counter()
    for _ in range(400):
        shard = int(rng.integers(len(manifest.shards)))
        entry = manifest.shards[shard]
        position = int(rng.integers(entry.samples))
        start, stop = entry.span(position)
        at = int(rng.integers(start, stop))
        path = folder / entry.name
        original = path.read_bytes()
        data = bytearray(original)
        data[at] ^= 1 << int(rng.integers(8))
        path.write_bytes(bytes(data))
        stream.reader.close()  # reopen: the file was rewritten
        try:
            with pytest.raises(IntegrityError) as caught:
                stream.read_member(shard, position)
        finally:
            path.write_bytes(original)
        assert (caught.value.shard, caught.value.key) == (entry.name, entry.keys[position])
        assert caught.value.reason == "bytes differ from the manifest's checksum (corrupt or replaced shard)"
    assert time.perf_counter() - started < 30


def test_same_size_pixel_replacement_is_caught_by_default(folder):
    entry = load_manifest(folder).shards[0]

    def replace_pixels(header, blob):
        spec = header["arrays"]["image"]
        blob[spec["offset"] : spec["offset"] + 300] = bytes(range(256)) + bytes(44)  # same length, other pixels

    # Edit the bytes only (the manifest still describes the build): the default checksum sees it.
    manifest_bytes = (folder / "manifest.json").read_bytes()
    rewrite(folder, entry.keys[1], replace_pixels)
    (folder / "manifest.json").write_bytes(manifest_bytes)
    with pytest.raises(Exception) as caught:  # the shard changed size? no: the tar layout is the same
        all_batches(folder)
    assert str(caught.value) == (f"{entry.name} [{entry.keys[1]}]: bytes differ from the manifest's checksum "
                                 "(corrupt or replaced shard)")
    stream, batches = all_batches(folder, on_error="skip")
    assert sum(len(b) for b in batches) == 8 and stream.policy.count == 1
    assert len(all_batches(folder, verify_hashes=False)[1]) == 3  # the explicit opt-out reads it as it is


def test_verify_hashes_setting_takes_the_check_or_the_opt_out():
    assert load_config(None, []).loader.verify_hashes is True
    assert load_config(None, ["loader.verify_hashes=sha256"]).loader.verify_hashes == "sha256"
    assert load_config(None, ["loader.verify_hashes=false"]).loader.verify_hashes is False


# --- hostile metadata, with a manifest that agrees ---------------------------------------------


def set_meta(name, value):
    def edit(header, blob):
        if value is KeyError:
            del header["meta"][name]
        else:
            header["meta"][name] = value
    return edit


HOSTILE_META = [
    (set_meta("original_size", KeyError), "record meta fields: missing ['original_size'], unknown []"),
    (set_meta("original_size", 640), "record meta.original_size must be [x, y], two integers from 1 to 16777216, got 640"),
    (set_meta("original_size", [2**40, 5]), "record meta.original_size must be [x, y], two integers from 1 to "
                                            "16777216, got [1099511627776, 5]"),
    (set_meta("original_size", [1.5, 2.5]), "record meta.original_size must be [x, y], two integers from 1 to "
                                            "16777216, got [1.5, 2.5]"),
    (set_meta("orientation", 9), "record meta.orientation 9 is not 1..8"),
    (set_meta("scale", [0.0, "x"]), "record meta.scale [0.0, 'x'] is not resized_size / original_size"),
    (set_meta("offset", [-1, 0]), "record meta.offset must be [x, y], two integers from 0 to 64, got [-1, 0]"),
    (set_meta("name", "../../etc/passwd"), "record meta.name '../../etc/passwd' is not a plain file name"),
    (set_meta("word_ids", ["a"] * 1000), "record meta.word_ids and meta.texts must list one entry per polygon"),
    (set_meta("extra", {"x": 1}), "record meta fields: missing [], unknown ['extra']"),
]


@pytest.mark.parametrize(("edit", "reason"), HOSTILE_META)
def test_hostile_metadata_is_refused_by_every_reader(folder, edit, reason):
    entry = load_manifest(folder).shards[1]
    key = entry.keys[0]
    rewrite(folder, key, edit)
    with pytest.raises(ShardFormatError) as caught:
        all_batches(folder)
    assert (caught.value.shard, caught.value.key) == (entry.name, key)
    assert caught.value.reason.startswith(reason)
    stream, batches = all_batches(folder, on_error="skip")  # skip: every other record, usable everywhere
    info = [i for b in batches for i in b.info]
    assert len(info) == 8 and stream.policy.count == 1 and stream.policy.examples[0].key == key
    assert all(valid_region(i.inverse_matrix, i.original_size)[1][0] > 0 for i in info)
    assert content_regions(info).shape == (8, 4)
    with pytest.raises(ShardFormatError) as inspected:
        inspect_shards(folder, key)
    assert inspected.value.reason == caught.value.reason
    report = verify_shards(folder)
    assert [(p.shard, p.key, p.what) for p in report.problems] == [(entry.name, key, caught.value.reason)]


def test_every_byte_flip_in_an_inverse_matrix_is_refused(folder):
    """72 bytes x 3 bits of the inverse matrix, each flipped in a record whose manifest agrees."""
    entry = load_manifest(folder).shards[0]
    key = entry.keys[0]
    original = {name: (folder / name).read_bytes() for name in ("manifest.json", entry.name)}
    refused = 0
    for byte in range(72):
        for bit in (0, 3, 6):
            def flip(header, blob, byte=byte, bit=bit):
                blob[header["arrays"]["inverse_matrix"]["offset"] + byte] ^= 1 << bit

            rewrite(folder, key, flip)
            stream = ShardStream(folder, batch_size=1)
            try:
                with pytest.raises(ShardFormatError) as caught:
                    stream.read_batch(stream.plans()[0])
            finally:
                for name, data in original.items():
                    (folder / name).write_bytes(data)
            assert caught.value.reason == ("record inverse_matrix is not the finite, invertible map back to the "
                                           "original image that meta.scale and meta.offset define")
            refused += 1
    assert refused == 216


@pytest.mark.parametrize(
    ("array", "value", "reason"),
    [
        ("thresh_values", 0x7E00, "record thresh_map holds values outside [0, 1] or not finite"),  # float16 NaN
        ("thresh_fill", 0xBC00, "record thresh_map holds values outside [0, 1] or not finite"),  # -1.0
        ("map_window", 0x7FFFFFFF, "record map_window [2147483647, "),
        ("polygons_original", 0x7FF8000000000000, "record polygons hold NaN or infinity"),
        ("left_out", 9, "record left_out holds codes other than 0..3 (max 9)"),
    ],
)
def test_hostile_array_values_are_refused(folder, array, value, reason):
    from wds_ocr.shards.inspect import read_record

    manifest = load_manifest(folder)
    entry = manifest.shards[0]
    key = next(k for k in entry.keys if read_record(folder, manifest, k)[0].arrays[array].size)  # a value to poke

    def poke(header, blob):
        spec = header["arrays"][array]
        width = {"|u1": 1, "<f2": 2, "<i4": 4, "<f8": 8}[spec["dtype"]]
        blob[spec["offset"] : spec["offset"] + width] = value.to_bytes(width, "little")

    rewrite(folder, key, poke)
    with pytest.raises(ShardFormatError) as caught:
        all_batches(folder)
    assert caught.value.key == key and caught.value.reason.startswith(reason)


def test_a_hostile_record_costs_no_large_allocation(folder):
    entry = load_manifest(folder).shards[0]

    def huge(header, blob):
        header["arrays"]["image"]["shape"] = [2**20, 2**20, 3]
        header["arrays"]["image"]["nbytes"] = 3 * 2**40

    rewrite(folder, entry.keys[0], huge)
    tracemalloc.start()
    try:
        stream, batches = all_batches(folder, on_error="skip")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert stream.policy.count == 1 and peak < 32 << 20
