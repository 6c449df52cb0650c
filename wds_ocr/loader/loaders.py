"""Loaders over a ``ShardStream``: reader threads in this process, or DataLoader worker processes.

``make_loader(stream)`` picks one by the stream's ``loader.mode`` and ``loader.workers``; both
yield the same batches in the same order.
"""

from __future__ import annotations

import itertools
import os
import threading
from collections import deque
from typing import Any, Iterator

import numpy as np
import torch

from wds_ocr.loader.batch import Batch
from wds_ocr.loader.ring import BufferRing, Lease, ReleaseBoard
from wds_ocr.loader.stream import ShardStream, WorkerFailure

__all__ = ["ProcessLoader", "ThreadedLoader", "largest_batch", "make_loader"]


class ThreadedLoader:
    """Batches read by a pool of threads in the main process, in plan order.

    The per-sample work is a positioned read into the batch buffer plus a checksum, both of which
    release the GIL, so threads scale without worker processes: batches need no shared-memory
    transfer, and their buffers (pinned when CUDA is present) come from a ring kept across epochs.
    """

    def __init__(self, stream: ShardStream, threads: int = 2, prefetch: int = 2):
        self.stream = stream
        self.threads = max(1, threads)
        self.depth = max(1, threads * prefetch)
        self.ring = BufferRing("pinned" if torch.cuda.is_available() else "plain")

    def __len__(self) -> int:
        return len(self.stream)

    def __iter__(self) -> Iterator[Batch]:
        from concurrent.futures import ThreadPoolExecutor

        self.stream.check_unchanged(local_only=True)
        plans = iter(self.stream.plans())
        cancel = threading.Event()
        pool = ThreadPoolExecutor(self.threads, thread_name_prefix="wds-ocr-read")
        read = self.stream.read_batch
        ring = self.ring
        try:
            pending = deque(pool.submit(read, plan, "plain", cancel, ring) for plan in itertools.islice(plans, self.depth))
            while pending:
                batch = pending.popleft().result()
                plan = next(plans, None)
                if plan is not None:
                    pending.append(pool.submit(read, plan, "plain", cancel, ring))
                self.stream.policy.tally(batch.skipped)
                yield batch
                del batch  # the consumer's reference is the only one: its buffer returns when it drops it
        finally:
            # An error, or a consumer that stopped early: do not wait for the reads in flight (a slow
            # server could hold them until their deadlines); cancelling shuts their sockets down.
            cancel.set()
            pool.shutdown(wait=False, cancel_futures=True)


class ProcessLoader:
    """A DataLoader over worker processes that re-raises a worker's package error as itself (the
    DataLoader alone would turn it into a RuntimeError holding the worker's traceback as text),
    tallies skips in the main process, and releases each worker buffer on the shared board once
    nothing in this process refers to its batch (with CUDA: once it is copied into a pinned buffer
    of this process's ring)."""

    def __init__(self, stream: ShardStream, loader: torch.utils.data.DataLoader, board: ReleaseBoard | None = None):
        self.stream = stream
        self.loader = loader
        self.board = board
        self.pinned = BufferRing("pinned") if torch.cuda.is_available() and loader.num_workers else None

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Batch]:
        if self.board is not None:
            self.stream.board = self.board  # the workers (forked at the first iteration) inherit it
        for item in self.loader:
            if isinstance(item, WorkerFailure):
                raise item.error
            if self.loader.num_workers:
                self.stream.policy.tally(item.skipped)
                self._receive(item)
            yield item
            del item

    def _receive(self, batch: Batch) -> None:
        """Make ``batch`` hold its worker buffer by a lease that frees it on the board."""
        if batch.packed is None or batch.lease is None or batch.lease.origin is None:
            return
        payload = self.board.receive(batch.lease.origin, batch.packed.nbytes)
        lease = Lease(payload)
        if self.pinned is not None:
            lease = self.pinned.acquire(payload.numel())
            lease.tensor.copy_(payload)
            payload = lease.tensor
        batch.packed.payload = payload
        batch.lease = lease


def largest_batch(stream: ShardStream) -> int:
    """Bytes of the largest batch ``stream`` can read: its batch size's largest manifest members."""
    sizes = [np.diff(np.array([*entry.offsets[: entry.samples], entry.members_end], dtype=np.int64))
             for entry in stream.manifest.shards if entry.samples]
    if not sizes:
        return 0
    sizes = np.sort(np.concatenate(sizes))
    return int(sizes[-stream.batch_size:].sum())


def make_loader(stream: ShardStream, workers: int | None = None, *, mode: str | None = None, prefetch: int = 2):
    """An iterable of Batches for ``stream``, by its loader section (``loader.mode``,
    ``loader.workers``) unless ``workers`` or ``mode`` is given.

    ``mode="threads"``: a ThreadedLoader with ``workers`` threads in this process — no
    shared-memory hand-off, the faster choice for this loader's read-into-place work (see
    docs/BENCHMARKS.md). ``mode="processes"``: a torch DataLoader over ready-made batches
    (batch_size=None); ``workers`` worker processes persist across epochs (``stream.set_epoch``
    reaches them through shared memory) and recycle a ring of shared buffers each. Both yield the
    same batches in the same order.
    """
    workers = stream.loader.workers if workers is None else workers
    mode = stream.loader.mode if mode is None else mode
    if mode == "threads":
        return ThreadedLoader(stream, threads=max(1, workers), prefetch=prefetch)
    if mode != "processes":
        raise ValueError(f"loader mode must be 'threads' or 'processes', got {mode!r}")
    kwargs: dict[str, Any] = {}
    board = None
    if workers > 0:
        kwargs.update(prefetch_factor=prefetch, multiprocessing_context="fork" if os.name == "posix" else None)
        board = ReleaseBoard(workers, capacity=largest_batch(stream))
    return ProcessLoader(stream, torch.utils.data.DataLoader(
        stream, batch_size=None, num_workers=workers, pin_memory=False, persistent_workers=workers > 0, **kwargs,
    ), board)
