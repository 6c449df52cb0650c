"""Batch buffers that are recycled instead of allocated per batch, and never handed out in use.

A batch's records are read straight into one buffer (``ShardStream.read_batch``). Allocating it
per batch is expensive where it matters: shared memory for DataLoader workers (``shm_open`` +
``mmap`` + first-touch page faults: ~10 ms per 13 MB batch) and pinned memory for CUDA copies
(``cudaHostAlloc``). So buffers live in rings and come back when the batch is done with.

*Done with* is decided by lifetime, not by a promise: a buffer is handed out as a ``Lease`` whose
``tensor`` is the only way to its bytes; when that tensor and every view made from it are gone,
the buffer goes back to its ring. A consumer that keeps batches (``list(loader)``) keeps their
buffers, and the ring allocates others; one that drops each batch gets the same few buffers
again and again. Nothing is handed out while something still refers to it.

``BufferRing`` serves one process (the thread loader, and the main process of the worker
loader). ``WorkerRing`` serves a DataLoader worker: its buffers are slots of a shared mapping that
the main process made before the workers were forked (``ReleaseBoard``), so both sides already
see every slot and a batch crosses to the main process as (worker, slot, bytes) plus its
metadata: no shared-memory file is created, passed or mapped per batch. The main process notes
on the board when it has dropped each batch (``ReleaseBoard.receive``), and the worker reuses
only slots the board shows free. The mapping is anonymous shared memory, committed page by page
as slots are first written (lowest free slot first, so a worker touches only as many as it has
batches in flight), and it does not count against a small /dev/shm.

A CUDA copy from a pinned buffer runs after the call that starts it returns; ``Lease.fence``
records an event the ring waits for before the buffer is written again.
"""

from __future__ import annotations

import mmap
import os
import threading
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch

_GRANULE = 1 << 20  # buffers are sized in whole MiB, so a slightly larger batch does not regrow one
MAX_RING = 16  # buffers a ring keeps; beyond that a batch gets a buffer of its own, not kept
# The largest batch a worker slot holds. A bigger batch (or a platform without fork) gets a shared
# buffer of its own per batch, sent the way torch sends any shared tensor.
MAX_SLOT = 256 << 20


def _rounded(nbytes: int) -> int:
    return max(_GRANULE, -(-nbytes // _GRANULE) * _GRANULE)


@dataclass(eq=False)
class _Buffer:
    tensor: torch.Tensor  # uint8, its whole capacity
    index: int  # position in the ring; -1: a one-off buffer, not kept
    fence: Any = None  # an event to wait for before writing (a device copy in flight)
    leased: bool = False

    @property
    def capacity(self) -> int:
        return self.tensor.numel()

    def wait(self) -> None:
        if self.fence is not None:
            self.fence.synchronize()
            self.fence = None


@dataclass(eq=False)
class Lease:
    """One batch's hold on a buffer: ``tensor`` (uint8, the bytes asked for) is the only way to
    them; the buffer is released when it and all its views are gone."""

    tensor: torch.Tensor
    buffer: _Buffer | None = field(default=None, repr=False)
    origin: tuple[int, int] | None = None  # (worker, slot) of a worker's board slot

    def fence(self, event: Any) -> None:
        """Make the ring wait for ``event`` (a device copy from this buffer) before reusing it."""
        if self.buffer is not None:
            self.buffer.fence = event


def allocate(nbytes: int, where: str) -> torch.Tensor:
    """A uint8 buffer of ``nbytes``: ``plain``, ``pinned`` (CUDA host memory) or ``shared`` memory."""
    if where == "shared":
        storage = torch.UntypedStorage._new_shared(nbytes)
        return torch.empty(0, dtype=torch.uint8).set_(storage, 0, (nbytes,), (1,))
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=where == "pinned")


def _leased_view(base: torch.Tensor, nbytes: int, on_release) -> torch.Tensor:
    """A tensor over ``base[:nbytes]`` whose last reference, when dropped, calls ``on_release``.

    The tensor is made from a fresh numpy array object over the bytes; torch keeps that object
    alive as long as the tensor's storage lives (every view shares the storage), so its
    finalizer runs exactly when nothing refers to the bytes any more."""
    holder = base.numpy()[:nbytes]
    weakref.finalize(holder, on_release)
    return torch.from_numpy(holder)


class BufferRing:
    """Recycled batch buffers for one process: ``plain``, ``pinned`` (CUDA host memory) or
    ``shared`` memory. Thread safe."""

    def __init__(self, where: str = "plain", keep: int = MAX_RING):
        if where not in ("plain", "pinned", "shared"):
            raise ValueError(f"buffer kind must be plain, pinned or shared, got {where!r}")
        self.where = where
        self.keep = keep
        self._buffers: list[_Buffer] = []
        self._lock = threading.Lock()
        self.allocations = 0  # buffers allocated (kept or not)
        self.reuses = 0  # leases served by a buffer allocated before

    @property
    def in_use(self) -> int:
        with self._lock:
            return sum(b.leased for b in self._buffers)

    def acquire(self, nbytes: int) -> Lease:
        """A lease on at least ``nbytes`` bytes no one else refers to."""
        with self._lock:
            buffer = self._pick(nbytes)
            buffer.leased = True
        buffer.wait()
        return Lease(_leased_view(buffer.tensor, nbytes, lambda: self._release(buffer)), buffer)

    def _pick(self, nbytes: int) -> _Buffer:
        free = [b for b in self._buffers if not b.leased]
        fitting = [b for b in free if b.capacity >= nbytes]
        if fitting:
            self.reuses += 1
            return min(fitting, key=lambda b: b.capacity)
        self.allocations += 1
        if free:  # regrow the largest free buffer rather than keep one more
            buffer = max(free, key=lambda b: b.capacity)
            buffer.wait()
            buffer.tensor = allocate(_rounded(nbytes), self.where)
            return buffer
        if len(self._buffers) < self.keep:
            buffer = _Buffer(allocate(_rounded(nbytes), self.where), len(self._buffers))
            self._buffers.append(buffer)
            return buffer
        return _Buffer(allocate(nbytes, self.where), -1)

    def _release(self, buffer: _Buffer) -> None:
        with self._lock:
            buffer.leased = False


class ReleaseBoard:
    """The main process's shared table of DataLoader worker buffers, made before the workers start.

    ``slots`` buffers of ``capacity`` bytes per worker, in one anonymous shared mapping per worker
    (``capacity`` 0, or more than ``MAX_SLOT``, or no fork: none; workers then allocate a shared
    buffer per batch). A shared int32 table says which are held: cell (worker, i) is 1 from the
    moment the worker hands slot i out until the main process has dropped every reference to the
    batch it carried, then 0. The last two columns count each worker's first uses of a slot
    (allocations) and later uses (reuses), for tests and benchmarks."""

    def __init__(self, workers: int, slots: int = MAX_RING, capacity: int = 0):
        self.slots = slots
        self.table = torch.zeros((max(1, workers), slots + 2), dtype=torch.int32).share_memory_()
        self._cells = self.table.numpy()
        self.capacity = _rounded(capacity) if 0 < capacity <= MAX_SLOT and hasattr(os, "fork") else 0
        self._regions: list[torch.Tensor] = []
        if self.capacity:
            try:
                self._regions = [_shared_region(slots * self.capacity) for _ in range(max(1, workers))]
            except OSError:  # no room to map them: fall back to a buffer per batch
                self.capacity = 0

    def __getstate__(self) -> dict[str, Any]:
        # A pickled board (a worker started without fork) cannot share the mappings: its workers
        # allocate per batch.
        return {"slots": self.slots, "table": self.table}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.slots, self.table = state["slots"], state["table"]
        self._cells = self.table.numpy()
        self.capacity, self._regions = 0, []

    def slot(self, worker: int, index: int, nbytes: int) -> torch.Tensor:
        """The first ``nbytes`` of a slot (both processes see the same bytes)."""
        if not 0 <= nbytes <= self.capacity or not 0 <= index < self.slots:
            raise ValueError(f"no slot {index} of {nbytes} bytes (slots {self.slots} of {self.capacity} bytes)")
        start = index * self.capacity
        return self._regions[worker][start : start + nbytes]

    def is_free(self, worker: int, index: int) -> bool:
        return int(self._cells[worker, index]) == 0

    def mark(self, worker: int, index: int, held: bool) -> None:
        self._cells[worker, index] = 1 if held else 0

    def count(self, worker: int, what: str) -> None:
        self._cells[worker, self.slots + (0 if what == "allocation" else 1)] += 1

    def stats(self) -> dict[str, int]:
        cells = self._cells
        return {"allocations": int(cells[:, self.slots].sum()), "reuses": int(cells[:, self.slots + 1].sum()),
                "held": int(cells[:, : self.slots].sum())}

    def receive(self, origin: tuple[int, int], nbytes: int) -> torch.Tensor:
        """Main process: a worker's batch bytes, as a tensor whose release frees its slot."""
        worker, index = origin
        return _leased_view(self.slot(worker, index, nbytes), nbytes, lambda: self.mark(worker, index, False))


def _shared_region(nbytes: int) -> torch.Tensor:
    """A uint8 tensor over anonymous shared memory that processes forked later also map."""
    region = mmap.mmap(-1, nbytes, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_ANONYMOUS", 0x20))
    return torch.frombuffer(region, dtype=torch.uint8)


class WorkerRing:
    """A DataLoader worker's buffers: the board's slots for it, reused once the main process
    released them (the lowest free slot first)."""

    def __init__(self, board: ReleaseBoard | None, worker: int):
        self.board = board
        self.worker = worker
        self._used: set[int] = set()

    def acquire(self, nbytes: int) -> Lease:
        board = self.board
        if board is None:
            return Lease(allocate(nbytes, "shared"))
        if nbytes <= board.capacity:
            for index in range(board.slots):
                if board.is_free(self.worker, index):
                    board.count(self.worker, "reuse" if index in self._used else "allocation")
                    self._used.add(index)
                    board.mark(self.worker, index, True)
                    return Lease(board.slot(self.worker, index, nbytes), origin=(self.worker, index))
        # No slots, too small ones, or every slot held (a consumer keeping batches): a buffer of
        # its own, sent as any shared tensor is.
        board.count(self.worker, "allocation")
        return Lease(allocate(nbytes, "shared"))


def device_fence() -> Any:
    """A CUDA event after the work queued so far on the current stream (None without CUDA)."""
    if not torch.cuda.is_available():
        return None
    event = torch.cuda.Event()
    event.record()
    return event


__all__ = ["BufferRing", "Lease", "MAX_RING", "ReleaseBoard", "WorkerRing", "allocate", "device_fence"]
