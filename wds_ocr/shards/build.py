"""build-shards: run the live pipeline once per sample and write reproducible, resumable shards.

Order and bytes depend only on the source and the record settings: samples are processed in
listing order (N worker processes compute, the parent writes in order), so 1 or N workers give
byte-identical shards. Shards are written by ``writer.ShardSink`` (temporary name, fsync, rename,
journal entry); a build killed at any point and run again keeps the shards the journal vouches for
(``journal.reusable_entries``), continues after them, and ends byte-identical to an uninterrupted
build. The rejects file and then the manifest are written last; the journal is then removed. A
rerun over an unchanged source with the same settings finds the manifest current and rewrites
nothing. ``--partition i/n`` builds a disjoint, contiguous part of the listing; ``merge_parts``
joins the part manifests.

A folder that holds shards built with other settings (another config fingerprint, other shard
settings, another split or source format, a manifest this version cannot read, an interrupted
build under other settings, or shard files nothing accounts for) is refused unless
``overwrite=True`` (``--overwrite``): replacing them silently would pull the bytes from under a
reader. Readers notice a rebuild (see ``wds_ocr.loader.stream``).
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import multiprocessing.connection
import platform
import queue
import re
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Callable, Iterator

import cv2
import numpy as np

try:
    import fcntl
except ImportError:  # not POSIX: workers start with spawn, and pipes keep their default size
    fcntl = None  # type: ignore[assignment]

from wds_ocr import __version__
from wds_ocr.config import Config, settings_changes
from wds_ocr.data.coverage import Coverage
from wds_ocr.data.images import read_image_bytes
from wds_ocr.data.pipeline import process_sample
from wds_ocr.data.sources import Skip, SourceListing, SourceSample, list_source
from wds_ocr.errors import BuildError, ManifestError, OlderManifestError, SampleError, UsageError
from wds_ocr.shards.codec import encode_record
from wds_ocr.shards.journal import BuildLock, FolderLock, Journal, file_sha256, remove_strays, reusable_entries
from wds_ocr.shards.manifest import (SCHEMA_VERSION, Counts, Manifest, PartRange, ShardEntry, load_manifest,
                                     write_manifest)
from wds_ocr.shards.naming import (PART_MANIFEST_PATTERN, MANIFEST_NAME, lock_name, manifest_name, member_name,
                                   record_key, rejects_name, shard_name, shard_prefix, stray_pattern)
from wds_ocr.shards.rejects import Reject, write_rejects
from wds_ocr.shards.tario import member_bytes
from wds_ocr.shards.writer import Outcome, ShardSink

__all__ = ["BuildResult", "Partition", "Progress", "build_shards", "image_digest", "record_key", "write_rejects"]

UNREADABLE = "unreadable"  # the image digest recorded for a file that cannot be read


@dataclass(frozen=True)
class Partition:
    index: int
    count: int

    @classmethod
    def parse(cls, text: str) -> "Partition":
        match = re.fullmatch(r"\s*([0-9]{1,6})\s*/\s*([0-9]{1,6})\s*", text)
        if not match:
            raise UsageError(f"--partition {text!r} must look like i/n, e.g. 0/4 (i counts from 0)")
        index, count = int(match.group(1)), int(match.group(2))
        if count < 1:
            raise UsageError(f"--partition {text!r}: n is the number of parts, at least 1")
        if not 0 <= index < count:
            raise UsageError(f"--partition {text!r}: part i of n counts from 0, so it needs 0 <= i < n "
                             f"(here 0/{count} .. {count - 1}/{count})")
        if count > 999:
            raise UsageError(f"--partition {text!r}: at most 999 parts")
        return cls(index, count)

    def bounds(self, total: int) -> tuple[int, int]:
        """Contiguous [lo, hi) range of listing positions this part builds."""
        return self.index * total // self.count, (self.index + 1) * total // self.count

    @property
    def pair(self) -> tuple[int, int]:
        return self.index, self.count


@dataclass
class Progress:
    """What a progress callback sees after each sample."""

    done: int
    total: int
    written: int
    rejected: int
    reused: int


@dataclass
class BuildResult:
    out_dir: Path
    manifest: Manifest
    manifest_path: Path
    rejects_path: Path
    rejects: list[Reject]
    reused_shards: int
    up_to_date: bool = False


def image_digest(sample: SourceSample, max_bytes: int) -> str:
    """sha256 hex of a sample's image file, or ``UNREADABLE`` (missing, not a regular file, too large)."""
    try:
        return hashlib.sha256(read_image_bytes(sample.image_path, sample.name, max_bytes)).hexdigest()
    except SampleError:
        return UNREADABLE


# --- worker side -----------------------------------------------------------------------------

_WORKER: dict[str, Any] = {}


def _init_worker(config: Config) -> None:
    cv2.setNumThreads(1)  # one core per worker: N workers use N cores, not N x all cores
    _WORKER["config"] = config


def _word_skips(sample: SourceSample, skips: tuple[Skip, ...]) -> list[Reject]:
    return [Reject.from_skip(s, sample.index) for s in skips]


def _rejected(position: int, sample: SourceSample, digest: str, reason: str) -> Outcome:
    return Outcome(position, digest, reject=Reject.sample(sample.index, sample.name, reason),
                   skips=_word_skips(sample, sample.skips))


def _process_one(position: int, sample: SourceSample) -> Outcome:
    """The outcome of one listing position: its record as the finished tar member (header,
    padding, sha256 and xxh3 made here, in the worker), or the reason it was rejected."""
    config: Config = _WORKER["config"]
    try:
        data = read_image_bytes(sample.image_path, sample.name, config.source.max_file_bytes)
    except SampleError as exc:
        return _rejected(position, sample, UNREADABLE, exc.reason)
    digest = hashlib.sha256(data).hexdigest()
    try:
        processed = process_sample(sample, config, data)
    except SampleError as exc:
        return _rejected(position, sample, digest, exc.reason)
    key = record_key(sample.index, sample.name)
    record = member_bytes(member_name(key), encode_record(processed, key, config.targets.thresh_min))
    return Outcome(position, digest, record, key, skips=_word_skips(sample, processed.skips),
                   coverage=Coverage.from_codes(processed.meta.left_out))


def _serve(tasks: Connection, results: Connection, config: Config) -> None:
    """A build worker: answer "ready", then one outcome per (position, sample) task, in order,
    until told to stop (None), interrupted, or its parent goes away (end of file on ``tasks``, a
    broken pipe on ``results``)."""
    try:
        _init_worker(config)
        results.send(_READY)
        while True:
            task = tasks.recv()
            if task is None:
                return
            position, sample = task
            try:
                outcome = _process_one(position, sample)
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException:  # a bug, not bad input (that is a reject): the parent stops the build
                results.send((_FAILED, position, traceback.format_exc()))
                return
            results.send(outcome)
    except (EOFError, OSError, KeyboardInterrupt):
        return


_READY = "ready"
_FAILED = "failed"
# Seconds a worker may spend on one sample before the build stops (a receipt takes ~0.1 s; a
# worker that is neither answering nor dead is stuck).
SAMPLE_TIMEOUT = 600.0
# Seconds a worker has to exit once told to stop, before it is killed.
EXIT_TIMEOUT = 10.0
# Samples in flight per worker: enough to keep it busy while the parent writes.
IN_FLIGHT = 4
_F_SETPIPE_SZ = 1031  # fcntl: a result pipe that holds a whole record takes it in one read


def _worker_context() -> multiprocessing.context.BaseContext:
    """Workers fork from a server that imported the pipeline once (``forkserver``, where the
    platform has it): starting them costs one import, not one per worker, and later builds in the
    same process (train, then val) start theirs in milliseconds. Never plain ``fork``: the parent
    may hold OpenCV's thread pool."""
    if "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload([__name__])
        return context
    return multiprocessing.get_context("spawn")


def _outcomes(samples: list[SourceSample], config: Config, positions: range,
              starting: "_Workers | None") -> Iterator[Outcome]:
    """Outcomes in position order; at most ``IN_FLIGHT`` samples in flight per worker.

    With workers (``starting``, begun before the listing so their start overlaps it) the parent
    processes the next positions itself until one of them is up, so start-up costs no idle time;
    a build that ends before any worker is up never uses them."""
    if not positions:
        return
    todo = iter(positions)
    if starting is None:
        yield from _in_process(samples, config, todo)
        return
    local = _in_process(samples, config, todo)
    while not starting.ready():
        outcome = next(local, None)
        if outcome is None:
            return
        yield outcome
    local.close()
    for position in todo:
        starting.submit(position, samples[position])
        if starting.in_flight >= IN_FLIGHT * starting.count:
            break
    while starting.in_flight:
        outcome = starting.next_outcome()
        following = next(todo, None)
        if following is not None:
            starting.submit(following, samples[following])
        yield outcome


@dataclass
class _Worker:
    process: Any
    tasks: Connection  # the parent's end: (position, sample) tuples, then None
    results: Connection  # the parent's end: "ready", then one outcome per task
    outbox: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)  # tasks its feeder sends
    feeder: threading.Thread | None = None
    up: bool = False
    pending: deque = field(default_factory=deque)  # (position, sample name) sent, not yet answered
    received: deque = field(default_factory=deque)  # answers read, not yet handed out

    def feed(self) -> None:
        """The feeder thread: send the queued tasks, then None. A task can be larger than the
        pipe, so sending blocks until the worker reads it; it does so here, never in the parent's
        main thread, which meanwhile reads the worker's results (a worker blocked on handing back
        a record while the parent blocks on handing it a task would wait forever)."""
        while True:
            task = self.outbox.get()
            try:
                self.tasks.send(task)
            except OSError:  # the worker is gone: the parent sees that from its process
                return
            if task is None:
                return


def _who(worker: _Worker) -> str:
    return f"build worker {worker.process.name.rsplit('-', 1)[-1]} (pid {worker.process.pid})"


class _Workers:
    """``count`` build worker processes, each with its own task and result pipe.

    Why not ``multiprocessing.Pool``: its worker-handler thread wakes on every readable result
    and spins until the result thread has read it, so a 0.8 MB record cost the parent tens of
    milliseconds of contended CPU (150 records: 7-10 s of parent CPU with forkserver workers,
    against 0.4 s over plain pipes), and a worker killed mid-task left the build waiting forever.
    Here each worker answers its tasks in order over its own pipe; the parent reads every answer
    as soon as it arrives (a worker that finished ahead of the others never waits on a full pipe)
    and hands them out in listing order; it waits on the pipes and the processes together (a dead
    worker is an error naming its sample; a silent one is one after ``SAMPLE_TIMEOUT``). Samples
    travel with their tasks, so the processes can start (in a thread: starting blocks on the fork
    server's import) before the source is listed."""

    def __init__(self, count: int, config: Config, sample_timeout: float = SAMPLE_TIMEOUT):
        self.count = count
        self.sample_timeout = sample_timeout
        self.workers: list[_Worker] = []
        self._order: deque = deque()  # the worker of each submitted position, in submission order
        self._error: BaseException | None = None
        self._closing = False
        self._thread = threading.Thread(target=self._start, args=(count, config), daemon=True,
                                        name="wds-ocr-build-workers")
        self._thread.start()

    def _start(self, count: int, config: Config) -> None:
        try:
            context = _worker_context()
            for _ in range(count):
                if self._closing:
                    return
                task_reader, task_writer = context.Pipe(duplex=False)
                result_reader, result_writer = context.Pipe(duplex=False)
                try:
                    if fcntl is not None:
                        fcntl.fcntl(result_writer.fileno(), _F_SETPIPE_SZ, 1 << 20)
                except OSError:  # an older kernel or a lower pipe-max-size: smaller reads, same bytes
                    pass
                process = context.Process(target=_serve, args=(task_reader, result_writer, config),
                                          name=f"wds-ocr-build-worker-{len(self.workers)}", daemon=True)
                process.start()
                task_reader.close()  # the worker holds these ends now: end of file when it exits
                result_writer.close()
                worker = _Worker(process, task_writer, result_reader)
                worker.feeder = threading.Thread(target=worker.feed, name=f"{process.name}-feeder", daemon=True)
                worker.feeder.start()
                self.workers.append(worker)
        except BaseException as exc:  # surfaced by ready()
            self._error = exc

    @property
    def in_flight(self) -> int:
        return len(self._order)

    def ready(self) -> bool:
        """True once every worker has started and one has said it is up."""
        if self._thread.is_alive():
            return False
        if self._error is not None:
            raise self._error
        self._pump(0.0)
        return any(worker.up for worker in self.workers)

    def submit(self, position: int, sample: SourceSample) -> None:
        worker = min(self.workers, key=lambda w: (not w.up, len(w.pending)))
        worker.pending.append((position, sample.name))
        worker.outbox.put((position, sample))
        self._order.append(worker)

    def next_outcome(self) -> Outcome:
        """The outcome of the oldest submitted position (waits for it)."""
        worker = self._order[0]
        position, name = worker.pending[0]
        what = f"sample {name!r} (listing position {position})"
        deadline = time.monotonic() + self.sample_timeout
        while not worker.received:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BuildError(f"{_who(worker)} gave no answer for {self.sample_timeout:.0f} s on {what}; the "
                                 "build stops here and a rerun resumes after the last finished shard")
            self._pump(left)
        message = worker.received.popleft()
        if isinstance(message, tuple) and message[:1] == (_FAILED,):
            raise BuildError(f"build worker failed on {what}; this is a bug in wds-ocr, please report it with this "
                             f"output:\n{message[2]}")
        if not isinstance(message, Outcome) or message.position != position:
            raise BuildError(f"{_who(worker)} answered {type(message).__name__} for {what}; expected its outcome")
        worker.pending.popleft()
        self._order.popleft()
        return message

    def _pump(self, timeout: float) -> None:
        """Read every answer that has arrived (waiting up to ``timeout`` for the first); a worker
        that exited with work outstanding, or before it was up, is an error."""
        watched = [w for w in self.workers if w.pending or not w.up]
        if not watched:
            return
        ready = set(multiprocessing.connection.wait([w.results for w in watched] +
                                                    [w.process.sentinel for w in watched], timeout=timeout))
        for worker in watched:
            exited = worker.process.sentinel in ready
            if worker.results in ready or exited:
                self._drain(worker)
            if exited and (len(worker.pending) > len(worker.received) or not worker.up):
                worker.process.join(EXIT_TIMEOUT)
                if len(worker.pending) > len(worker.received):
                    position, name = worker.pending[len(worker.received)]
                    what = f"sample {name!r} (listing position {position})"
                else:
                    what = "its start"
                raise BuildError(f"{_who(worker)} exited (code {worker.process.exitcode}) while working on {what}; "
                                 "the build stops here and a rerun resumes after the last finished shard (if it "
                                 "was killed for memory, try fewer --workers)")

    def _drain(self, worker: _Worker) -> None:
        """Read the answers waiting in ``worker``'s pipe (its first one says it is up)."""
        while worker.results.poll():
            try:
                message = worker.results.recv()
            except EOFError:
                return  # it exited: the caller reports that
            if worker.up:
                worker.received.append(message)
            elif message == _READY:
                worker.up = True
            else:
                raise BuildError(f"{_who(worker)} sent {message!r} instead of saying it was up")

    def close(self) -> None:
        """Stop the workers: one with work outstanding (the build failed or was interrupted) is
        killed at once, since it may be blocked handing back a record nobody will read; the
        others are asked (None), given ``EXIT_TIMEOUT``, then killed."""
        self._closing = True
        self._thread.join()
        for worker in self.workers:
            if len(worker.pending) > len(worker.received) and worker.process.is_alive():
                worker.process.kill()
            worker.outbox.put(None)  # ends its feeder too (a send to a killed worker fails)
        deadline = time.monotonic() + EXIT_TIMEOUT
        for worker in self.workers:
            worker.process.join(max(0.0, deadline - time.monotonic()))
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join()
            if worker.feeder is not None:
                worker.feeder.join(EXIT_TIMEOUT)  # its worker is gone: a blocked send has failed
            worker.tasks.close()
            worker.results.close()


def _in_process(samples: list[SourceSample], config: Config, todo: Iterator[int]) -> Iterator[Outcome]:
    """Outcomes of the positions taken from ``todo``, computed in this process (one at a time, as
    they are asked for: a position is taken only when its outcome is wanted)."""
    threads = cv2.getNumThreads()
    _init_worker(config)
    try:
        for position in todo:
            yield _process_one(position, samples[position])
    finally:
        _WORKER.clear()
        cv2.setNumThreads(threads)


# --- manifest and rejects --------------------------------------------------------------------


def environment() -> dict[str, str]:
    import msgpack
    import pyclipper

    return {
        "wds_ocr": __version__,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "opencv": cv2.__version__,
        "msgpack": ".".join(str(v) for v in msgpack.version),
        "pyclipper": getattr(pyclipper, "__version__", "unknown"),
    }


def source_fingerprint(annotation_sha256: str, listing_rejects: list[str], digests: list[str]) -> str:
    """sha256 over the annotation files, the names rejected while listing, and every image's bytes."""
    images = hashlib.sha256("\n".join(digests).encode()).hexdigest()
    body = {"annotation_sha256": annotation_sha256, "listing_rejects": sorted(listing_rejects), "images_sha256": images}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _listing_rejects(listing: SourceListing) -> list[Reject]:
    return [Reject.sample(None, r.name, r.reason) for r in listing.rejects]


def _names(partition: Partition | None) -> tuple[str, str, str]:
    pair = partition.pair if partition is not None else None
    return shard_prefix(pair), manifest_name(pair), rejects_name(pair)


@dataclass(frozen=True)
class _Plan:
    """What one build (or part) covers and depends on."""

    listing: SourceListing
    split: str
    config: Config
    partition: Partition | None
    lo: int
    hi: int

    @property
    def partitioned(self) -> bool:
        return self.partition is not None and self.partition.count > 1

    @property
    def listing_rejects(self) -> list[Reject]:
        """Samples rejected while listing: counted once, by the whole build or by part 0."""
        return _listing_rejects(self.listing) if not self.partitioned or self.partition.index == 0 else []

    def source_fields(self, digests: list[str]) -> dict[str, Any]:
        listing = self.listing
        rejected_names = sorted(r.name for r in listing.rejects)
        return {
            "format": listing.format,
            "split": self.split,
            "annotation_sha256": listing.annotation_sha256,
            "fingerprint": None if self.partitioned else source_fingerprint(listing.annotation_sha256, rejected_names, digests),
            "listed": listing.total,
            "listing_rejects": rejected_names,
        }

    def partition_fields(self) -> PartRange | None:
        if not self.partitioned:
            return None
        return PartRange(self.partition.index, self.partition.count, self.lo, self.hi)

    def manifest(self, entries: list[ShardEntry], digests: list[str], rejects: int, skips: int,
                 coverage: Coverage) -> Manifest:
        samples_in = (self.hi - self.lo) + len(self.listing_rejects)
        written = sum(entry.samples for entry in entries)
        if written + rejects != samples_in:
            raise BuildError(f"internal count mismatch: {samples_in} samples in, {written} written, {rejects} rejected")
        return Manifest(
            fingerprint=self.config.fingerprint(),
            record_settings=self.config.record_settings(),
            source=self.source_fields(digests),
            counts=Counts(samples_in, written, rejects, skips, coverage),
            shard_settings=self.config.shards.model_dump(mode="json"),
            shards=tuple(entries),
            environment=environment(),
            partition=self.partition_fields(),
            source_digests=tuple(digests) if self.partitioned else None,
        )

    def digest_at(self, position: int) -> str:
        return image_digest(self.listing.samples[position], self.config.source.max_file_bytes)


def _current_manifest(manifest_file: Path, rejects_file: Path, plan: _Plan) -> Manifest | None:
    """The existing manifest if it is exactly what this build would write now, else None.

    Cheap checks first (settings, listing, file sizes), then the source images, then the shards.
    """
    try:
        manifest = load_manifest(manifest_file)
    except ManifestError:
        return None
    config = plan.config
    if (
        manifest.fingerprint != config.fingerprint()
        or manifest.shard_settings != config.shards.model_dump(mode="json")
        or manifest.partition != plan.partition_fields()
        or not rejects_file.is_file()
    ):
        return None
    folder = manifest_file.parent
    for entry in manifest.shards:
        path = folder / entry.name
        if not path.is_file() or path.stat().st_size != entry.bytes:
            return None
    digests = [plan.digest_at(position) for position in range(plan.lo, plan.hi)]
    if manifest.source != plan.source_fields(digests):
        return None
    if plan.partitioned and manifest.source_digests != tuple(digests):
        return None
    if any(file_sha256(folder / entry.name) != entry.sha256 for entry in manifest.shards):
        return None
    return manifest


def _settings_changes(manifest: Manifest, config: Config, split: str, source_format: str) -> list[str]:
    """What differs between the build a manifest describes and this one (empty: the same kind)."""
    line = "{field}: {built!r} there, {now!r} now"
    changes = []
    if manifest.fingerprint != config.fingerprint():
        changes = settings_changes(manifest.record_settings, config.record_settings(), line) or \
            ["the config fingerprint differs"]
    changes += settings_changes(manifest.shard_settings, config.shards.model_dump(mode="json"), line, "shards.")
    changes += settings_changes({"split": manifest.source.get("split"), "format": manifest.source.get("format")},
                                {"split": split, "format": source_format}, line, "source.")
    return changes


def _check_folder(out_dir: Path, prefix: str, plan: _Plan, journal: Journal) -> None:
    """BuildError when ``out_dir`` holds shards this build would replace but did not make."""
    config = plan.config
    refuse = (f"{out_dir} holds shards built with other settings (%s); pass --overwrite (overwrite=True) to "
              "replace them (a run reading them will stop with an error), or build into another --out")
    listed: set[str] = set()
    for path in sorted(out_dir.iterdir()):
        if path.name != MANIFEST_NAME and not PART_MANIFEST_PATTERN.fullmatch(path.name):
            continue
        try:
            existing = load_manifest(path)
        except OlderManifestError as exc:
            raise BuildError(f"{out_dir} holds shards written by an older wds-ocr ({path.name} has schema_version "
                             f"{exc.version}; this one reads {SCHEMA_VERSION}, compact records): pass --overwrite "
                             f"(overwrite=True) to rebuild them there, remove {out_dir}, or build into another "
                             "--out") from None
        except ManifestError as exc:
            raise BuildError(refuse % f"{path.name} cannot be used by this wds-ocr: {exc}") from None
        changes = _settings_changes(existing, config, plan.split, plan.listing.format)
        if changes:
            raise BuildError(refuse % f"{path.name}: {'; '.join(changes)}")
        listed.update(entry.name for entry in existing.shards)
    stored = journal.stored_settings()
    if stored is not None:
        for name in ("fingerprint", "shard_settings"):
            if stored.get(name) != journal.settings[name]:
                raise BuildError(refuse % f"an interrupted build under other settings left {journal.folder.name}")
        return
    pattern = stray_pattern(prefix)
    unknown = sorted(p.name for p in out_dir.iterdir()
                     if pattern.match(p.name) and not p.name.endswith(".tmp") and p.name not in listed)
    if unknown:
        raise BuildError(refuse % f"{', '.join(unknown[:3])}{' ...' if len(unknown) > 3 else ''} "
                                  "belong to no manifest or journal here")


def build_shards(
    source: str | Path,
    split: str,
    out_dir: str | Path,
    config: Config,
    workers: int = 1,
    partition: Partition | None = None,
    progress: Callable[[Progress], None] | None = None,
    overwrite: bool = False,
) -> BuildResult:
    """Build (or resume, or confirm up to date) the shards of one split.

    Refuses (BuildError) a folder holding shards built with other settings unless ``overwrite``.
    With ``workers`` > 1 the worker processes start first, in the background, so that its start
    (a fork server importing the pipeline) overlaps the listing and the folder checks.
    """
    starting = _Workers(workers, config) if workers > 1 else None
    try:
        return _build(source, split, Path(out_dir), config, starting, partition, progress, overwrite)
    finally:
        if starting is not None:
            starting.close()


def _build(source: str | Path, split: str, out_dir: Path, config: Config, starting: _Workers | None,
           partition: Partition | None, progress: Callable[[Progress], None] | None, overwrite: bool) -> BuildResult:
    listing = list_source(source, split, config.source)
    out_dir.mkdir(parents=True, exist_ok=True)
    prefix, manifest_name, rejects_name = _names(partition)
    lo, hi = partition.bounds(len(listing.samples)) if partition else (0, len(listing.samples))
    plan = _Plan(listing, split, config, partition, lo, hi)
    manifest_file = out_dir / manifest_name
    rejects_file = out_dir / rejects_name

    with FolderLock(out_dir, shared=partition is not None and partition.count > 1), \
            BuildLock(out_dir / lock_name(prefix)):
        journal = Journal(out_dir, prefix, {
            "fingerprint": config.fingerprint(),
            "shard_settings": config.shards.model_dump(mode="json"),
            "annotation_sha256": listing.annotation_sha256,
            "names_sha256": hashlib.sha256("\n".join(s.name for s in listing.samples).encode()).hexdigest(),
            "range": [lo, hi],
        })
        if not overwrite:
            _check_folder(out_dir, prefix, plan, journal)
        current = _current_manifest(manifest_file, rejects_file, plan)
        if current is not None:
            journal.remove()  # left over when a build was killed between the manifest and its cleanup
            remove_strays(out_dir, prefix, {entry.name for entry in current.shards})
            return BuildResult(out_dir, current, manifest_file, rejects_file, [], len(current.shards), True)
        manifest_file.unlink(missing_ok=True)
        entries = journal.load()
        kept = reusable_entries(entries, out_dir, prefix, lo, plan.digest_at)
        if len(kept) < len(entries):
            journal.drop_from(shard_name(prefix, len(kept)))
        remove_strays(out_dir, prefix, {e.shard.name for e in kept})

        resume_at = kept[-1].next if kept else lo
        reused = [entry.shard for entry in kept]
        sink = ShardSink(out_dir, prefix, config.shards.max_samples, config.shards.max_bytes, journal, reused)
        written = sum(entry.samples for entry in reused)
        counts = Progress(resume_at - lo, hi - lo, written, sum(len(e.rejects) for e in kept), written)
        try:
            for outcome in _outcomes(listing.samples, config, range(resume_at, hi), starting):
                sink.consume(outcome)
                counts.done += 1
                if outcome.record is not None:
                    counts.written += 1
                else:
                    counts.rejected += 1
                if progress is not None:
                    progress(counts)
            sink.close(next_position=hi)
        except BaseException:
            sink.abort()
            raise
        # Every outcome is now in a journal entry, or in the tail after the last shard.
        done = [*journal.load(), sink.tail]
        rejects = plan.listing_rejects + [r for e in done for r in e.rejects]
        skips = [s for e in done for s in e.skips]
        digests = [d for e in done for d in e.digests]
        coverage = sum((e.coverage for e in done), Coverage())
        manifest = plan.manifest(sink.entries, digests, len(rejects), len(skips), coverage)
        write_rejects(rejects_file, rejects + skips)
        write_manifest(manifest_file, manifest)
        journal.remove()
    return BuildResult(out_dir, manifest, manifest_file, rejects_file, rejects + skips, len(kept))
