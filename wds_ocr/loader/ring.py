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
loader). ``WorkerRing`` serves a DataLoader worker: its buffers are shared memory that the worker
sends to the main process, which notes on a shared ``ReleaseBoard`` when it is done with each one
(``ReleaseBoard.receive``); the worker reuses only buffers the board shows free.

A CUDA copy from a pinned buffer runs after the call that starts it returns; ``Lease.fence``
records an event the ring waits for before the buffer is written again.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch

_GRANULE = 1 << 20  # buffers are sized in whole MiB, so a slightly larger batch does not regrow one
MAX_RING = 16  # buffers a ring keeps; beyond that a batch gets a buffer of its own, not kept


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
    origin: tuple[int, int] | None = None  # (worker, ring index) of a worker's shared buffer

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
    """Which of each DataLoader worker's shared buffers the main process still holds.

    A shared int32 table made before the workers start: cell (worker, i) is 1 from the moment the
    worker hands buffer i out until the main process has dropped every reference to the batch it
    carried, then 0. The last two columns count the worker's allocations and reuses (for tests
    and benchmarks)."""

    def __init__(self, workers: int, slots: int = MAX_RING):
        self.slots = slots
        self.table = torch.zeros((max(1, workers), slots + 2), dtype=torch.int32).share_memory_()
        self._cells = self.table.numpy()
        self._mapped: dict[tuple[int, int], torch.Tensor] = {}  # main process: keeps mappings cached

    def __getstate__(self) -> dict[str, Any]:
        return {"slots": self.slots, "table": self.table}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.slots, self.table = state["slots"], state["table"]
        self._cells = self.table.numpy()
        self._mapped = {}

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

    def receive(self, payload: torch.Tensor, origin: tuple[int, int] | None) -> torch.Tensor:
        """Main process: the payload a worker sent, as a tensor whose release frees its buffer."""
        if origin is None:
            return payload
        worker, index = origin
        # Keeping the mapping means the next batch in this buffer maps no memory again (torch's
        # shared-storage cache finds it); it never makes the buffer look held.
        self._mapped[origin] = payload
        return _leased_view(payload, payload.numel(), lambda: self.mark(worker, index, False))


class WorkerRing:
    """A DataLoader worker's shared buffers, reused once the main process released them."""

    def __init__(self, board: ReleaseBoard | None, worker: int):
        self.board = board
        self.worker = worker
        self._buffers: list[torch.Tensor] = []

    def acquire(self, nbytes: int) -> Lease:
        board = self.board
        if board is None:  # a DataLoader made without make_loader: no board, allocate per batch
            return Lease(allocate(nbytes, "shared"))
        candidates = [i for i, t in enumerate(self._buffers) if board.is_free(self.worker, i)]
        fitting = [i for i in candidates if self._buffers[i].numel() >= nbytes]
        if fitting:
            index = min(fitting, key=lambda i: self._buffers[i].numel())
            board.count(self.worker, "reuse")
        else:
            board.count(self.worker, "allocation")
            if candidates:
                index = candidates[0]
                self._buffers[index] = allocate(_rounded(nbytes), "shared")
            elif len(self._buffers) < board.slots:
                index = len(self._buffers)
                self._buffers.append(allocate(_rounded(nbytes), "shared"))
            else:
                return Lease(allocate(nbytes, "shared"))
        board.mark(self.worker, index, True)
        return Lease(self._buffers[index][:nbytes], origin=(self.worker, index))


def device_fence() -> Any:
    """A CUDA event after the work queued so far on the current stream (None without CUDA)."""
    if not torch.cuda.is_available():
        return None
    event = torch.cuda.Event()
    event.record()
    return event


__all__ = ["BufferRing", "Lease", "MAX_RING", "ReleaseBoard", "WorkerRing", "allocate", "device_fence"]
