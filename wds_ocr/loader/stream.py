"""The streaming loader: planned batches -> exact byte ranges -> zero-copy decode -> one tensor per field.

Composed from webdataset pipeline stages (``DataPipeline``, ``split_by_worker``) around our own
stages. The CPU does no image work: each record's arrays are numpy views over the bytes read
(no decode, no copy) and are copied once into the batch tensors, which are preallocated per
batch — in shared memory inside DataLoader workers (so handing the batch to the main process
copies nothing) and in pinned memory in the main process when CUDA is present.

Safety (docs/SECURITY.md): only manifest-listed byte ranges are read, from the manifest's own
folder or server (``remote``); by default (``verify=True``) every member's xxh3-64 checksum is
checked against the manifest before anything else touches its bytes (``verify="sha256"``: its
sha256 digest; ``verify=False``: no check). Then its tar header is checked (regular, flat
``<key>.msgpack`` name, size consistent with the range) and the codec validates every declared
shape and length against the bytes and every metadata field and array readers use; nothing is
unpickled. Batches are allocated from the manifest's ``transform.size``, which the manifest
parser bounds. ``on_error="skip"`` (a ``SkipPolicy``) logs, counts and reports bad records in
``Batch.skipped`` instead of raising; transport failures and rebuilt shards always raise.

Rebuilt shards: when a read fails its checks, and before each epoch and each newly opened local
shard, the stream checks that the manifest is still the one it opened; if it was replaced or
removed, ``ShardsChangedError`` says the shards were rebuilt while it was reading, instead of
reporting the first record that no longer fits (or, with checks off, mixing two builds).

Deadlines: each batch must be read within ``RemoteSettings.batch_deadline`` (each request within
``request_deadline``); a ``ThreadedLoader`` that stops on an error cancels the reads in flight
(their sockets are shut down) instead of waiting for them, and a worker process sends its error
to the main process as the same exception type and message.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import threading
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import webdataset as wds

from wds_ocr.errors import IntegrityError, ShardFormatError, ShardsChangedError, WdsOcrError
from wds_ocr.loader.plan import BatchPlan, plan_batches
from wds_ocr.loader.policy import SkipPolicy, Skipped
from wds_ocr.loader.remote import Deadline, LocalReader, RangeReader, RemoteSettings, open_shards
from wds_ocr.shards.codec import decode_record
from wds_ocr.shards.manifest import DIGEST_HEX, Manifest
from wds_ocr.shards.naming import MAP_NAMES, MEMBER_EXTENSION
from wds_ocr.shards.tario import BLOCK, parse_header, span_checksum

MAX_SPAN = 1 << 31
_MAP_DTYPES = {"thresh_map": torch.float16}
# Batch field -> (record array, dtype, rank): the image, then the maps in MAP_NAMES order.
_FIELDS = {"images": ("image", torch.uint8, 3),
           **{name: (name, _MAP_DTYPES.get(name, torch.uint8), 2) for name in MAP_NAMES}}
_VERIFY = {True: "checksum", False: "off", "checksum": "checksum", "sha256": "sha256", "off": "off"}


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
    skipped: list[Skipped] = field(default_factory=list)  # (shard, key, reason) of each record skipped

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
        verify: bool | str = True,
        on_error: "str | SkipPolicy" = "raise",
        rank: int | None = None,
        world_size: int | None = None,
        remote: RemoteSettings | None = None,
    ):
        if verify not in _VERIFY:
            raise ValueError(f"verify must be True (checksum), 'sha256' or False, got {verify!r}")
        self.policy = SkipPolicy.of(on_error)
        self.remote = remote or RemoteSettings()
        self.location = open_shards(location, self.remote)
        manifest, reader = self.location.manifest, self.location.reader
        if isinstance(reader, LocalReader):
            reader.before_open = self.check_unchanged
        self.manifest: Manifest = manifest
        self.reader: RangeReader = reader
        self.batch_size = batch_size
        self.train = train
        self.seed = seed
        self.shuffle_block = shuffle_block
        self.verify = _VERIFY[verify]
        self.on_error = self.policy.mode
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
        self.check_unchanged(local_only=True)
        return iter(self.plans())

    def _read_batches(self, plans: Iterator[BatchPlan]) -> Iterator[Batch]:
        worker = torch.utils.data.get_worker_info()
        where = "shared" if worker is not None else ("pinned" if torch.cuda.is_available() else "plain")
        for plan in plans:
            if worker is None:
                batch = self.read_batch(plan, where)
                self.policy.tally(batch.skipped)
                yield batch
                continue
            try:
                batch = self.read_batch(plan, where)
            except WdsOcrError as exc:  # to the main process as itself (see ProcessLoader)
                yield _WorkerFailure(exc)
                return
            yield batch

    def check_unchanged(self, local_only: bool = False) -> None:
        """ShardsChangedError when the manifest is no longer the one this stream opened."""
        if local_only and not isinstance(self.reader, LocalReader):
            return
        what = self.location.changed()
        if what is not None:
            raise ShardsChangedError(
                f"{self.location.text} changed since this loader opened it ({what}): the shards were rebuilt "
                "while it was reading; restart the run to read the new shards (a training run resumes from its "
                "last.pt), and rebuild only into folders nothing is reading")

    def _failed(self, error: ShardFormatError) -> ShardFormatError:
        """A bad read: first make sure the shards were not rebuilt under us (that raises instead)."""
        try:
            self.check_unchanged()
        except ShardsChangedError as changed:
            raise changed from error
        return error

    def read_member(self, shard_index: int, position: int, deadline: Deadline | None = None) -> tuple[str, memoryview]:
        """(key, record bytes) of one member: checksum and header checked before the record is touched."""
        try:
            return self._read_member(shard_index, position, deadline)
        except ShardFormatError as exc:
            raise self._failed(exc) from None

    def _read_member(self, shard_index: int, position: int, deadline: Deadline | None) -> tuple[str, memoryview]:
        entry = self.manifest.shards[shard_index]
        start, stop = entry.span(position)
        key = entry.keys[position]
        if not BLOCK < stop - start <= MAX_SPAN:
            raise ShardFormatError(entry.name, key, f"manifest span of {stop - start} bytes is not a plausible member")
        try:
            span = self.reader.read(entry.name, start, stop, deadline)
        except ShardFormatError as exc:
            raise ShardFormatError(exc.shard, exc.key or key, exc.reason) from None
        if self.verify == "checksum" and span_checksum(span) != entry.checksums[position]:
            raise IntegrityError(entry.name, key, "bytes differ from the manifest's checksum (corrupt or replaced "
                                                  "shard)")
        if self.verify == "sha256" and hashlib.sha256(span).hexdigest()[:DIGEST_HEX] != entry.digests[position]:
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

    def read_batch(self, plan: BatchPlan, where: str = "plain", cancel: threading.Event | None = None) -> Batch:
        n = len(plan.samples)
        s = self.size
        out = _allocate_batch(n, s, where)
        views = {name: t.numpy() for name, t in out.items()}
        info: list[SampleInfo] = []
        skipped: list[Skipped] = []
        deadline = Deadline(self.remote.batch_deadline, cancel)
        row = 0
        for ref in plan.samples:
            entry = self.manifest.shards[ref.shard]
            try:
                key, data = self.read_member(ref.shard, ref.position, deadline)
                record = decode_record(data, entry.name, key)
                for name, (array_name, _, _) in _FIELDS.items():
                    array = record.arrays[array_name]
                    if array.shape != views[name].shape[1:]:
                        raise ShardFormatError(entry.name, key, f"{array_name} shape {list(array.shape)}, "
                                                                f"the manifest says {list(views[name].shape[1:])}")
                    views[name][row] = array
            except ShardFormatError as exc:
                self.policy.handle(self._failed(exc), skipped)
                continue
            meta = record.meta
            info.append(SampleInfo(
                key=key,
                name=meta.name,
                original_size=meta.original_size,
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
        self.stream.check_unchanged(local_only=True)
        plans = iter(self.stream.plans())
        cancel = threading.Event()
        pool = ThreadPoolExecutor(self.threads, thread_name_prefix="wds-ocr-read")
        read = self.stream.read_batch
        try:
            pending = deque(pool.submit(read, plan, where, cancel) for plan in itertools.islice(plans, self.depth))
            while pending:
                batch = pending.popleft().result()
                plan = next(plans, None)
                if plan is not None:
                    pending.append(pool.submit(read, plan, where, cancel))
                self.stream.policy.tally(batch.skipped)
                yield batch
        finally:
            # An error, or a consumer that stopped early: do not wait for the reads in flight (a slow
            # server could hold them until their deadlines); cancelling shuts their sockets down.
            cancel.set()
            pool.shutdown(wait=False, cancel_futures=True)


@dataclass
class _WorkerFailure:
    """An error raised in a DataLoader worker, carried to the main process as an item."""

    error: WdsOcrError


class ProcessLoader:
    """A DataLoader over worker processes that re-raises a worker's package error as itself (the
    DataLoader alone would turn it into a RuntimeError holding the worker's traceback as text)
    and tallies skips in the main process."""

    def __init__(self, stream: ShardStream, loader: torch.utils.data.DataLoader):
        self.stream = stream
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Batch]:
        for item in self.loader:
            if isinstance(item, _WorkerFailure):
                raise item.error
            if self.loader.num_workers:
                self.stream.policy.tally(item.skipped)
            yield item


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
    return ProcessLoader(stream, torch.utils.data.DataLoader(
        stream, batch_size=None, num_workers=workers, pin_memory=torch.cuda.is_available(),
        persistent_workers=workers > 0, **kwargs,
    ))


__all__ = ["Batch", "ProcessLoader", "SampleInfo", "ShardStream", "Skipped", "ThreadedLoader", "make_loader"]
