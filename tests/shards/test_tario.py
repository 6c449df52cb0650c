"""Reproducible tar writing and the strict member reader."""

from __future__ import annotations

import hashlib
import io
import tarfile

import pytest

from wds_ocr.errors import ShardFormatError
from wds_ocr.shards.tario import BLOCK, TarWriter, iter_members, member_span, parse_header

SHARD = "bad.tar"
PAYLOADS = [("0000000_a.msgpack", b"x" * 700), ("0000001_b.msgpack", b"y" * 1024), ("0000002_c.msgpack", b"")]


def write_shard(members=PAYLOADS) -> tuple[bytes, TarWriter, list[str]]:
    out = io.BytesIO()
    writer = TarWriter(out)
    digests = [writer.add(name, data)[1] for name, data in members]
    total, sha = writer.close()
    data = out.getvalue()
    assert total == len(data) and sha == hashlib.sha256(data).hexdigest()
    return data, writer, digests


def hostile_tar(info: tarfile.TarInfo, data: bytes = b"") -> bytes:
    """A tar with one entry described by ``info``, written by the standard library."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        info.size = len(data) if info.type == tarfile.REGTYPE else 0
        tar.addfile(info, io.BytesIO(data) if info.type == tarfile.REGTYPE else None)
    return out.getvalue()


def read_error(data: bytes, **kwargs) -> ShardFormatError:
    with pytest.raises(ShardFormatError) as caught:
        list(iter_members(io.BytesIO(data), SHARD, **kwargs))
    assert caught.value.shard == SHARD
    return caught.value


def test_writer_is_reproducible_with_fixed_metadata():
    first, writer, digests = write_shard()
    again, _, _ = write_shard()
    assert first == again
    assert len(first) % (20 * BLOCK) == 0  # padded to tar's record size
    assert writer.offsets == [0, member_span(700), member_span(700) + member_span(1024)]
    assert writer.members_end == writer.offsets[-1] + member_span(0)
    with tarfile.open(fileobj=io.BytesIO(first)) as tar:
        infos = tar.getmembers()
    assert [i.name for i in infos] == [name for name, _ in PAYLOADS]
    assert {(i.mtime, i.uid, i.gid, i.uname, i.gname, i.mode, i.type) for i in infos} == {
        (0, 0, 0, "", "", 0o644, tarfile.REGTYPE)
    }
    spans = [first[o : o + member_span(len(d))] for o, (_, d) in zip(writer.offsets, PAYLOADS)]
    assert digests == [hashlib.sha256(span).hexdigest() for span in spans]


def test_writer_bytes_are_what_tarfile_writes_for_the_same_members():
    ours, _, _ = write_shard()
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in PAYLOADS:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode, info.uid, info.gid = len(data), 0, 0o644, 0, 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(data))
    assert ours == out.getvalue()


def test_member_span():
    assert [member_span(n) for n in (0, 1, 512, 513)] == [512, 1024, 1024, 1536]


def test_reader_returns_members_offsets_and_digests():
    data, writer, digests = write_shard()
    hasher = hashlib.sha256()
    members = list(iter_members(io.BytesIO(data), SHARD, hasher=hasher))
    assert [(m.key, m.extension, m.data) for m in members] == [
        ("0000000_a", "msgpack", b"x" * 700), ("0000001_b", "msgpack", b"y" * 1024), ("0000002_c", "msgpack", b"")
    ]
    assert [m.offset for m in members] == writer.offsets
    assert [m.span for m in members] == [member_span(700), member_span(1024), member_span(0)]
    assert [m.span_bytes_digest() for m in members] == digests
    assert members[0].padding == b"\x00" * (1024 - 700)
    assert hasher.hexdigest() == hashlib.sha256(data[: writer.members_end + BLOCK]).hexdigest()


def test_reader_starts_and_stops_at_member_offsets():
    data, writer, _ = write_shard()
    start, stop = writer.offsets[1], writer.offsets[2]
    stream = io.BytesIO(data)
    stream.seek(start)
    members = list(iter_members(stream, SHARD, start, stop))
    assert [(m.key, m.offset) for m in members] == [("0000001_b", start)]


def test_range_read_refuses_a_member_that_overruns_the_range():
    data, writer, _ = write_shard()
    stream = io.BytesIO(data)
    error = read_error(data, start=0, stop=writer.offsets[1] - BLOCK)
    assert error.key == "0000000_a"
    assert error.reason == "member at byte 0 declares 700 bytes, past the end of its range at byte 1024"
    stream.seek(writer.members_end)
    with pytest.raises(ShardFormatError) as caught:
        list(iter_members(stream, SHARD, writer.members_end, writer.members_end + BLOCK))
    assert caught.value.reason == f"end-of-archive at byte {writer.members_end}, expected members up to {writer.members_end + BLOCK}"


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("/etc/x.msgpack", "member at byte 0: path '/etc/x.msgpack' is not a flat member name (absolute or nested paths are refused)"),
        ("../x.msgpack", "member at byte 0: path '../x.msgpack' is not a flat member name (absolute or nested paths are refused)"),
        ("a/x.msgpack", "member at byte 0: path 'a/x.msgpack' is not a flat member name (absolute or nested paths are refused)"),
        ("..", "member at byte 0: path '..' is not a flat member name (absolute or nested paths are refused)"),
        ("noextension", "member at byte 0: name 'noextension' is not of the form <key>.<extension>"),
        (".hidden", "member at byte 0: name '.hidden' is not of the form <key>.<extension>"),
    ],
)
def test_unsafe_or_malformed_names_are_refused(name, reason):
    error = read_error(hostile_tar(tarfile.TarInfo(name), b"data"))
    assert error.reason == reason
    assert error.key is None


@pytest.mark.parametrize(
    ("kind", "what"),
    [
        (tarfile.SYMTYPE, "symbolic link"),
        (tarfile.LNKTYPE, "hard link"),
        (tarfile.CHRTYPE, "character device"),
        (tarfile.BLKTYPE, "block device"),
        (tarfile.DIRTYPE, "folder"),
        (tarfile.FIFOTYPE, "fifo"),
        (tarfile.CONTTYPE, "type b'7' entry"),
    ],
)
def test_links_devices_and_folders_are_refused(kind, what):
    info = tarfile.TarInfo("0000000_a.msgpack")
    info.type = kind
    if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE):
        info.linkname = "/etc/passwd"
    error = read_error(hostile_tar(info))
    stored = "0000000_a.msgpack/" if kind == tarfile.DIRTYPE else "0000000_a.msgpack"  # tarfile marks folders
    assert error.reason == f"member at byte 0 ('{stored}') is a {what}; shards hold regular files only"


def test_long_names_via_gnu_extension_are_refused():
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.GNU_FORMAT) as tar:
        info = tarfile.TarInfo("k" * 120 + ".msgpack")
        tar.addfile(info, io.BytesIO(b""))
    error = read_error(out.getvalue())
    assert error.reason == "member at byte 0 ('././@LongLink') is a type b'L' entry; shards hold regular files only"


def test_bad_header_checksum_is_refused():
    data, writer, _ = write_shard()
    corrupt = bytearray(data)
    corrupt[writer.offsets[1] + 140] ^= 0x01  # inside the mtime field
    error = read_error(bytes(corrupt))
    assert error.reason == f"member at byte {writer.offsets[1]} ('0000001_b.msgpack'): header checksum mismatch (corrupt shard)"
    assert parse_header(data[writer.offsets[1] : writer.offsets[1] + BLOCK], SHARD, 0) == ("0000001_b", "msgpack", 1024)


def test_invalid_size_field_is_refused():
    header = bytearray(hostile_tar(tarfile.TarInfo("0000000_a.msgpack"), b"abc")[:BLOCK])
    header[124:136] = b"zzzzzzzzzzz\x00"
    header[148:156] = b"        "
    header[148:156] = f"{sum(header):06o}\x00 ".encode()
    with pytest.raises(ShardFormatError) as caught:
        parse_header(bytes(header), SHARD, 0)
    assert (caught.value.key, caught.value.reason) == ("0000000_a", "member at byte 0: size field is invalid or over 2 GiB")


def test_truncation_is_refused_wherever_it_falls():
    data, writer, _ = write_shard()
    inside_data = read_error(data[: writer.offsets[1] + BLOCK + 100])
    assert (inside_data.key, inside_data.reason) == ("0000001_b", "truncated: member needs 1024 bytes, 100 present")
    inside_header = read_error(data[: writer.offsets[1] + 200])
    assert inside_header.reason == f"truncated at byte {writer.offsets[1] + 200}: no end-of-archive blocks"
    no_end = read_error(data[: writer.members_end])
    assert no_end.reason == f"truncated at byte {writer.members_end}: no end-of-archive blocks"
    ranged = read_error(data[: writer.offsets[1] + 100], start=0, stop=writer.offsets[2])
    assert ranged.reason == f"truncated at byte {writer.offsets[1] + 100}, expected data up to {writer.offsets[2]}"
