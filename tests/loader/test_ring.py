"""Recycled batch buffers (loader.ring): a buffer is never handed out while anything still refers
to a batch in it — not in one process, not across DataLoader worker processes — and buffers are
reused once batches are dropped. The checks that would catch a reused buffer are shown to catch
one (a ring that frees buffers on hand-out corrupts kept batches, and the check sees it)."""

from __future__ import annotations

import gc
import pickle

import numpy as np
import pytest
import torch

from wds_ocr.loader import ring as ring_module
from wds_ocr.loader.ring import BufferRing, ReleaseBoard, WorkerRing
from wds_ocr.loader.loaders import make_loader
from wds_ocr.loader.stream import ShardStream


def test_a_held_lease_is_never_handed_out_again():
    ring = BufferRing()
    first = ring.acquire(1000)
    first.tensor.fill_(7)
    view = first.tensor[10:20]  # only a view of it is kept
    buffer = first.buffer
    del first
    gc.collect()
    second = ring.acquire(1000)
    assert second.buffer is not buffer
    second.tensor.fill_(9)
    assert view.tolist() == [7] * 10
    assert ring.in_use == 2
    del view
    gc.collect()
    assert ring.in_use == 1
    third = ring.acquire(500)  # the freed buffer comes back
    assert third.buffer is buffer and third.tensor.data_ptr() == buffer.tensor.data_ptr()
    assert (ring.allocations, ring.reuses) == (2, 1)


def test_numpy_views_and_slices_keep_the_buffer_too():
    ring = BufferRing()
    lease = ring.acquire(64)
    array = lease.tensor.numpy()[8:16]
    buffer = lease.buffer
    del lease
    gc.collect()
    assert ring.acquire(64).buffer is not buffer
    del array
    gc.collect()
    assert ring.acquire(64).buffer is buffer


def test_a_buffer_too_small_is_regrown_only_when_free():
    ring = BufferRing(keep=1)
    small = ring.acquire(10)
    held = ring.acquire(3 << 20)  # the only kept buffer is held: a one-off buffer, not kept
    assert held.buffer.index == -1 and held.tensor.numel() == 3 << 20
    buffer = small.buffer
    del small, held
    gc.collect()
    grown = ring.acquire(3 << 20)
    assert grown.buffer is buffer and buffer.capacity == 3 << 20


def test_the_ring_waits_for_a_device_copy_before_reusing_a_buffer():
    class Fence:
        waited = False

        def synchronize(self):
            Fence.waited = True

    ring = BufferRing()
    lease = ring.acquire(100)
    lease.fence(Fence())
    del lease
    gc.collect()
    assert not Fence.waited
    ring.acquire(100)
    assert Fence.waited


def test_the_worker_ring_reuses_only_what_the_board_shows_released():
    board = ReleaseBoard(workers=2, slots=3, capacity=1000)
    worker = WorkerRing(board, worker=1)
    leases = [worker.acquire(100) for _ in range(3)]
    assert [lease.origin for lease in leases] == [(1, 0), (1, 1), (1, 2)]
    assert board.table[1, :3].tolist() == [1, 1, 1]
    extra = worker.acquire(100)  # every slot held: a buffer of its own, outside the ring
    assert extra.origin is None
    # the main process receives batch 1 and drops it: the board frees it, and only it is reused
    leases[1].tensor[:4] = torch.tensor([1, 2, 3, 4], dtype=torch.uint8)
    received = board.receive(leases[1].origin, 100)
    assert received.data_ptr() == leases[1].tensor.data_ptr() and received[:4].tolist() == [1, 2, 3, 4]
    del received
    gc.collect()
    assert board.table[1, :3].tolist() == [1, 0, 1]
    again = worker.acquire(50)
    assert again.origin == (1, 1) and again.tensor.data_ptr() == leases[1].tensor.data_ptr()
    assert board.stats() == {"allocations": 4, "reuses": 1, "held": 3}
    too_big = worker.acquire(board.capacity + 1)  # larger than a slot: its own buffer
    assert too_big.origin is None and too_big.tensor.numel() == board.capacity + 1


def test_a_forked_worker_writes_into_the_slot_the_main_process_reads():
    """The slots are mapped before the fork: bytes a worker writes are the bytes the main process
    receives, with no shared-memory file passed per batch."""
    import multiprocessing

    board = ReleaseBoard(workers=1, slots=2, capacity=4096)

    def fill(value):
        lease = WorkerRing(board, worker=0).acquire(3000)
        lease.tensor.fill_(value)

    child = multiprocessing.get_context("fork").Process(target=fill, args=(7,))
    child.start()
    child.join(timeout=60)
    assert child.exitcode == 0
    assert board.table[0, :2].tolist() == [1, 0]  # the child's hold is on the shared table
    received = board.receive((0, 0), 3000)
    assert received.numel() == 3000 and bool((received == 7).all())
    del received
    gc.collect()
    assert board.table[0, :2].tolist() == [0, 0]


def test_a_board_without_room_for_its_slots_has_none():
    from wds_ocr.loader.ring import MAX_SLOT

    assert ReleaseBoard(workers=2, capacity=MAX_SLOT + 1).capacity == 0
    assert ReleaseBoard(workers=2, capacity=0).capacity == 0
    assert ReleaseBoard(workers=2, capacity=5).capacity == 1 << 20  # whole MiB
    board = pickle.loads(pickle.dumps(ReleaseBoard(workers=1, capacity=4096)))
    assert board.capacity == 0  # a pickled board cannot share the mapping: its worker allocates per batch
    lease = WorkerRing(board, worker=0).acquire(100)
    assert lease.origin is None and lease.tensor.numel() == 100


# --- loaders --------------------------------------------------------------------------------------


def reference(folder) -> dict[str, dict[str, np.ndarray]]:
    """Each record's member bytes as stored and its full arrays, read one by one into buffers of
    their own."""
    stream = ShardStream(folder, batch_size=1)
    out = {}
    for plan in stream.plans():
        batch = stream.read_batch(plan)
        out[batch.keys[0]] = {name: t[0].numpy().copy() for name, t in batch.tensors().items()}
        out[batch.keys[0]]["member"] = batch.packed.payload.numpy().copy()
    return out


def assert_intact(batches, expected) -> None:
    """Every kept batch still holds its own records: no buffer under them was reused."""
    for batch in batches:
        members = np.concatenate([expected[key]["member"] for key in batch.keys])
        assert np.array_equal(batch.packed.payload.numpy(), members), batch.index
        tensors = batch.tensors()
        for row, key in enumerate(batch.keys):
            for name, value in tensors.items():
                assert np.array_equal(value[row].numpy(), expected[key][name]), (batch.index, key, name)


@pytest.mark.parametrize("mode", ["threads", "processes"])
def test_kept_batches_stay_intact_while_the_loader_runs_on(uneven_shards, mode):
    expected = reference(uneven_shards)
    stream = ShardStream(uneven_shards, batch_size=2, train=True, seed=3, shuffle_block=2)
    loader = make_loader(stream, 2, mode=mode)
    kept = []
    for epoch in range(4):  # 16 batches held at once: more than a ring keeps (MAX_RING per process)
        stream.set_epoch(epoch)
        kept.extend(loader)
    assert len(kept) == 16
    assert_intact(kept, expected)


@pytest.mark.parametrize("mode", ["threads", "processes"])
def test_dropped_batches_give_their_buffers_back(uneven_shards, mode):
    stream = ShardStream(uneven_shards, batch_size=2, train=True, seed=3)
    loader = make_loader(stream, 2, mode=mode)
    seen = 0
    for epoch in range(6):
        stream.set_epoch(epoch)
        for batch in loader:
            seen += len(batch)
            del batch
    assert seen == 6 * 8
    if mode == "threads":
        allocations, reuses = loader.ring.allocations, loader.ring.reuses
    else:
        stats = loader.board.stats()
        allocations, reuses = stats["allocations"], stats["reuses"]
        assert stats["held"] == 0
    # 24 batches from at most (prefetch + held) buffers per reader; every other batch reused one
    assert allocations <= 8 and allocations + reuses == 24, (allocations, reuses)


@pytest.mark.parametrize("mode", ["threads", "processes"])
def test_the_intact_check_catches_a_ring_that_reuses_held_buffers(uneven_shards, monkeypatch, mode):
    """The same check, with rings broken on purpose: buffers freed as soon as they are handed out
    (threads), a board that never shows a worker's buffer held (processes)."""
    expected = reference(uneven_shards)
    if mode == "threads":
        original = ring_module._leased_view

        def released_at_once(base, nbytes, on_release):
            view = original(base, nbytes, lambda: None)
            on_release()
            return view

        monkeypatch.setattr(ring_module, "_leased_view", released_at_once)
    else:
        monkeypatch.setattr(ReleaseBoard, "mark", lambda self, worker, index, held: None)
    stream = ShardStream(uneven_shards, batch_size=2, train=True, seed=3, shuffle_block=2)
    kept = list(make_loader(stream, 1, mode=mode))
    with pytest.raises(AssertionError):
        assert_intact(kept, expected)


def test_batches_survive_being_moved_and_expanded_after_later_reads(uneven_shards):
    """The expansion reads the payload after the loader has moved on; it still sees its records."""
    from wds_ocr.loader.device import to_device

    expected = reference(uneven_shards)
    loader = make_loader(ShardStream(uneven_shards, batch_size=3), 2, mode="threads")
    batches = list(loader)
    for batch in reversed(batches):
        moved = to_device(batch, "cpu")
        for row, key in enumerate(batch.keys):
            assert torch.equal(moved.thresh_map[row], torch.from_numpy(expected[key]["thresh_map"]))
            assert torch.equal(moved.images[row], torch.from_numpy(expected[key]["images"]))
