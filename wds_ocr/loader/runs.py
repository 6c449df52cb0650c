"""Remote reads of a batch: runs of adjacent members as one range request each, several in flight.

A batch's members that follow each other in one shard (and so in the batch buffer) are one request
of at most ``MAX_RUN`` bytes; up to ``parallel`` of a batch's requests are in flight at once on this
process's fetch threads, each landing in its own part of the buffer. The stream then checks every
member in place; a run whose request failed is read again member by member, so its error names
the member.
"""

from __future__ import annotations

import concurrent.futures
import os
import threading
from typing import Iterator

from wds_ocr.errors import ShardFormatError
from wds_ocr.loader.plan import BatchPlan
from wds_ocr.shards.manifest import Manifest
from wds_ocr.storage.reader import Deadline, RangeReader

MAX_RUN = 64 << 20  # bytes one request reads at most



def read_runs(reader: RangeReader, manifest: Manifest, plan: BatchPlan, slots: list, view: memoryview,
              deadline: Deadline, parallel: int) -> set[int]:
    """The plan positions whose bytes landed in ``view``. Every request has ended, one way or
    another, before this returns or raises: none writes into a buffer handed on."""
    requests = []
    for first, last in member_runs(plan, slots):
        shard = manifest.shards[plan.samples[first].shard].name
        start, offset = slots[first][0], slots[first][2]
        stop = slots[last][1]
        requests.append((first, last, shard, start, stop, view[offset : offset + stop - start]))

    def fetch(request) -> tuple[int, int] | None:
        first, last, shard, start, stop, into = request
        try:
            reader.read_into(shard, start, stop, into, deadline)
        except ShardFormatError:
            return None
        return first, last

    if len(requests) <= 1 or parallel <= 1:
        results = [fetch(request) for request in requests]
    else:
        pool = _fetchers(parallel)
        futures = [pool.submit(fetch, request) for request in requests]
        concurrent.futures.wait(futures)
        results = [future.result() for future in futures]  # the first failure, once all have ended
    landed: set[int] = set()
    for result in results:
        if result is not None:
            landed.update(range(result[0], result[1] + 1))
    return landed


def member_runs(plan: BatchPlan, slots: list) -> Iterator[tuple[int, int]]:
    """(first, last) plan positions of each run of members that follow each other in a shard."""
    first = None
    for index, slot in enumerate(slots):
        if isinstance(slot, ShardFormatError):
            if first is not None:
                yield first, index - 1
            first = None
            continue
        if first is not None:
            previous = slots[index - 1]
            if (plan.samples[index].shard != plan.samples[first].shard or isinstance(previous, ShardFormatError)
                    or previous[1] != slot[0] or slot[1] - slots[first][0] > MAX_RUN):
                yield first, index - 1
                first = index
        else:
            first = index
    if first is not None:
        yield first, len(slots) - 1


# This process's fetch threads: a pool per process id, made after a DataLoader worker forks
# (threads do not survive a fork).
_FETCHERS: dict[int, tuple[int, concurrent.futures.ThreadPoolExecutor]] = {}
_FETCHERS_LOCK = threading.Lock()


def _fetchers(count: int) -> concurrent.futures.ThreadPoolExecutor:
    with _FETCHERS_LOCK:
        pid = os.getpid()
        known = _FETCHERS.get(pid)
        if known is None or known[0] < count:
            # A larger pool replaces a smaller one; the smaller is left running (never shut down
            # under a stream that may still be submitting to it), its threads idle.
            pool = concurrent.futures.ThreadPoolExecutor(count, thread_name_prefix="wds-ocr-fetch")
            _FETCHERS.clear()  # a parent's entry, inherited by a fork, is of no use here
            _FETCHERS[pid] = (count, pool)
            return pool
        return known[1]
