"""The streaming loader: planned batches -> exact byte ranges -> one copy into the batch buffer.

Composed from webdataset pipeline stages (``DataPipeline``, ``split_by_worker``) around our own
stages. The CPU does no image work and makes no intermediate copy: each batch's members are read
(``os.preadv`` for local files; HTTP bodies as their bytes arrive) straight into one buffer, one
member after the other, exactly as stored (record version 3: compact arrays, see
``wds_ocr.shards.compact``); the checksum, the tar header and the codec's validation all run on
those bytes in place, and the batch (``batch.Batch``) is that buffer plus where each record's
arrays lie in it. The device expands it (``loader.device.to_device``). Buffers come from rings
(``loader.ring``) and are recycled once nothing refers to their batch: pinned memory when CUDA is
present, shared memory inside DataLoader workers (the main process notes on a shared board when it
has dropped each batch, and workers reuse only buffers it released).

Safety (docs/SECURITY.md): only manifest-listed byte ranges are read, from the manifest's own
folder or server (``remote``); by default (``verify=True``) every member's xxh3-64 checksum is
checked against the manifest before anything else touches its bytes (``verify="sha256"``: its
sha256 digest; ``verify=False``: no check). Then its tar header is checked (regular, flat
``<key>.msgpack`` name, size consistent with the range) and the codec validates every declared
shape and length against the bytes and every metadata field and array readers use; nothing is
unpickled. Records must have the manifest's side (``transform.size``, which the manifest parser
bounds) and threshold fill. ``on_error="skip"`` (a ``SkipPolicy``) logs, counts and reports bad
records in ``Batch.skipped`` instead of raising; transport failures and rebuilt shards always
raise.

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
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
import webdataset as wds

from wds_ocr.config import LoaderConfig
from wds_ocr.errors import IntegrityError, ShardFormatError, ShardsChangedError, WdsOcrError
from wds_ocr.loader.batch import Batch, Packed, SampleInfo, SampleLayout
from wds_ocr.loader.decoded import DecodeCache, record_layout, sample_info, shifted_layout
from wds_ocr.loader.plan import BatchPlan, plan_batches
from wds_ocr.loader.policy import SkipPolicy, Skipped
from wds_ocr.loader.runs import read_runs
from wds_ocr.storage.local import LocalReader
from wds_ocr.storage.location import open_shards
from wds_ocr.storage.reader import Deadline, RangeReader, RemoteSettings
from wds_ocr.loader.ring import BufferRing, Lease, ReleaseBoard, WorkerRing, allocate
from wds_ocr.shards.codec import decode_record
from wds_ocr.shards.record import Record
from wds_ocr.shards.record_checks import recheck_compact
from wds_ocr.shards.compact import fill_value
from wds_ocr.shards.manifest import DIGEST_HEX, Manifest
from wds_ocr.shards.naming import MEMBER_EXTENSION
from wds_ocr.shards.tario import BLOCK, parse_header, span_checksum

MAX_SPAN = 1 << 31
# Bytes of decoded metadata a stream keeps per process (``DecodeCache``): about 6 kB a receipt,
# so some 40,000 records; a larger dataset decodes the rest every epoch.
DECODE_CACHE_BYTES = 256 << 20
_VERIFY = {True: "checksum", False: "off", "sha256": "sha256"}  # loader.verify_hashes -> the check


class ShardStream(wds.DataPipeline):
    """An IterableDataset of ``Batch`` objects over a shard folder or URL, read as the config's
    ``loader`` section says (batch size, order, checks, what to do with a bad record).

    Iterate it through ``loader.loaders.make_loader(stream)`` (threads or DataLoader processes). ``rank``/``world_size`` default to torch.distributed, then RANK/WORLD_SIZE.
    Call ``set_epoch(e, start_batch)`` before iterating each epoch (training).
    """

    def __init__(
        self,
        location: str | Path,
        loader: LoaderConfig | None = None,
        *,
        train: bool = False,
        rank: int | None = None,
        world_size: int | None = None,
        remote: RemoteSettings | None = None,
        **settings: Any,
    ):
        """``loader``: the config's loader section (default: its defaults); ``settings``: fields
        of it to change, validated as the config validates them (``batch_size=4``,
        ``verify_hashes=False``, ``on_error="skip"``)."""
        loader = (loader or LoaderConfig()).changed(**settings)
        self.loader = loader
        self.policy = SkipPolicy.of(loader.on_error)
        self.remote = remote or RemoteSettings()
        self.location = open_shards(location, self.remote)
        manifest, reader = self.location.manifest, self.location.reader
        if isinstance(reader, LocalReader):
            reader.before_open = self.check_unchanged
        self.manifest: Manifest = manifest
        self.reader: RangeReader = reader
        self.batch_size = loader.batch_size
        self.train = train
        self.seed = loader.seed
        self.shuffle_block = loader.shuffle_block
        self.verify = _VERIFY[loader.verify_hashes]
        self.on_error = self.policy.mode
        self.rank, self.world_size = _rank_world(rank, world_size)
        # (epoch, start_batch) in shared memory: persistent DataLoader workers read the value the
        # main process set before each epoch, so they need not be restarted every epoch.
        self._position = torch.zeros(2, dtype=torch.int64).share_memory_()
        self.size = manifest.image_size
        self.fill = fill_value(manifest.thresh_range[0])
        self._fill_bits = int(self.fill.view("<u2")[0])
        self.board: ReleaseBoard | None = None  # set by make_loader before DataLoader workers start
        self._rings: tuple[int, Any] | None = None  # (pid, ring) of the process iterating
        self.decoded = DecodeCache(DECODE_CACHE_BYTES if self.verify != "off" else 0)
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

    def _ring(self) -> "BufferRing | WorkerRing":
        """This process's buffers: a worker's shared ring, or the main process's ring."""
        if self._rings is None or self._rings[0] != os.getpid():
            worker = torch.utils.data.get_worker_info()
            ring = (WorkerRing(self.board, worker.id) if worker is not None
                    else BufferRing("pinned" if torch.cuda.is_available() else "plain"))
            self._rings = (os.getpid(), ring)
        return self._rings[1]

    def _read_batches(self, plans: Iterator[BatchPlan]) -> Iterator[Batch]:
        worker = torch.utils.data.get_worker_info()
        ring = self._ring()
        for plan in plans:
            if worker is None:
                batch = self.read_batch(plan, ring=ring)
                self.policy.tally(batch.skipped)
                yield batch
                continue
            try:
                batch = self.read_batch(plan, ring=ring)
            except WdsOcrError as exc:  # to the main process as itself (see ProcessLoader)
                yield WorkerFailure(exc)
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

    def _span(self, shard_index: int, position: int) -> tuple[int, int]:
        entry = self.manifest.shards[shard_index]
        start, stop = entry.span(position)
        if not BLOCK < stop - start <= MAX_SPAN:
            raise ShardFormatError(entry.name, entry.keys[position],
                                   f"manifest span of {stop - start} bytes is not a plausible member")
        return start, stop

    def read_member(self, shard_index: int, position: int, deadline: Deadline | None = None) -> tuple[str, memoryview]:
        """(key, record bytes) of one member, in a buffer of its own: checksum and header checked
        before the record is touched."""
        try:
            start, stop = self._span(shard_index, position)
            span = memoryview(bytearray(stop - start))
            return self._read_member(shard_index, position, start, stop, span, deadline)
        except ShardFormatError as exc:
            raise self._failed(exc) from None

    def _read_member(self, shard_index: int, position: int, start: int, stop: int, span: memoryview,
                     deadline: Deadline | None) -> tuple[str, memoryview]:
        """Read the member into ``span`` (its exact size) and check it; (key, its record bytes)."""
        self._land(shard_index, position, start, stop, span, deadline)
        return self._check_member(shard_index, position, start, span)

    def _land(self, shard_index: int, position: int, start: int, stop: int, span: memoryview,
              deadline: Deadline | None) -> None:
        """Read one member's bytes into ``span`` and check them against the manifest's checksum."""
        entry = self.manifest.shards[shard_index]
        try:
            self.reader.read_into(entry.name, start, stop, span, deadline)
        except ShardFormatError as exc:
            raise ShardFormatError(exc.shard, exc.key or entry.keys[position], exc.reason) from None
        self._check_sum(shard_index, position, span)

    def _check_sum(self, shard_index: int, position: int, span: memoryview) -> None:
        """The member's bytes against the manifest's xxh3 checksum (or sha256), as ``verify`` says."""
        entry = self.manifest.shards[shard_index]
        if self.verify == "checksum" and span_checksum(span) != entry.checksums[position]:
            raise IntegrityError(entry.name, entry.keys[position], "bytes differ from the manifest's checksum "
                                                                   "(corrupt or replaced shard)")
        if self.verify == "sha256" and hashlib.sha256(span).hexdigest()[:DIGEST_HEX] != entry.digests[position]:
            raise IntegrityError(entry.name, entry.keys[position], "bytes differ from the manifest's sha256 (corrupt "
                                                                   "or replaced shard)")

    def _check_member(self, shard_index: int, position: int, start: int, span: memoryview) -> tuple[str, memoryview]:
        """The tar header of a member read into ``span`` and checksummed; (key, its record bytes)."""
        entry = self.manifest.shards[shard_index]
        key = entry.keys[position]
        try:
            parsed = parse_header(bytes(span[:BLOCK]), entry.name, start)
        except ShardFormatError as exc:  # the manifest says which member this should be
            raise ShardFormatError(exc.shard, exc.key or key, exc.reason) from None
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
        return key, span[BLOCK : BLOCK + size]

    def _check_record(self, record: Record, shard: str, key: str) -> None:
        """What a valid record must also share with this stream's manifest (the batch's frames)."""
        if record.meta.side != self.size:
            raise ShardFormatError(shard, key, f"record side {record.meta.side}, the manifest says {self.size}")
        if record.arrays["thresh_fill"].view("<u2")[0] != self.fill.view("<u2")[0]:
            raise ShardFormatError(shard, key, f"record thresh_fill {float(record.arrays['thresh_fill'][0])!r}, the "
                                               f"manifest's targets.thresh_min gives {float(self.fill[0])!r}")

    def read_batch(self, plan: BatchPlan, where: str = "plain", cancel: threading.Event | None = None,
                   ring: "BufferRing | WorkerRing | None" = None) -> Batch:
        """Read a planned batch into one buffer (from ``ring``, else a new ``where`` buffer).

        Members that follow each other in a shard are read with one request (``_runs``): one
        ``preadv``, or one HTTP Range request, lands them all; a run that fails is read again member
        by member, so an error names its member and ``on_error="skip"`` skips only that one."""
        slots: list[tuple[int, int, int] | ShardFormatError] = []  # (start, stop, offset in the buffer)
        total = 0
        for ref in plan.samples:
            try:
                start, stop = self._span(ref.shard, ref.position)
            except ShardFormatError as exc:
                slots.append(exc)
                continue
            slots.append((start, stop, total))
            total += stop - start
        lease = ring.acquire(total) if ring is not None else Lease(allocate(total, where))
        buffer = lease.tensor.numpy()
        view = memoryview(buffer)
        deadline = Deadline(self.remote.batch_deadline, cancel)
        # Local files: one ``preadv`` per member below, its checks right after while its bytes are
        # still in the CPU's cache (15-25% more samples/s than one read per run, measured on the
        # bench); remote readers land runs of members first, one request each.
        landed = set() if isinstance(self.reader, LocalReader) else \
            read_runs(self.reader, self.manifest, plan, slots, view, deadline, self.remote.parallel_requests)
        layouts: list[SampleLayout] = []
        info: list[SampleInfo] = []
        skipped: list[Skipped] = []
        for index, (ref, slot) in enumerate(zip(plan.samples, slots)):
            entry = self.manifest.shards[ref.shard]
            try:
                if isinstance(slot, ShardFormatError):
                    raise slot
                start, stop, offset = slot
                span = view[offset : offset + stop - start]
                if index in landed:
                    self._check_sum(ref.shard, ref.position, span)
                else:
                    self._land(ref.shard, ref.position, start, stop, span, deadline)
                known = self.decoded.get(ref.shard, ref.position)
                if known is not None and span[:BLOCK] == known.header:
                    # the header block this member had when it was parsed and decoded: same key, size
                    key, data = entry.keys[ref.position], span[BLOCK : BLOCK + known.place.length]
                else:
                    key, data = self._check_member(ref.shard, ref.position, start, span)
                    known = None
                if known is not None:
                    fill = recheck_compact(data, known.place, entry.name, key)
                    if fill != self._fill_bits:
                        raise ShardFormatError(entry.name, key, "record thresh_fill differs from the manifest's "
                                                                "targets.thresh_min")
                    layout, sample = shifted_layout(known.layout, offset + BLOCK), known.sample()
                else:
                    record = decode_record(data, entry.name, key)
                    self._check_record(record, entry.name, key)
                    layout, sample = record_layout(record, offset + BLOCK), sample_info(key, record)
                    known = self.decoded.put(ref.shard, ref.position, record, len(data), bytes(span[:BLOCK]),
                                             record_layout(record, 0), sample)
                    if known is not None:
                        sample = known.sample()  # the kept one is never handed out
            except ShardFormatError as exc:
                self.policy.handle(self._failed(exc), skipped)
                continue
            layouts.append(layout)
            info.append(sample)
        del view, buffer
        packed = Packed(lease.tensor[:total], tuple(layouts), self.size, float(self.fill[0]))
        return Batch(info=info, index=plan.index, skipped=skipped, packed=packed, lease=lease)


def _rank_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if rank is not None and world_size is not None:
        return rank, world_size
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


@dataclass
class WorkerFailure:
    """An error raised in a DataLoader worker, carried to the main process as an item."""

    error: WdsOcrError


__all__ = ["DECODE_CACHE_BYTES", "ShardStream", "WorkerFailure"]
