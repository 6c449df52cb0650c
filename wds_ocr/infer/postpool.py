"""A pool of post-processing worker processes fed through a shared-memory ring of maps.

Why processes, and why these: post-processing and matching are CPU work in cv2, pyclipper,
shapely and Python (5-20 ms per receipt), which would leave a GPU idle most of a validation pass
if the main process did it between forward passes. Workers are plain subprocesses
(``python -m wds_ocr.infer.postworker``), not multiprocessing children: nothing is forked from a
process that holds a CUDA context and loader threads, and nothing re-imports the user's main
script (which ``spawn`` and ``forkserver`` do). They import no torch.

Maps travel through the ring and everything else as msgpack frames (``infer.handoff``). The
parent's pipe ends are non-blocking and pumped with ``select``, so a busy worker never blocks the
parent; a parent that dies closes the pipes, which ends its workers. At most ``groups`` batches
are in flight: the next batch waits for the oldest group to come back. Until a worker is up (a
Python start and its imports, about 0.3 s each, longer on a busy machine) the parent scores the
batches it submits itself, with the same function on the same maps, so nothing waits for the start
and the results do not depend on when the workers came up.

Failure is never a hang: every wait has a deadline (``start_timeout`` for the workers to come up,
``result_timeout`` without any result while work is outstanding); a worker that exits, is killed
or raises is reported as ``PostprocessWorkerError`` naming the worker, the image it had and the
tail of its stderr, and the pool's workers are killed.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from wds_ocr.infer.handoff import (FrameBuffer, MapRing, PostprocessWorkerError, RingLayout, anonymous_file,
                                   outcome_from_message, pack_frame, truth_message)
from wds_ocr.infer.postworker import WORKER_MODULE
from wds_ocr.infer.scoring import ImageOutcome, ImageTruth, MapForm, ScoringSettings, score_image

__all__ = ["PostPool", "PostprocessWorkerError"]

# Seconds the workers have to import and map the ring (a loaded machine can be slow to start Python).
START_TIMEOUT = 120.0
# Seconds without any result while work is outstanding before the pool gives up (a receipt takes
# ~20 ms; CLEval's first call compiles for a few seconds).
RESULT_TIMEOUT = 300.0
# Seconds a closing worker has to exit after its input is closed, before it is killed.
EXIT_TIMEOUT = 10.0
# Bytes of a worker's stderr quoted in an error.
STDERR_TAIL = 2000


@dataclass
class _Worker:
    index: int
    process: subprocess.Popen
    stdin: int
    stdout: int
    stderr: BinaryIO
    inbox: FrameBuffer
    outbox: bytearray
    tasks: deque  # (task id, image name) sent and not yet answered, in order
    ready: bool = False


class PostPool:
    """``workers`` post-processing processes; see the module docstring.

    Use: ``start()`` (the workers begin importing), ``open_ring(form, S, capacity)`` once the map
    size is known, then per batch ``group, maps = acquire(n)``, fill ``maps``, ``submit(group,
    truths)``; ``outcomes`` fills as results arrive (``poll()``); ``finish()`` waits for all;
    ``close()`` ends the workers. Usable as a context manager (close on exit).
    """

    def __init__(self, workers: int, settings: ScoringSettings, groups: int = 3,
                 start_timeout: float = START_TIMEOUT, result_timeout: float = RESULT_TIMEOUT,
                 inline_start: bool = True):
        if workers < 1:
            raise ValueError(f"a post-processing pool needs at least 1 worker, got {workers}")
        if groups < 2:
            raise ValueError(f"the ring needs at least 2 groups (one filling, one in work), got {groups}")
        if os.name != "posix":
            raise PostprocessWorkerError("post-processing workers need a POSIX system (inherited descriptors); "
                                         "use --post-workers 0")
        self.count = workers
        self.settings = settings
        self.groups = groups
        self.start_timeout = start_timeout
        self.result_timeout = result_timeout
        self.inline_start = inline_start  # False: submit() waits for a worker instead of scoring here
        self.workers: list[_Worker] = []
        self.ring: MapRing | None = None
        self._fd: int | None = None  # the ring's file, created before the workers so they inherit it
        self.outcomes: dict[int, ImageOutcome] = {}
        self.waited_s = 0.0  # time blocked waiting for a free group or the last results
        self.start_wait_s = 0.0  # time blocked in wait_until_up() (none with inline_start: see submit)
        self.up_s = 0.0  # seconds from start() until every worker was up (or until finish(), if later)
        self.inline_images = 0  # maps scored in this process while no worker was up yet
        self._form: MapForm | None = None
        self._started_at = 0.0
        self.task_bytes = 0  # bytes of task messages sent (the maps themselves never go through a pipe)
        self._next_task = 0
        self._next_group = 0
        self._group_tasks: list[set[int]] = [set() for _ in range(groups)]
        self._task_group: dict[int, int] = {}
        self._failed = False  # a PostprocessWorkerError was raised: close() kills

    # -- lifecycle

    def __enter__(self) -> "PostPool":
        self.start()
        return self

    def __exit__(self, kind, value, tb) -> None:
        self.close(kill=kind is not None)

    def start(self) -> None:
        package_root = str(Path(__file__).resolve().parents[2])
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
            [package_root, *filter(None, [os.environ.get("PYTHONPATH")])]))
        self._fd = anonymous_file()
        self._started_at = time.perf_counter()
        for index in range(self.count):
            stderr = tempfile.TemporaryFile()
            process = subprocess.Popen([sys.executable, "-m", WORKER_MODULE, str(self._fd)], stdin=subprocess.PIPE,
                                       stdout=subprocess.PIPE, stderr=stderr, env=env, close_fds=True,
                                       pass_fds=(self._fd,))
            stdin, stdout = process.stdin.fileno(), process.stdout.fileno()
            os.set_blocking(stdin, False)
            os.set_blocking(stdout, False)
            self.workers.append(_Worker(index, process, stdin, stdout, stderr,
                                        FrameBuffer(f"post-processing worker {index}"), bytearray(), deque()))

    def open_ring(self, form: MapForm, map_size: int, capacity: int) -> None:
        """Create the ring for maps of ``map_size`` in ``form``, ``capacity`` per batch, and hand it
        to every worker (they map it and report ready; nothing waits for that here)."""
        if self.ring is not None:
            raise RuntimeError("the ring is already open")
        layout = RingLayout(self.groups, capacity, map_size, form.dtype.itemsize)
        self.ring = MapRing(self._fd, layout, form.dtype)
        hello = {"op": "ring", "nbytes": layout.nbytes, "groups": layout.groups, "capacity": layout.capacity,
                 "map_size": layout.map_size, "form": form.kind,
                 "table": None if form.table is None else form.table.astype("<f4").tobytes(),
                 "postprocess": self.settings.postprocess.model_dump(mode="json"), "metric": self.settings.metric,
                 "alternatives": [a.model_dump(mode="json") for a in self.settings.alternatives]}
        self._form = form
        for worker in self.workers:
            worker.outbox += pack_frame(hello)
        self._pump(0.0)

    def close(self, kill: bool = False) -> None:
        """End the workers: close their input and let them exit, or kill them when ``kill``, after a
        failure, or while they still hold work (a stopped or stuck worker would never exit)."""
        kill = kill or self._failed or any(w.tasks for w in self.workers)
        for worker in self.workers:
            if kill:
                worker.process.kill()
            else:
                try:
                    if worker.outbox:
                        os.set_blocking(worker.stdin, True)
                        os.write(worker.stdin, worker.outbox)
                except OSError:
                    pass
            for pipe in (worker.process.stdin, worker.process.stdout):
                try:
                    pipe.close()
                except OSError:
                    pass
        deadline = time.monotonic() + EXIT_TIMEOUT
        for worker in self.workers:
            try:
                worker.process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                worker.process.kill()
                worker.process.wait()
            worker.stderr.close()
        self.workers = []
        if self.ring is not None:
            self.ring.close()
            self.ring = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    # -- work

    def acquire(self, count: int) -> tuple[int, np.ndarray]:
        """The next group's first ``count`` buffers, once its previous batch is done."""
        if self.ring is None:
            raise RuntimeError("open_ring() first")
        if not 0 < count <= self.ring.layout.capacity:
            raise ValueError(f"a batch of {count} maps does not fit the ring's {self.ring.layout.capacity} per group")
        group = self._next_group
        self._next_group = (group + 1) % self.groups
        started = time.perf_counter()
        self._wait(lambda: not self._group_tasks[group], self.result_timeout, "for a free map buffer")
        self.waited_s += time.perf_counter() - started
        return group, self.ring.group(group, count)

    def submit(self, group: int, truths: list[ImageTruth]) -> list[int]:
        """Hand out one task per map of ``group`` (row i <-> truths[i]) to the workers that are up;
        their task ids, in order. While none is up, score them here (``inline_images``)."""
        self._pump(0.0)
        self._check_alive()
        ready = [w for w in self.workers if w.ready]
        if not ready and not self.inline_start:
            self.wait_until_up()
            ready = list(self.workers)
        if not ready:
            self._check_start_deadline()
            maps = self.ring.group(group, len(truths))
            ids = []
            for row, truth in enumerate(truths):
                task = self._next_task
                self._next_task += 1
                self.outcomes[task] = score_image(maps[row], self._form, truth, self.settings)
                ids.append(task)
            self.inline_images += len(truths)
            return ids
        ids = []
        for row, truth in enumerate(truths):
            task = self._next_task
            self._next_task += 1
            worker = min(ready, key=lambda w: (len(w.tasks), w.index))
            frame = pack_frame(truth_message(task, group, row, truth))
            worker.outbox += frame
            self.task_bytes += len(frame)
            worker.tasks.append((task, truth.name))
            self._group_tasks[group].add(task)
            self._task_group[task] = group
            ids.append(task)
        self._pump(0.0)
        return ids

    def poll(self) -> None:
        """Take whatever results have arrived, without waiting."""
        self._pump(0.0)
        self._check_alive()
        self._check_start_deadline()

    def finish(self) -> None:
        """Wait until every submitted task has its outcome."""
        started = time.perf_counter()
        self._wait(lambda: len(self.outcomes) == self._next_task, self.result_timeout, "for post-processing results")
        self.waited_s += time.perf_counter() - started
        if not self.up_s:
            self.up_s = time.perf_counter() - self._started_at

    def wait_until_up(self) -> None:
        """Block until every worker is up, at most ``start_timeout`` seconds without an answer
        (the time blocked counts in ``start_wait_s``)."""
        started = time.perf_counter()
        self._wait(lambda: all(w.ready for w in self.workers), self.start_timeout,
                   "for the post-processing workers to start")
        self.start_wait_s += time.perf_counter() - started

    def _check_start_deadline(self) -> None:
        """A worker still not up ``start_timeout`` seconds after start() is an error."""
        if all(w.ready for w in self.workers) or time.perf_counter() - self._started_at <= self.start_timeout:
            return
        self._failed = True
        late = [f"worker {w.index}" for w in self.workers if not w.ready]
        raise PostprocessWorkerError(
            f"waited {self.start_timeout:.0f} s for the post-processing workers to start without any answer from "
            f"{', '.join(late)}; they were stopped")

    # -- plumbing

    def _wait(self, done, timeout: float, what: str) -> None:
        last = time.monotonic()
        while not done():
            if self._pump(0.2):
                last = time.monotonic()
            self._check_alive()
            if time.monotonic() - last > timeout:
                busy = [f"worker {w.index} on {w.tasks[0][1]}" for w in self.workers if w.tasks]
                self._failed = True
                raise PostprocessWorkerError(
                    f"waited {timeout:.0f} s {what} without any answer from the post-processing workers"
                    + (f" ({', '.join(busy)})" if busy else "") + "; they were stopped")

    def _pump(self, timeout: float) -> bool:
        """One round of non-blocking I/O with every worker; True when anything was read."""
        readers = [w.stdout for w in self.workers]
        writers = [w.stdin for w in self.workers if w.outbox]
        if not readers:
            return False
        readable, writable, _ = select.select(readers, writers, [], timeout)
        by_fd = {w.stdout: w for w in self.workers} | {w.stdin: w for w in self.workers}
        for fd in writable:
            worker = by_fd[fd]
            try:
                sent = os.write(fd, worker.outbox)
            except BlockingIOError:
                continue
            except OSError:
                raise self._died(worker) from None
            del worker.outbox[:sent]
        for fd in readable:
            worker = by_fd[fd]
            try:
                chunk = os.read(fd, 1 << 20)
            except BlockingIOError:
                continue
            if not chunk:
                raise self._died(worker)
            worker.inbox.data += chunk
            for message in worker.inbox.frames():
                self._receive(worker, message)
        return bool(readable)

    def _receive(self, worker: _Worker, message: dict[str, Any]) -> None:
        op = message.get("op")
        if op == "ready":
            worker.ready = True
            if all(w.ready for w in self.workers):
                self.up_s = time.perf_counter() - self._started_at
            return
        if op == "done" and worker.tasks and message.get("id") == worker.tasks[0][0]:
            task, _ = worker.tasks.popleft()
            self.outcomes[task] = outcome_from_message(message)
            self._group_tasks[self._task_group.pop(task)].discard(task)
            return
        self._failed = True
        where = f" on {worker.tasks[0][1]}" if worker.tasks else ""
        if op == "done":
            raise PostprocessWorkerError(f"post-processing worker {worker.index} answered task {message.get('id')!r}, "
                                         f"which it was not working on{where}")
        if op == "error":
            raise PostprocessWorkerError(f"post-processing worker {worker.index} failed{where}: {message['error']}")
        raise PostprocessWorkerError(f"post-processing worker {worker.index} sent an unknown message {op!r}")

    def _check_alive(self) -> None:
        for worker in self.workers:
            if worker.process.poll() is not None:
                raise self._died(worker)

    def _died(self, worker: _Worker) -> PostprocessWorkerError:
        self._failed = True
        try:
            code = worker.process.wait(timeout=EXIT_TIMEOUT)
        except subprocess.TimeoutExpired:
            code = None
        how = ("did not exit" if code is None else
               f"was killed by signal {signal.Signals(-code).name}" if code < 0 else f"exited with status {code}")
        worker.stderr.seek(0, os.SEEK_END)
        size = worker.stderr.tell()
        worker.stderr.seek(max(0, size - STDERR_TAIL))
        tail = worker.stderr.read().decode("utf-8", "replace").strip()
        where = f" while working on {worker.tasks[0][1]}" if worker.tasks else ""
        return PostprocessWorkerError(f"post-processing worker {worker.index} (pid {worker.process.pid}) {how}{where}"
                                      + (f"; its last words: {tail}" if tail else ""))
