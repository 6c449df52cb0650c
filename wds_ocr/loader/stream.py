"""The streaming loader: planned batches -> exact byte ranges -> zero-copy decode -> one tensor per field.

Composed from webdataset pipeline stages (``DataPipeline``, ``split_by_worker``) around our own
stages. The CPU does no image work: each record's arrays are numpy views over the bytes read
(no decode, no copy) and are copied once into the batch tensors, which are preallocated per
batch — in shared memory inside DataLoader workers (so handing the batch to the main process
copies nothing) and in pinned memory in the main process when CUDA is present.

Safety: only manifest-listed byte ranges are read; each member header is checked (regular,
flat ``<key>.msgpack`` name, size consistent with the range) before its bytes are decoded, and
each declared shape/length is checked against the bytes by the codec; nothing is unpickled.
With ``verify=True`` every member's sha256 is checked against the manifest as it streams.
``on_error="skip"`` logs, counts and reports bad records in ``Batch.skipped`` instead of raising.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import webdataset as wds

from wds_ocr.errors import IntegrityError, ShardFormatError
from wds_ocr.loader.plan import BatchPlan, plan_batches
from wds_ocr.loader.remote import RangeReader, open_location
from wds_ocr.shards.codec import MEMBER_EXTENSION, decode_record
from wds_ocr.shards.manifest import DIGEST_HEX, Manifest
from wds_ocr.shards.tario import BLOCK, parse_header

log = logging.getLogger(__name__)

MAX_SPAN = 1 << 30
_FIELDS = {
    "images": ("image", torch.uint8, 3),
    "gt": ("gt", torch.uint8, 2),
    "mask": ("mask", torch.uint8, 2),
    "thresh_map": ("thresh_map", torch.float16, 2),
    "thresh_mask": ("thresh_mask", torch.uint8, 2),
}


@dataclass
class SampleInfo:
    """Per-sample metadata evaluation needs (original-frame polygons, inverse matrix, ...)."""

    key: str
    name: str
    original_size: tuple[int, int]
    inverse_matrix: np.ndarray
    polygons: list[np.ndarray]  # original-image frame
    dont_care: np.ndarray  # (P,) bool, from the annotations
    left_out: np.ndarray  # (P,) uint8 LeftOut codes: why a polygon is not in the training targets (0: it is)


@dataclass
class Batch:
    images: torch.Tensor  # (N, S, S, 3) uint8 RGB
    gt: torch.Tensor  # (N, S, S) uint8
    mask: torch.Tensor  # (N, S, S) uint8
    thresh_map: torch.Tensor  # (N, S, S) float16
    thresh_mask: torch.Tensor  # (N, S, S) uint8
    info: list[SampleInfo]
    index: int  # batch number within this rank's epoch
    skipped: list[tuple[str, str | None, str]] = field(default_factory=list)  # (shard, key, reason)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def keys(self) -> list[str]:
        return [i.key for i in self.info]

    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in _FIELDS}

    def pin_memory(self) -> "Batch":
        """Called by DataLoader(pin_memory=True) in the main process."""
        pinned = {name: t if t.is_pinned() else t.pin_memory() for name, t in self.tensors().items()}
        return Batch(**pinned, info=self.info, index=self.index, skipped=self.skipped)


def _allocate_batch(n: int, size: int, where: str) -> dict[str, torch.Tensor]:
    """All five fields of a batch as views into one storage: shared (worker), pinned or plain."""
    layout = []
    nbytes = 0
    for name, (_, dtype, rank) in _FIELDS.items():
        shape = (n, size, size, 3) if rank == 3 else (n, size, size)
        itemsize = torch.empty(0, dtype=dtype).element_size()
        nbytes += (-nbytes) % 64
        layout.append((name, dtype, shape, nbytes // itemsize))
        nbytes += itemsize * int(np.prod(shape))
    if where == "shared":
        storage = torch.UntypedStorage._new_shared(nbytes)
    else:
        storage = torch.empty(nbytes, dtype=torch.uint8, pin_memory=where == "pinned").untyped_storage()
    out = {}
    for name, dtype, shape, offset in layout:
        stride = tuple(int(np.prod(shape[i + 1 :])) for i in range(len(shape)))
        out[name] = torch.empty(0, dtype=dtype).set_(storage, offset, shape, stride)
    return out


class ShardStream(wds.DataPipeline):
    """An IterableDataset of ``Batch`` objects over a shard folder or URL.

    Use with ``torch.utils.data.DataLoader(stream, batch_size=None, num_workers=W)`` (see
    ``make_loader``). ``rank``/``world_size`` default to torch.distributed, then RANK/WORLD_SIZE.
    Call ``set_epoch(e, start_batch)`` before iterating each epoch (training).
    """

    def __init__(
        self,
        location: str | Path,
        batch_size: int,
        train: bool = False,
        seed: int = 0,
        shuffle_block: int = 64,
        verify: bool = False,
        on_error: str = "raise",
        rank: int | None = None,
        world_size: int | None = None,
    ):
        manifest, reader = open_location(location)
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        self.manifest: Manifest = manifest
        self.reader: RangeReader = reader
        self.batch_size = batch_size
        self.train = train
        self.seed = seed
        self.shuffle_block = shuffle_block
        self.verify = verify
        self.on_error = on_error
        self.rank, self.world_size = _rank_world(rank, world_size)
        # (epoch, start_batch) in shared memory: persistent DataLoader workers read the value the
        # main process set before each epoch, so they need not be restarted every epoch.
        self._position = torch.zeros(2, dtype=torch.int64).share_memory_()
        self.size = manifest.image_size
        super().__init__(self._plans, wds.split_by_worker, self._read_batches)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch (training order) and the batch to start from (resume)."""
        self._position[0] = epoch
        self._position[1] = start_batch

    @property
    def epoch(self) -> int:
        return int(self._position[0])

    @property
    def start_batch(self) -> int:
        return int(self._position[1])

    def plans(self) -> list[BatchPlan]:
        return plan_batches(self.manifest, self.batch_size, self.rank, self.world_size, self.train,
                            self.seed, self.epoch, self.shuffle_block, self.start_batch)

    def __len__(self) -> int:
        return len(self.plans())

    def _plans(self) -> Iterator[BatchPlan]:
        return iter(self.plans())

    def _read_batches(self, plans: Iterator[BatchPlan]) -> Iterator[Batch]:
        worker = torch.utils.data.get_worker_info()
        where = "shared" if worker is not None else ("pinned" if torch.cuda.is_available() else "plain")
        for plan in plans:
            yield self.read_batch(plan, where)

    def read_member(self, shard_index: int, position: int) -> tuple[str, memoryview]:
        """(key, record bytes) of one member, header checked before the record is touched."""
        entry = self.manifest.shards[shard_index]
        start, stop = entry.span(position)
        key = entry.keys[position]
        if not BLOCK < stop - start <= MAX_SPAN:
            raise ShardFormatError(entry.name, key, f"manifest span of {stop - start} bytes is not a plausible member")
        span = self.reader.read(entry.name, start, stop)
        if self.verify and hashlib.sha256(span).hexdigest()[:DIGEST_HEX] != entry.digests[position]:
            raise IntegrityError(entry.name, key, "bytes differ from the manifest's sha256 (corrupt or replaced shard)")
        parsed = parse_header(span[:BLOCK], entry.name, start)
        if parsed is None:
            raise ShardFormatError(entry.name, key, f"end-of-archive block where the manifest lists a member (byte {start})")
        member_key, extension, size = parsed
        if member_key != key:
            raise ShardFormatError(entry.name, key, f"member at byte {start} is {member_key!r}, manifest says {key!r}")
        if extension != MEMBER_EXTENSION:
            raise ShardFormatError(entry.name, key, f"member extension {extension!r} refused: only .{MEMBER_EXTENSION} "
                                                    "records are read (never pickle or other formats)")
        if BLOCK + size > len(span) or len(span) - BLOCK - size >= BLOCK:
            raise ShardFormatError(entry.name, key, f"tar header declares {size} bytes, manifest span holds {len(span) - BLOCK}")
        return key, memoryview(span)[BLOCK : BLOCK + size]

    def read_batch(self, plan: BatchPlan, where: str = "plain") -> Batch:
        n = len(plan.samples)
        s = self.size
        out = _allocate_batch(n, s, where)
        views = {name: t.numpy() for name, t in out.items()}
        info: list[SampleInfo] = []
        skipped: list[tuple[str, str | None, str]] = []
        row = 0
        for ref in plan.samples:
            entry = self.manifest.shards[ref.shard]
            try:
                key, data = self.read_member(ref.shard, ref.position)
                record = decode_record(data, entry.name, key)
                for name, (array_name, _, _) in _FIELDS.items():
                    array = record.arrays[array_name]
                    if array.shape != views[name].shape[1:]:
                        raise ShardFormatError(entry.name, key, f"{array_name} shape {list(array.shape)}, "
                                                                f"the manifest says {list(views[name].shape[1:])}")
                    views[name][row] = array
            except ShardFormatError as exc:
                if self.on_error == "raise":
                    raise
                log.warning("skipping %s", exc)
                skipped.append((exc.shard, exc.key, exc.reason))
                continue
            meta = record.meta
            info.append(SampleInfo(
                key=key,
                name=meta["name"],
                original_size=tuple(meta["original_size"]),
                inverse_matrix=np.array(record.arrays["inverse_matrix"]),
                polygons=[np.array(p) for p in record.polygons("polygons_original")],
                dont_care=record.arrays["dont_care"].astype(bool),
                left_out=np.array(record.arrays["left_out"]),
            ))
            row += 1
        if row < n:
            out = {name: t[:row] for name, t in out.items()}
        return Batch(**out, info=info, index=plan.index, skipped=skipped)


def _rank_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if rank is not None and world_size is not None:
        return rank, world_size
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


class ThreadedLoader:
    """Batches read by a pool of threads in the main process, in plan order.

    The per-sample work is a positioned read plus one copy into the batch, both of which release
    the GIL, so threads scale without worker processes: batches need no shared-memory transfer
    and go straight into pinned memory when CUDA is present.
    """

    def __init__(self, stream: ShardStream, threads: int = 2, prefetch: int = 2):
        self.stream = stream
        self.threads = max(1, threads)
        self.depth = max(1, threads * prefetch)

    def __len__(self) -> int:
        return len(self.stream)

    def __iter__(self) -> Iterator[Batch]:
        from concurrent.futures import ThreadPoolExecutor

        where = "pinned" if torch.cuda.is_available() else "plain"
        plans = iter(self.stream.plans())
        with ThreadPoolExecutor(self.threads, thread_name_prefix="wds-ocr-read") as pool:
            pending = deque(pool.submit(self.stream.read_batch, plan, where) for plan in itertools.islice(plans, self.depth))
            while pending:
                batch = pending.popleft().result()
                plan = next(plans, None)
                if plan is not None:
                    pending.append(pool.submit(self.stream.read_batch, plan, where))
                yield batch


def make_loader(stream: ShardStream, workers: int, prefetch: int = 2, mode: str = "processes"):
    """An iterable of Batches for ``stream``.

    ``mode="processes"``: a torch DataLoader over ready-made batches (batch_size=None), pinned when
    CUDA is present; ``workers`` worker processes persist across epochs (``stream.set_epoch``
    reaches them through shared memory). ``mode="threads"``: a ThreadedLoader with ``workers``
    threads in this process — no shared-memory hand-off, the faster choice for this loader's
    read-and-copy work (see docs/BENCHMARKS.md). Both yield the same batches in the same order.
    """
    if mode == "threads":
        return ThreadedLoader(stream, threads=max(1, workers), prefetch=prefetch)
    if mode != "processes":
        raise ValueError(f"loader mode must be 'threads' or 'processes', got {mode!r}")
    kwargs: dict[str, Any] = {}
    if workers > 0:
        kwargs.update(prefetch_factor=prefetch, multiprocessing_context="fork" if os.name == "posix" else None)
    return torch.utils.data.DataLoader(
        stream, batch_size=None, num_workers=workers, pin_memory=torch.cuda.is_available(),
        persistent_workers=workers > 0, **kwargs,
    )


__all__ = ["Batch", "SampleInfo", "ShardStream", "ThreadedLoader", "make_loader"]
