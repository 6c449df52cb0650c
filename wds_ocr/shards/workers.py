"""Build workers: the per-sample work (read, pipeline, encode the finished tar member) and the
processes that do it in parallel, answering in listing order.

``build`` drives them through ``outcomes`` (and ``Workers``, started before the source is listed).
"""

from __future__ import annotations

import hashlib
import multiprocessing
import multiprocessing.connection
import queue
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any, Iterator

import cv2

try:
    import fcntl
except ImportError:  # not POSIX: workers start with spawn, and pipes keep their default size
    fcntl = None  # type: ignore[assignment]

from wds_ocr.config import Config
from wds_ocr.data.coverage import Coverage
from wds_ocr.data.images import read_image_bytes
from wds_ocr.data.pipeline import process_sample
from wds_ocr.data.sources import Skip, SourceSample
from wds_ocr.errors import BuildError, SampleError
from wds_ocr.shards.codec import encode_record
from wds_ocr.shards.fingerprint import UNREADABLE
from wds_ocr.shards.naming import member_name, record_key
from wds_ocr.shards.rejects import Reject
from wds_ocr.shards.tario import member_bytes
from wds_ocr.shards.writer import Outcome

__all__ = ["EXIT_TIMEOUT", "IN_FLIGHT", "SAMPLE_TIMEOUT", "Workers", "outcomes"]

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


def outcomes(samples: list[SourceSample], config: Config, positions: range,
              starting: "Workers | None") -> Iterator[Outcome]:
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


class Workers:
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
