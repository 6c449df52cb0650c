"""Shards in a local folder: positioned reads (``os.preadv``) of regular files of the manifest's size."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Callable

from wds_ocr.errors import ShardFormatError
from wds_ocr.shards.naming import is_shard_name
from wds_ocr.shards.tario import open_shard
from wds_ocr.storage.reader import Deadline, RangeReader


class LocalReader(RangeReader):
    """``os.pread`` on shard files, each checked once (regular file, the manifest's size) when opened.

    ``before_open`` runs before each new shard is opened (the stream checks there that the manifest
    is still the one it read, so a shard rebuilt since is not mixed in)."""

    def __init__(self, folder: Path, sizes: dict[str, int] | None = None, before_open: Callable[[], None] | None = None):
        self.folder = folder
        self.sizes = sizes or {}
        self.before_open = before_open
        self._fds: dict[str, int] = {}
        self._pid = os.getpid()
        self._lock = threading.Lock()

    def _fd(self, shard: str) -> int:
        if self._pid != os.getpid():  # forked into a worker: do not share descriptors' positions/lifetimes
            self._fds = {}
            self._pid = os.getpid()
            self._lock = threading.Lock()
        fd = self._fds.get(shard)
        if fd is None:
            with self._lock:
                fd = self._fds.get(shard)
                if fd is None:
                    if not is_shard_name(shard):
                        raise ShardFormatError(shard, None, "not a shard name (plain shard-NNNNNN.tar)")
                    if self.before_open is not None:
                        self.before_open()
                    fd = open_shard(self.folder / shard, shard, self.sizes.get(shard))
                    self._fds[shard] = fd
        return fd

    def read(self, shard: str, start: int, stop: int, deadline: Deadline | None = None) -> bytes:
        data = os.pread(self._fd(shard), stop - start, start)
        if len(data) != stop - start:
            raise ShardFormatError(shard, None, f"truncated: bytes {start}..{stop} requested, {len(data)} read")
        return data

    def read_into(self, shard: str, start: int, stop: int, out: memoryview, deadline: Deadline | None = None) -> None:
        fd = self._fd(shard)
        wanted = stop - start
        got = 0
        while got < wanted:  # a regular file gives it all at once; a signal may cut a read short
            count = os.preadv(fd, [out[got:wanted]], start + got)
            if count == 0:
                break
            got += count
        if got != wanted:
            raise ShardFormatError(shard, None, f"truncated: bytes {start}..{stop} requested, {got} read")

    def describe(self, shard: str) -> str:
        return str(self.folder / shard)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}

    def __del__(self) -> None:
        if getattr(self, "_pid", None) == os.getpid():
            self.close()


__all__ = ["LocalReader"]
