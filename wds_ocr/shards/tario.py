"""Reproducible tar writing and a strict tar member reader.

Writing: ustar members with fixed mtime/uid/gid/mode and empty owner names, in the order given,
so the same records always give the same bytes. Reading: only flat, regular members named
``<key>.<ext>`` are accepted; absolute or ``..`` paths, folders, links, devices and fifos, and
headers with a bad checksum are errors that name the shard and the member. Unlike ``tarfile``
the reader can start at any member offset and stop after a byte limit (exact range reads from the
manifest's per-sample offsets).
"""

from __future__ import annotations

import hashlib
import os
import stat
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

import xxhash

from wds_ocr.data.paths import link_escape
from wds_ocr.errors import ShardFormatError

BLOCK = 512
MAX_MEMBER_BYTES = 1 << 31


@dataclass(frozen=True)
class Member:
    key: str
    extension: str
    offset: int  # byte offset of the member's header block in the shard
    span: int  # header + data + padding
    data: bytes
    header: bytes  # the raw 512-byte header block
    padding: bytes  # the raw bytes between the data and the next block boundary

    def span_bytes_digest(self) -> str:
        """sha256 hex of the member exactly as stored (header + data + padding)."""
        digest = hashlib.sha256(self.header)
        digest.update(self.data)
        digest.update(self.padding)
        return digest.hexdigest()

    def span_checksum(self) -> str:
        """xxh3-64 hex of the member exactly as stored: the manifest's per-member checksum."""
        checksum = xxhash.xxh3_64(self.header)
        checksum.update(self.data)
        checksum.update(self.padding)
        return checksum.hexdigest()


def span_checksum(span: bytes | memoryview) -> str:
    """xxh3-64 hex of a member's bytes as read (header + data + padding)."""
    return xxhash.xxh3_64_hexdigest(span)


def member_span(size: int) -> int:
    """Bytes a member of ``size`` data bytes occupies: header block + data padded to 512."""
    return BLOCK + (size + BLOCK - 1) // BLOCK * BLOCK


# tarfile pads an archive to a multiple of its record size (20 blocks).
RECORD_SIZE = 20 * BLOCK


@dataclass(frozen=True)
class MemberBytes:
    """One member exactly as it will be stored (header + data + padding), with its hashes.

    Made where the record is made (a build's worker process), so the parent that writes the
    shard in order only copies the bytes and hashes the whole file once."""

    span: bytes
    digest: str  # sha256 hex of the span
    checksum: str  # xxh3-64 hex of the span: the manifest's per-member checksum

    @property
    def size(self) -> int:
        return len(self.span)


def member_header(name: str, size: int) -> bytes:
    """The 512-byte ustar header of a member with the fixed metadata every shard uses."""
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info.tobuf(tarfile.USTAR_FORMAT, tarfile.ENCODING, "surrogateescape")


def member_bytes(name: str, data: bytes) -> MemberBytes:
    """``data`` as the member ``name``: the same bytes ``tarfile`` writes for it, and their hashes."""
    padding = b"\0" * (-len(data) % BLOCK)
    span = b"".join((member_header(name, len(data)), data, padding))
    return MemberBytes(span, hashlib.sha256(span).hexdigest(), xxhash.xxh3_64_hexdigest(span))


class TarWriter:
    """Append members with fixed metadata; track offsets, bytes and the file's sha256.

    The output is what ``tarfile`` writes for the same members in ustar format (end-of-archive
    blocks and record padding included), written without it: one write per member."""

    def __init__(self, raw: BinaryIO):
        self._raw = raw
        self._sha256 = hashlib.sha256()
        self._count = 0
        self.offsets: list[int] = []
        self.members_end = 0

    def _write(self, data: bytes) -> None:
        self._sha256.update(data)
        self._raw.write(data)
        self._count += len(data)

    def add(self, name: str, data: bytes) -> tuple[int, str, str]:
        """Append a member; return its header offset and the sha256 and xxh3-64 hex of its span."""
        member = member_bytes(name, data)
        return self.add_member(member), member.digest, member.checksum

    def add_member(self, member: MemberBytes) -> int:
        """Append a member made by ``member_bytes``; return its header offset."""
        offset = self._count
        self._write(member.span)
        self.offsets.append(offset)
        self.members_end = self._count
        return offset

    def close(self) -> tuple[int, str]:
        """Write the end-of-archive blocks; return (total bytes, sha256 hex)."""
        end = self._count + 2 * BLOCK
        self._write(b"\0" * (2 * BLOCK + -end % RECORD_SIZE))
        return self._count, self._sha256.hexdigest()


def _octal(field: bytes) -> int | None:
    text = field.rstrip(b"\x00 ").lstrip(b" ")
    if not text:
        return 0
    try:
        return int(text, 8)
    except ValueError:
        return None


def _checksum_ok(header: bytes) -> bool:
    stored = _octal(header[148:156])
    computed = sum(header[:148]) + 8 * 32 + sum(header[156:])
    return stored == computed


def parse_header(header: bytes, shard: str, offset: int) -> tuple[str, str, int] | None:
    """(key, extension, size) of a member header, None for an end-of-archive block."""
    if header == b"\x00" * BLOCK:
        return None
    raw_name = header[0:100].split(b"\x00", 1)[0]
    prefix = header[345:500].split(b"\x00", 1)[0] if header[257:262] == b"ustar" else b""
    where = f"member at byte {offset}"
    try:
        name = (prefix + b"/" + raw_name if prefix else raw_name).decode("utf-8")
    except UnicodeDecodeError:
        raise ShardFormatError(shard, None, f"{where}: name is not UTF-8") from None
    if not _checksum_ok(header):
        raise ShardFormatError(shard, None, f"{where} ({name!r}): header checksum mismatch (corrupt shard)")
    kind = header[156:157]
    if kind not in (b"0", b"\x00"):
        what = {b"1": "hard link", b"2": "symbolic link", b"3": "character device", b"4": "block device",
                b"5": "folder", b"6": "fifo"}.get(kind, f"type {kind!r} entry")
        raise ShardFormatError(shard, None, f"{where} ({name!r}) is a {what}; shards hold regular files only")
    if name.startswith("/") or "/" in name or "\\" in name or name in (".", ".."):
        raise ShardFormatError(shard, None, f"{where}: path {name!r} is not a flat member name (absolute or nested paths are refused)")
    if "." not in name or name.startswith("."):
        raise ShardFormatError(shard, None, f"{where}: name {name!r} is not of the form <key>.<extension>")
    key, extension = name.split(".", 1)
    size = _octal(header[124:136])
    if size is None or size < 0 or size > MAX_MEMBER_BYTES:
        raise ShardFormatError(shard, key, f"{where}: size field is invalid or over 2 GiB")
    return key, extension, size


def open_shard(path: Path, shard: str, expected_bytes: int | None = None) -> int:
    """A read-only descriptor of a shard file that is a regular file (of ``expected_bytes`` when
    given); ShardFormatError naming the shard otherwise. Symbolic links are followed only within
    the shard folder (``paths.link_escape``)."""
    escape = link_escape(path)
    if escape is not None:
        raise ShardFormatError(shard, None, escape)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise ShardFormatError(shard, None, f"shard file {path} does not exist") from None
    except (OSError, ValueError) as exc:
        raise ShardFormatError(shard, None, f"shard file {path} cannot be opened: "
                                            f"{getattr(exc, 'strerror', None) or exc}") from None
    info = os.fstat(fd)
    problem = None
    if not stat.S_ISREG(info.st_mode):
        problem = f"{path} is not a regular file"
    elif expected_bytes is not None and info.st_size != expected_bytes:
        problem = (f"shard file {path} is {info.st_size} bytes, the manifest says {expected_bytes} "
                   "(rebuilt, truncated or replaced?)")
    if problem is not None:
        os.close(fd)
        raise ShardFormatError(shard, None, problem)
    return fd


def read_span(path: Path, shard: str, start: int, stop: int, expected_bytes: int | None = None) -> bytes:
    """Bytes [start, stop) of a shard file (checked with ``open_shard``)."""
    fd = open_shard(path, shard, expected_bytes)
    try:
        data = os.pread(fd, stop - start, start)
    finally:
        os.close(fd)
    if len(data) != stop - start:
        raise ShardFormatError(shard, None, f"truncated: bytes {start}..{stop} requested, {len(data)} read")
    return data


def _read_exact(stream: BinaryIO, count: int) -> bytes:
    data = stream.read(count)
    if len(data) == count or not data:
        return data
    parts = [data]
    got = len(data)
    while got < count:
        more = stream.read(count - got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def iter_members(
    stream: BinaryIO, shard: str, start: int = 0, stop: int | None = None, hasher=None
) -> Iterator[Member]:
    """Yield members from ``stream`` positioned at byte ``start`` of the shard, up to byte ``stop``.

    With ``stop=None`` reading continues to the end-of-archive blocks, which must be present.
    ``hasher`` (e.g. hashlib.sha256()) sees every byte read, for streaming integrity checks.
    """
    offset = start
    while stop is None or offset < stop:
        header = _read_exact(stream, BLOCK)
        if hasher is not None:
            hasher.update(header)
        if len(header) < BLOCK:
            if stop is None:
                raise ShardFormatError(shard, None, f"truncated at byte {offset + len(header)}: no end-of-archive blocks")
            raise ShardFormatError(shard, None, f"truncated at byte {offset + len(header)}, expected data up to {stop}")
        parsed = parse_header(header, shard, offset)
        if parsed is None:
            if stop is not None:
                raise ShardFormatError(shard, None, f"end-of-archive at byte {offset}, expected members up to {stop}")
            return
        key, extension, size = parsed
        padded = (size + BLOCK - 1) // BLOCK * BLOCK
        if stop is not None and offset + BLOCK + padded > stop:
            raise ShardFormatError(shard, key, f"member at byte {offset} declares {size} bytes, past the end of its "
                                               f"range at byte {stop}")
        data = _read_exact(stream, size)
        padding = _read_exact(stream, padded - size) if padded > size else b""
        if hasher is not None:
            hasher.update(data)
            hasher.update(padding)
        if len(data) + len(padding) < padded:
            raise ShardFormatError(shard, key, f"truncated: member needs {size} bytes, {len(data)} present")
        yield Member(key, extension, offset, BLOCK + padded, data, header, padding)
        offset += BLOCK + padded
