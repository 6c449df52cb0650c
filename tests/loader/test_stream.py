"""The streaming loader: exact splitting, equal batches, resume, integrity, safety, HTTP, memory."""

from __future__ import annotations

import gc
from collections import Counter
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch

from wds_ocr.errors import IntegrityError, ManifestError, ShardFormatError
from wds_ocr.loader.loaders import make_loader
from wds_ocr.loader.stream import ShardStream
from wds_ocr.shards.inspect import read_record
from wds_ocr.shards.manifest import load_manifest
from wds_ocr.shards.tario import BLOCK

from conftest import build_small_shards, copy_shards, rewrite_record


def all_keys(folder: Path) -> list[str]:
    return [k for entry in load_manifest(folder).shards for k in entry.keys]


def run_rank(folder, rank, world, workers, train=False, batch=2, **kwargs) -> list[list[str]]:
    stream = ShardStream(folder, batch_size=batch, train=train, rank=rank, world_size=world, **kwargs)
    return [b.keys for b in make_loader(stream, workers, mode="processes")]


@pytest.mark.parametrize("layout", ["uneven_shards", "single_shard"])
@pytest.mark.parametrize("workers", [0, 1, 2])
def test_evaluation_covers_every_sample_once_for_any_ranks_and_workers(layout, workers, request):
    folder = request.getfixturevalue(layout)
    expected = all_keys(folder)
    assert len(expected) == 9
    for world in (1, 2, 3):
        seen = []
        for rank in range(world):
            batches = run_rank(folder, rank, world, workers)
            keys = [k for b in batches for k in b]
            assert keys == expected[rank::world], (world, rank)  # deterministic manifest order
            seen += keys
        assert Counter(seen) == Counter(expected)


def test_order_does_not_depend_on_worker_count(uneven_shards):
    runs = [run_rank(uneven_shards, 1, 2, workers, train=True, seed=11, shuffle_block=2) for workers in (0, 1, 2)]
    assert runs[0] == runs[1] == runs[2]
    assert len(runs[0]) == 2  # 9 samples padded to 10, 5 per rank, 2 full batches of 2


@pytest.mark.parametrize("world", [2, 3])
def test_training_gives_equal_full_batches_per_rank(uneven_shards, world):
    counts = []
    for rank in range(world):
        batches = run_rank(uneven_shards, rank, world, 2, train=True, seed=1)
        assert all(len(b) == 2 for b in batches)
        counts.append(len(batches))
    assert len(set(counts)) == 1 and counts[0] == (-(-9 // world)) // 2


def test_resume_continues_the_same_sequence(uneven_shards):
    stream = ShardStream(uneven_shards, batch_size=1, train=True, seed=4, shuffle_block=3)
    stream.set_epoch(2)
    full = [b.keys for b in make_loader(stream, 2, mode="processes")]
    stream.set_epoch(2, start_batch=5)
    resumed = [b.keys for b in make_loader(stream, 2, mode="processes")]
    assert resumed == full[5:]
    assert len(full) == 9
    stream.set_epoch(3)
    assert [b.keys for b in make_loader(stream, 0, mode="processes")] != full


def test_batches_hold_exactly_the_records(uneven_shards):
    manifest = load_manifest(uneven_shards)
    stream = ShardStream(uneven_shards, batch_size=4)
    batch = next(iter(make_loader(stream, 1, mode="processes")))
    assert batch.images.shape == (4, 64, 64, 3) and batch.images.dtype == torch.uint8
    assert batch.thresh_map.dtype == torch.float16 and batch.gt.shape == (4, 64, 64)
    for row, key in enumerate(batch.keys):
        record, _ = read_record(uneven_shards, manifest, key)
        full = record.expand()
        assert batch.images[row].numpy().tobytes() == full["image"].tobytes()
        for name in ("gt", "mask", "thresh_map", "thresh_mask"):
            assert getattr(batch, name)[row].numpy().tobytes() == full[name].tobytes(), name
        info = batch.info[row]
        assert info.name == record.meta.name
        assert np.array_equal(info.inverse_matrix, record.arrays["inverse_matrix"])
        assert all(np.array_equal(a, b) for a, b in zip(info.polygons, record.polygons("polygons_original")))


# --- hostile and damaged shards ---------------------------------------------------------------


def patch_header_name(shard: Path, offset: int, name: str) -> None:
    data = bytearray(shard.read_bytes())
    header = data[offset : offset + BLOCK]
    header[0:100] = name.encode().ljust(100, b"\x00")
    header[148:156] = b" " * 8
    header[148:156] = f"{sum(header):06o}\x00 ".encode()
    data[offset : offset + BLOCK] = header
    shard.write_bytes(bytes(data))


def first_batch(folder: Path, **kwargs):
    return next(iter(make_loader(ShardStream(folder, batch_size=9, **kwargs), 0, mode="processes")))


def test_pickle_member_is_refused(uneven_shards, tmp_path):
    folder = copy_shards(uneven_shards, tmp_path / "s")
    entry = load_manifest(folder).shards[0]
    patch_header_name(folder / entry.name, entry.offsets[1], f"{entry.keys[1]}.pickle")
    with pytest.raises(IntegrityError):  # the default checksum sees the edited header first
        first_batch(folder)
    with pytest.raises(ShardFormatError) as caught:  # and without it the header check still refuses
        first_batch(folder, verify_hashes=False)
    assert str(caught.value) == (
        f"shard-000000.tar [{entry.keys[1]}]: member extension 'pickle' refused: only .msgpack records are read "
        "(never pickle or other formats)"
    )


def test_parent_path_member_is_refused(uneven_shards, tmp_path):
    folder = copy_shards(uneven_shards, tmp_path / "s")
    entry = load_manifest(folder).shards[1]
    patch_header_name(folder / entry.name, entry.offsets[0], f"../{entry.keys[0]}.msgpack")
    with pytest.raises(ShardFormatError, match=r"shard-000001.tar \[\w+\]: member at byte 0: path '\.\./.*' is not a flat member name"):
        first_batch(folder, verify_hashes=False)


def test_oversized_declared_shape_is_refused_before_allocation(uneven_shards, tmp_path):
    folder = copy_shards(uneven_shards, tmp_path / "s")
    key = load_manifest(folder).shards[2].keys[0]

    def huge(header):
        header["arrays"]["image"]["shape"] = [2**30, 2**30, 3]
        header["arrays"]["image"]["nbytes"] = 3 * 2**60

    rewrite_record(folder, key, huge)
    with pytest.raises(ShardFormatError) as caught:
        first_batch(folder)
    assert caught.value.key == key
    assert "array image: bytes 0..3458764513820540928 lie beyond the" in caught.value.reason


def test_shape_that_disagrees_with_bytes_is_refused(uneven_shards, tmp_path):
    folder = copy_shards(uneven_shards, tmp_path / "s")
    key = load_manifest(folder).shards[0].keys[2]
    rewrite_record(folder, key, lambda h: h["arrays"]["map_window"].__setitem__("shape", [5]))
    with pytest.raises(ShardFormatError, match=r"array map_window: shape \[5\] x 4 bytes != declared 16 bytes"):
        first_batch(folder)


def test_skip_policy_reports_and_shrinks_the_batch(uneven_shards, tmp_path):
    folder = copy_shards(uneven_shards, tmp_path / "s")
    key = load_manifest(folder).shards[0].keys[2]
    rewrite_record(folder, key, lambda h: h.__setitem__("version", 99))
    batch = first_batch(folder, on_error="skip")
    assert len(batch) == 8 and key not in batch.keys
    assert batch.skipped == [("shard-000000.tar", key, "record version 99 is not supported (this code reads 3); "
                                                       "rebuild the shards or upgrade wds-ocr")]


def test_streaming_hash_check_names_shard_and_key(uneven_shards, tmp_path):
    folder = copy_shards(uneven_shards, tmp_path / "s")
    entry = load_manifest(folder).shards[1]
    shard = folder / entry.name
    record, _ = read_record(folder, load_manifest(folder), entry.keys[3])
    data = bytearray(shard.read_bytes())
    data[entry.offsets[3] + BLOCK + record.offsets["image"] + 100] ^= 0x01  # a pixel: decodes fine, hash does not
    shard.write_bytes(bytes(data))
    assert len(first_batch(folder, verify_hashes=False)) == 9  # unchecked (the opt-out): the flip goes unnoticed
    for verify, what in ((True, "checksum"), ("sha256", "sha256")):  # the default, and the full digest
        with pytest.raises(IntegrityError) as caught:
            first_batch(folder, verify_hashes=verify)
        assert (caught.value.shard, caught.value.key) == ("shard-000001.tar", entry.keys[3])
        assert caught.value.reason == f"bytes differ from the manifest's {what} (corrupt or replaced shard)"


# --- HTTP ---------------------------------------------------------------------------------------


def test_http_streaming_equals_local(uneven_shards, serve_folder):
    url = serve_folder(uneven_shards)
    local = run_rank(uneven_shards, 0, 1, 0, train=True, seed=2)
    remote = run_rank(url, 0, 1, 2, train=True, seed=2, verify_hashes=True)
    assert remote == local
    batch_local = first_batch(uneven_shards)
    batch_remote = first_batch(url + "manifest.json")
    assert torch.equal(batch_local.images, batch_remote.images)
    assert torch.equal(batch_local.thresh_map, batch_remote.thresh_map)


def test_corrupted_served_shard_is_caught(uneven_shards, serve_folder, tmp_path):
    folder = copy_shards(uneven_shards, tmp_path / "served")
    entry = load_manifest(folder).shards[0]
    data = bytearray((folder / entry.name).read_bytes())
    data[entry.offsets[1] + BLOCK + 2000] ^= 0xFF
    (folder / entry.name).write_bytes(bytes(data))
    url = serve_folder(folder)
    with pytest.raises(IntegrityError, match=rf"shard-000000.tar \[{entry.keys[1]}\]: bytes differ from the manifest"):
        run_rank(url, 0, 1, 0)  # the default check


def test_missing_remote_manifest_is_a_clear_error(serve_folder, tmp_path):
    url = serve_folder(tmp_path)
    with pytest.raises(ManifestError, match=r"cannot fetch http://127.0.0.1:\d+/manifest.json: GET "
                                            r"http://127.0.0.1:\d+/manifest.json: HTTP 404 Not Found$"):
        ShardStream(url, batch_size=1)


# --- memory -------------------------------------------------------------------------------------


def test_rss_stays_flat_over_five_epochs(synth_root, tmp_path):
    folder = build_small_shards(synth_root, tmp_path / "big", size=512, max_samples=4)
    stream = ShardStream(folder, batch_size=1, train=True, seed=0)
    process = psutil.Process()
    rss = []
    for epoch in range(5):
        stream.set_epoch(epoch)
        count = 0
        for batch in make_loader(stream, 0, mode="processes"):
            count += len(batch)
        assert count == 9
        del batch
        gc.collect()
        rss.append(process.memory_info().rss)
    per_epoch = sum(entry.members_end for entry in stream.manifest.shards)  # the compact records streamed
    # Anything kept per batch would add what an epoch streams (plus its CPU expansion if kept); the
    # allocator's own caching moves RSS by a few batches at most.
    growth = rss[-1] - rss[0]
    assert growth < per_epoch // 2, f"RSS grew by {growth / 1e6:.1f} MB over epochs 1-5: {[r // 10**6 for r in rss]}"


@pytest.mark.parametrize("threads", [1, 3])
def test_threaded_loader_yields_the_same_batches_as_dataloader_workers(uneven_shards, threads):
    stream = ShardStream(uneven_shards, batch_size=2, train=True, seed=9, shuffle_block=2)
    stream.set_epoch(1)
    processes = list(make_loader(stream, 2, mode="processes"))
    threaded = list(make_loader(stream, threads, mode="threads"))
    assert [b.keys for b in threaded] == [b.keys for b in processes]
    assert all(torch.equal(a.images, b.images) and torch.equal(a.thresh_map, b.thresh_map)
               for a, b in zip(threaded, processes))
    stream.set_epoch(1, start_batch=3)
    assert [b.keys for b in make_loader(stream, threads, mode="threads")] == [b.keys for b in processes[3:]]


def test_unknown_loader_mode_is_refused(uneven_shards):
    with pytest.raises(ValueError, match="loader mode must be 'threads' or 'processes', got 'gpu'"):
        make_loader(ShardStream(uneven_shards, batch_size=2), 1, mode="gpu")


def test_file_url_and_manifest_path_read_the_same_shards(uneven_shards):
    expected = run_rank(uneven_shards, 0, 1, 0)
    assert run_rank(f"file://{uneven_shards}", 0, 1, 0) == expected
    assert run_rank(uneven_shards / "manifest.json", 0, 1, 0) == expected


# --- one copy from file to batch -----------------------------------------------------------------


@pytest.fixture(scope="module")
def one_shard_256(synth_root, tmp_path_factory) -> Path:
    """The 9 train receipts at 256x256 in one shard (members of ~60-180 kB)."""
    return build_small_shards(synth_root, tmp_path_factory.mktemp("s256") / "s", size=256, max_samples=100)


def read_twice_traced(stream: ShardStream):
    """The first plan's batch read into a warm ring buffer, and the peak of Python allocations."""
    import tracemalloc

    from wds_ocr.loader.ring import BufferRing

    ring = BufferRing()
    plan = stream.plans()[0]
    del stream.read_batch(plan, ring=ring).packed  # warm: the ring's buffer exists, code paths are imported
    tracemalloc.start()
    try:
        batch = stream.read_batch(plan, ring=ring)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return plan, batch, peak, ring


def stored_members(folder: Path, plan) -> tuple[bytes, int]:
    """The plan's members exactly as stored in the shard, back to back, and the smallest's size."""
    entry = load_manifest(folder).shards[0]
    data = (folder / entry.name).read_bytes()
    spans = [entry.span(ref.position) for ref in plan.samples]
    return b"".join(data[a:b] for a, b in spans), min(b - a for a, b in spans)


def test_local_members_land_in_the_batch_buffer_with_no_copy_in_between(one_shard_256, monkeypatch):
    from wds_ocr.storage.local import LocalReader

    monkeypatch.setattr(LocalReader, "read", lambda *a, **k: pytest.fail("read through an intermediate bytes object"))
    stream = ShardStream(one_shard_256, batch_size=4)
    plan, batch, peak, ring = read_twice_traced(stream)
    expected, smallest = stored_members(one_shard_256, plan)
    # the payload is the members as stored (tar header, record, padding), in the ring's buffer
    assert batch.packed.payload.numpy().tobytes() == expected
    assert batch.lease.buffer is not None and batch.packed.payload.data_ptr() == batch.lease.buffer.tensor.data_ptr()
    assert (ring.allocations, ring.reuses) == (1, 1)
    # nothing of a member's size was allocated on the way (a pread into bytes would be: the peak
    # would pass the smallest member); what is allocated is the samples' metadata (SampleInfo)
    assert peak < smallest, (peak, smallest)
    assert len(batch) == 4 and [layout.image % 64 for layout in batch.packed.layouts] == [0, 0, 0, 0]


def test_http_bodies_land_in_the_batch_buffer_as_they_arrive(one_shard_256, monkeypatch):
    from wds_ocr.bench.http import python_server
    from wds_ocr.storage.http import HttpReader

    with python_server(one_shard_256) as url:  # bodies sent with os.sendfile: no allocation server-side
        stream = ShardStream(url, batch_size=4)
        monkeypatch.setattr(HttpReader, "read", lambda *a, **k: pytest.fail("read through an intermediate bytes object"))
        plan, batch, peak, _ = read_twice_traced(stream)
    expected, smallest = stored_members(one_shard_256, plan)
    assert batch.packed.payload.numpy().tobytes() == expected
    assert peak < smallest, (peak, smallest)  # as for local reads: no member-sized allocation
    local = ShardStream(one_shard_256, batch_size=4).read_batch(plan)
    assert batch.keys == local.keys and torch.equal(batch.thresh_map, local.thresh_map)


@pytest.mark.parametrize("parallel", [1, 4])
def test_a_shuffled_batch_keeps_its_range_requests_in_flight_together(one_shard_256, parallel):
    """Training order makes one request per member; they overlap up to remote.parallel_requests
    (a server answering each after 0.2 s shows how many were open at once), and the batch is
    the local one, byte for byte."""
    import threading
    import time

    from wds_ocr.bench.http import RangeHandler, RangeServer
    from wds_ocr.storage.reader import RemoteSettings

    lock, state = threading.Lock(), {"open": 0, "most": 0, "requests": 0}

    class Slow(RangeHandler):
        def do_GET(self) -> None:
            with lock:
                state["open"] += 1
                state["most"] = max(state["most"], state["open"])
                state["requests"] += 1
            try:
                time.sleep(0.2)
                super().do_GET()
            finally:
                with lock:
                    state["open"] -= 1

    server = RangeServer(one_shard_256)
    server.RequestHandlerClass = Slow
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        remote = ShardStream(server.url, batch_size=8, train=True, seed=3,
                             remote=RemoteSettings(parallel_requests=parallel))
        plan = remote.plans()[0]
        runs = sum(1 for i, ref in enumerate(plan.samples)
                   if i == 0 or (ref.shard, ref.position) != (plan.samples[i - 1].shard, plan.samples[i - 1].position + 1))
        assert runs >= 6  # shuffled: mostly one request per member
        state.update(most=0, requests=0)
        batch = remote.read_batch(plan)
    finally:
        server.shutdown()
        server.server_close()
    assert state["requests"] == runs
    assert state["most"] == (1 if parallel == 1 else 4)
    local = ShardStream(one_shard_256, batch_size=8, train=True, seed=3).read_batch(plan)
    assert batch.keys == local.keys
    assert batch.packed.payload.numpy().tobytes() == local.packed.payload.numpy().tobytes()


def test_the_loader_section_travels_whole_and_make_loader_follows_it(uneven_shards):
    """ShardStream takes the config's loader section; make_loader uses its mode and workers unless
    given; keyword settings are checked as the config checks them."""
    from wds_ocr.config import LoaderConfig
    from wds_ocr.loader.loaders import ProcessLoader, ThreadedLoader

    section = LoaderConfig(batch_size=3, mode="processes", workers=1, seed=5, shuffle_block=2, on_error="skip",
                           verify_hashes="sha256")
    stream = ShardStream(uneven_shards, section, train=True)
    assert (stream.batch_size, stream.seed, stream.shuffle_block, stream.verify, stream.on_error) == (
        3, 5, 2, "sha256", "skip")
    assert stream.loader is section
    loader = make_loader(stream)
    assert isinstance(loader, ProcessLoader) and loader.loader.num_workers == 1
    threaded = make_loader(stream, 2, mode="threads")
    assert isinstance(threaded, ThreadedLoader) and threaded.threads == 2
    assert [b.keys for b in loader] == [b.keys for b in threaded]
    default = make_loader(ShardStream(uneven_shards))  # the config's defaults: threads, 2 workers, batches of 8
    assert isinstance(default, ThreadedLoader) and default.threads == LoaderConfig().workers == 2
    assert default.stream.batch_size == 8
    changed = ShardStream(uneven_shards, section, batch_size=2)
    assert (changed.batch_size, changed.seed, section.batch_size) == (2, 5, 3)
    with pytest.raises(TypeError, match="batch, verify: not loader settings"):
        ShardStream(uneven_shards, batch=2, verify=False)
    with pytest.raises(ValueError, match="batch_size"):
        ShardStream(uneven_shards, batch_size=0)
