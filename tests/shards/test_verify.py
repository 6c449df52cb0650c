"""verify: every injected fault is caught and named by shard and key; clean shards pass."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import shutil
from pathlib import Path

import msgpack
import numpy as np
import pytest
from click.testing import CliRunner

from test_build import build, settings
from wds_ocr.cli import cli
from wds_ocr.config import load_config
from wds_ocr.data.coverage import Coverage
from wds_ocr.errors import ShardFormatError
from wds_ocr.shards.codec import decode_record, encode_arrays
from wds_ocr.shards.manifest import load_manifest, write_manifest
from wds_ocr.shards.tario import BLOCK, Member, TarWriter, iter_members
from wds_ocr.shards.verify import verify_shards

SHARD = "shard-000001.tar"  # holds samples 3, 4, 5


@pytest.fixture(scope="module")
def clean(synth_root, tmp_path_factory) -> Path:
    """9 records at 128x128 in 3 shards of 3."""
    out = tmp_path_factory.mktemp("verify_clean") / "s"
    build(synth_root, out, settings(128, 3))
    return out


@pytest.fixture
def folder(clean, tmp_path) -> Path:
    target = tmp_path / "s"
    shutil.copytree(clean, target)
    return target


def problems(report) -> list[tuple]:
    return [(p.shard, p.key, p.what) for p in report.problems]


def members(folder: Path, name: str = SHARD) -> list[Member]:
    with open(folder / name, "rb") as handle:
        return list(iter_members(handle, name))


def flip(path: Path, position: int) -> None:
    data = bytearray(path.read_bytes())
    data[position] ^= 0x5A
    path.write_bytes(bytes(data))


def sha_line(folder: Path, manifest_sha: str, name: str = SHARD) -> tuple:
    actual = hashlib.sha256((folder / name).read_bytes()).hexdigest()
    return (name, None, f"sha256 {actual[:16]}... differs from the manifest's {manifest_sha[:16]}...")


def write_tar(path: Path, items: list[tuple[str, bytes]]) -> None:
    with open(path, "wb") as handle:
        writer = TarWriter(handle)
        for key, data in items:
            writer.add(f"{key}.msgpack", data)
        writer.close()


def rewrite_shard(folder: Path, items: list[tuple[str, bytes]], name: str = SHARD) -> None:
    """Write ``name`` with these (key, record) members and make the manifest agree with it."""
    out = io.BytesIO()
    writer = TarWriter(out)
    added = [writer.add(f"{key}.msgpack", data) for key, data in items]
    digests = [sha[:16] for _, sha, _ in added]
    checksums = tuple(checksum for _, _, checksum in added)
    total, sha = writer.close()
    (folder / name).write_bytes(out.getvalue())
    manifest = load_manifest(folder)
    keys = tuple(key for key, _ in items)
    shards = tuple(
        dataclasses.replace(e, samples=len(items), bytes=total, sha256=sha, first_key=keys[0], last_key=keys[-1],
                            keys=keys, offsets=tuple(writer.offsets), digests=tuple(digests),
                            members_end=writer.members_end, checksums=checksums)
        if e.name == name else e
        for e in manifest.shards
    )
    written = sum(e.samples for e in shards)
    coverage = Coverage()
    for entry in shards:
        data_of = dict(items) if entry.name == name else {m.key: m.data for m in members(folder, entry.name)}
        for key in entry.keys:
            try:  # a deliberately broken record counts no words
                coverage += Coverage.from_codes(decode_record(data_of[key]).arrays["left_out"])
            except ShardFormatError:
                pass
    counts = dataclasses.replace(manifest.counts, written=written, samples_in=written + manifest.counts.rejected,
                                 words=coverage)
    write_manifest(folder / "manifest.json", dataclasses.replace(manifest, shards=shards, counts=counts))


def reencode(data: bytes, edit) -> bytes:
    """A record re-encoded after ``edit(header, blob)`` changed its header or blob."""
    header, blob = msgpack.unpackb(data)
    blob = bytearray(blob)
    edit(header, blob)
    return b"\x92" + msgpack.packb(header) + b"\xc6" + len(blob).to_bytes(4, "big") + bytes(blob)


def run_cli(*args: str):
    return CliRunner().invoke(cli, ["verify", *map(str, args)])


# --- clean -----------------------------------------------------------------------------------


def test_clean_shards_verify_ok(clean, synth_root):
    report = verify_shards(clean)
    assert report.ok and report.problems == []
    assert (report.shards_checked, report.samples_checked, report.stale) == (3, 9, False)
    report = verify_shards(clean, against_source=synth_root)
    assert report.ok and report.compared_with_source == 9
    coverage = load_manifest(clean).coverage.summary()
    assert report.coverage == load_manifest(clean).counts.words.as_dict()
    result = run_cli(clean)
    assert (result.exit_code, result.output) == (0, f"{coverage}\n3 shards, 9 records checked: OK\n")
    result = run_cli(clean, "--against-source", synth_root, "--sample", "4")
    assert (result.exit_code, result.output) == (
        0, f"{coverage}\n3 shards, 9 records checked, 4 equal-checked against the source: OK\n")


def test_end_of_archive_right_at_a_record_boundary_is_not_a_problem(folder):
    # Regression: a shard whose members end 1024 bytes before a 10240-byte record boundary has
    # exactly two end blocks and no padding; verify used to call them damaged.
    member, *others = members(folder)
    rest = sum(m.span for m in others)
    for extra in range(0, 20 * BLOCK, 64):
        record = decode_record(member.data)
        texts = record.meta.texts
        meta = dataclasses.replace(record.meta, texts=((texts[0] or "") + "n" * extra, *texts[1:]))
        data = encode_arrays(meta, record.arrays)
        span = BLOCK + (len(data) + BLOCK - 1) // BLOCK * BLOCK
        if (span + rest) % (20 * BLOCK) == 18 * BLOCK:
            break
    else:
        pytest.fail("no meta length gave the wanted member span")
    rewrite_shard(folder, [(member.key, data), *((m.key, m.data) for m in others)])
    assert (folder / SHARD).stat().st_size - load_manifest(folder).shards[1].members_end == 2 * BLOCK
    assert problems(verify_shards(folder)) == []


# --- corrupt bytes -----------------------------------------------------------------------------


def test_flipped_byte_in_record_data(folder, synth_root):
    member = members(folder)[1]
    header, blob = msgpack.unpackb(member.data)
    pixel = len(member.data) - len(blob) + header["arrays"]["image"]["offset"] + 100
    flip(folder / SHARD, member.offset + BLOCK + pixel)
    sha = load_manifest(folder).shards[1].sha256
    corrupt = (SHARD, member.key, "member bytes differ from the manifest digest (corrupt member)")
    assert problems(verify_shards(folder)) == [corrupt, sha_line(folder, sha)]
    report = verify_shards(folder, against_source=synth_root)
    assert problems(report) == [corrupt, (SHARD, member.key, "differs from the live pipeline: image differs at 1 elements"),
                                sha_line(folder, sha)]
    result = run_cli(folder)
    assert result.exit_code == 1
    assert result.output.splitlines() == [
        f"{SHARD} {member.key}: member bytes differ from the manifest digest (corrupt member)",
        f"{SHARD}: {sha_line(folder, sha)[2]}",
        load_manifest(folder).coverage.summary(),
        "3 shards, 9 records checked: 2 problem(s)",
    ]


def test_flipped_byte_in_a_tar_header(folder):
    member = members(folder)[2]
    flip(folder / SHARD, member.offset + 140)  # the mtime field
    assert problems(verify_shards(folder)) == [
        (SHARD, member.key, f"member at byte {member.offset} ('{member.key}.msgpack'): header checksum mismatch (corrupt shard)")
    ]


def test_flipped_byte_in_member_padding(folder):
    member = next(m for m in members(folder) if m.padding)
    flip(folder / SHARD, member.offset + BLOCK + len(member.data) + 1)
    sha = load_manifest(folder).shards[1].sha256
    assert problems(verify_shards(folder)) == [
        (SHARD, member.key, "member bytes differ from the manifest digest (corrupt member)"), sha_line(folder, sha)
    ]


def test_flipped_byte_in_the_end_of_archive_blocks(folder):
    entry = load_manifest(folder).shards[1]
    flip(folder / SHARD, entry.members_end + BLOCK + 7)
    assert problems(verify_shards(folder)) == [
        (SHARD, None, "end-of-archive blocks are damaged or missing"), sha_line(folder, entry.sha256)
    ]


def test_truncated_shard(folder):
    entry = load_manifest(folder).shards[1]
    member = members(folder)[1]
    path = folder / SHARD
    path.write_bytes(path.read_bytes()[: member.offset + BLOCK + 1000])
    size = (SHARD, None, f"size {member.offset + BLOCK + 1000} bytes, manifest says {entry.bytes} (truncated or appended?)")
    assert problems(verify_shards(folder)) == [
        size, (SHARD, member.key, f"truncated: member needs {len(member.data)} bytes, 1000 present")
    ]
    path.write_bytes(path.read_bytes()[: member.offset])
    size = (SHARD, None, f"size {member.offset} bytes, manifest says {entry.bytes} (truncated or appended?)")
    assert problems(verify_shards(folder)) == [
        size, (SHARD, member.key, f"truncated at byte {member.offset}: no end-of-archive blocks")
    ]


# --- members that disagree with the manifest ---------------------------------------------------


def test_deleted_member(folder):
    entry = load_manifest(folder).shards[1]
    kept = members(folder)
    deleted = kept.pop(1)
    write_tar(folder / SHARD, [(m.key, m.data) for m in kept])
    size = (folder / SHARD).stat().st_size
    assert problems(verify_shards(folder)) == [
        (SHARD, None, f"size {size} bytes, manifest says {entry.bytes} (truncated or appended?)"),
        (SHARD, deleted.key, "listed in the manifest but missing from the shard (deleted member?)"),
        sha_line(folder, entry.sha256),
    ]


def test_inserted_member(folder):
    entry = load_manifest(folder).shards[1]
    items = [(m.key, m.data) for m in members(folder)]
    stranger = members(folder, "shard-000000.tar")[0]
    write_tar(folder / SHARD, items + [("0000099_stranger", stranger.data)])
    found = problems(verify_shards(folder))
    assert (SHARD, "0000099_stranger", "member is not listed in the manifest (inserted member?)") in found
    assert (SHARD, "0000099_stranger", "record says its key is '0000000_synth_0001', but its tar member is "
                                       "'0000099_stranger'") in found
    assert sha_line(folder, entry.sha256) in found


def test_duplicated_key(folder):
    first, _, third = members(folder)
    rewrite_shard(folder, [(first.key, first.data), (first.key, first.data), (third.key, third.data)])
    assert problems(verify_shards(folder)) == [(None, None, (
        f"{folder / 'manifest.json'} shard '{SHARD}': key '{first.key}' is not after the previous key (keys are "
        "listed once, in listing order)"))]


def test_duplicated_key_across_shards(folder):
    borrowed = members(folder, "shard-000000.tar")[0]
    items = [(m.key, m.data) for m in members(folder)]
    rewrite_shard(folder, items + [(borrowed.key, borrowed.data)])
    assert problems(verify_shards(folder)) == [(None, None, (
        f"{folder / 'manifest.json'}: counts.samples_in=10 but the source lists 9 samples for this build"))]


def test_record_whose_shape_disagrees_with_its_bytes(folder):
    items = [(m.key, m.data) for m in members(folder)]
    key, data = items[1]
    items[1] = (key, reencode(data, lambda header, blob: header["arrays"]["image"].update(shape=[128, 128, 4])))
    rewrite_shard(folder, items)
    nbytes = msgpack.unpackb(data)[0]["arrays"]["image"]["nbytes"]  # the stored (resized) image's bytes
    assert problems(verify_shards(folder)) == [
        (SHARD, key, f"array image: shape [128, 128, 4] x 1 bytes != declared {nbytes} bytes")]


def test_record_that_differs_from_the_live_pipeline_only(folder, synth_root):
    items = [(m.key, m.data) for m in members(folder)]
    key, data = items[0]

    def nudge(header, blob) -> None:  # one threshold value in the band: a valid record, not the live one
        spec = header["arrays"]["thresh_values"]
        values = np.frombuffer(blob, "<f2", offset=spec["offset"], count=1).copy()
        values[0] = 0.5 if values[0] != 0.5 else 0.6
        blob[spec["offset"] : spec["offset"] + 2] = values.tobytes()

    items[0] = (key, reencode(data, nudge))
    rewrite_shard(folder, items)
    assert problems(verify_shards(folder)) == []  # hashes and invariants agree: only the source can tell
    assert problems(verify_shards(folder, against_source=synth_root)) == [
        (SHARD, key, "differs from the live pipeline: thresh_map differs at 1 elements")
    ]


def test_record_missing_from_shards_and_rejects(folder, synth_root):
    kept = members(folder)
    del kept[2]
    rewrite_shard(folder, [(m.key, m.data) for m in kept])
    # rewrite_shard lowered counts.written and counts.samples_in to match: the listing still counts 9
    refused = [(None, None, f"{folder / 'manifest.json'}: counts.samples_in=8 but the source lists 9 samples for "
                            "this build")]
    assert problems(verify_shards(folder)) == refused
    assert problems(verify_shards(folder, against_source=synth_root)) == refused


# --- manifest, staleness, source --------------------------------------------------------------


def test_tampered_manifest(folder):
    path = folder / "manifest.json"
    body = json.loads(path.read_text())
    body["record_settings"]["targets"]["shrink_ratio"] = 0.5
    path.write_text(json.dumps(body))
    assert problems(verify_shards(folder)) == [
        (None, None, "manifest fingerprint does not match its own record_settings (manifest edited?)")
    ]


def test_unreadable_manifest(folder):
    (folder / "manifest.json").write_text('{"schema": "wds-ocr/manifest", "schema_version": 7}')
    assert problems(verify_shards(folder)) == [(None, None, (
        f"{folder / 'manifest.json'} has schema_version 7; this wds-ocr reads version 4: "
        "upgrade wds-ocr or rebuild the shards"))]


def test_missing_shard(folder):
    (folder / "shard-000002.tar").unlink()
    assert problems(verify_shards(folder)) == [
        ("shard-000002.tar", None, f"shard missing ({folder / 'shard-000002.tar'})")
    ]
    result = run_cli(folder)
    assert result.exit_code == 1
    seen = verify_shards(folder).coverage  # the 6 records still there
    assert result.output == (f"shard-000002.tar: shard missing ({folder / 'shard-000002.tar'})\n"
                             f"{Coverage(**seen).summary()}\n2 shards, 6 records checked: 1 problem(s)\n")


def test_changed_config_is_reported_as_stale(clean):
    report = verify_shards(clean, load_config(None, ["transform.size=160"]))
    stale = "stale: shards were built with other settings (transform.size: built with 128, now 160); rebuild them"
    assert report.stale and problems(report) == [(None, None, stale)]
    result = run_cli(clean, "--set", "transform.size=160")
    assert result.exit_code == 1
    coverage = load_manifest(clean).coverage.summary()
    assert result.output == f"{stale}\n{coverage}\n3 shards, 9 records checked: 1 problem(s) (stale)\n"
    assert verify_shards(clean, load_config(None, ["transform.size=128", "shards.max_samples=7"])).ok


def test_changed_source_image(clean, synth_root, tmp_path):
    source = tmp_path / "source"
    shutil.copytree(synth_root, source)
    images = source / "images" / "train"
    names = sorted(p.name for p in images.iterdir())
    shutil.copyfile(images / names[1], images / names[0])
    found = problems(verify_shards(clean, against_source=source))
    assert found[-1] == (None, None, "source fingerprint differs: the source images or annotations changed since the build")
    assert found[0][:2] == ("shard-000000.tar", f"0000000_{Path(names[0]).stem}")
    assert found[0][2].startswith("differs from the live pipeline: image ")
    assert len(found) == 2


def test_json_report_parses_and_lists_problems(folder, clean):
    (folder / "shard-000000.tar").unlink()
    result = run_cli(folder, "--json")
    assert result.exit_code == 1
    body = json.loads(result.output)
    assert body["ok"] is False and body["stale"] is False
    assert body["problems"] == [
        {"shard": "shard-000000.tar", "key": None, "what": f"shard missing ({folder / 'shard-000000.tar'})"}
    ]
    assert (body["shards_checked"], body["samples_checked"]) == (2, 6)
    result = run_cli(clean, "--json")
    assert result.exit_code == 0
    body = json.loads(result.output)
    assert (body["ok"], body["problems"], body["samples_checked"]) == (True, [], 9)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda b: b.update(schema="other"), "is not a wds-ocr manifest (schema 'other')"),
        (lambda b: b.pop("fingerprint"), ": field 'fingerprint' is missing"),
        (lambda b: b["record_settings"]["transform"].pop("size"),
         ": record_settings lacks transform.size"),
        (lambda b: b["shards"][0]["keys"].__setitem__(0, "a.b"),
         " shard 'shard-000000.tar': keys must be record keys (a listing index of 7+ digits, '_', then letters, "
         "digits, '_' or '-')"),
        (lambda b: b["shards"][0].update(name="../x.tar"), " shard '../x.tar': shard names must be plain file names "
         "of the form shard-NNNNNN.tar (or shard-pIIIofNNN-NNNNNN.tar); paths, URLs and other names are refused"),
        (lambda b: b["shards"][0]["offsets"].reverse(), " shard 'shard-000000.tar': offsets must be increasing multiples of 512 starting at 0"),
        (lambda b: b["counts"].update(written=8), ": counts.written=8 but the shards hold 9 samples"),
        (lambda b: b.update(partition={"index": 0, "count": 2, "lo": 0, "hi": 3}),
         ": a part manifest lists one source digest per sample of its range"),
        (lambda b: b["shards"].append(b["shards"][0]), ": a shard is listed twice"),
    ],
)
def test_manifest_that_does_not_hold_together_is_refused(clean, edit, message):
    from wds_ocr.errors import ManifestError
    from wds_ocr.shards.manifest import parse_manifest

    body = json.loads((clean / "manifest.json").read_text())
    edit(body)
    with pytest.raises(ManifestError) as caught:
        parse_manifest(json.dumps(body), "m.json")
    assert str(caught.value).startswith("m.json") and str(caught.value).endswith(message)


def test_inspect_summarizes_the_shards_and_one_record(clean, tmp_path):
    from wds_ocr.shards.inspect import inspect_shards

    manifest = load_manifest(clean)
    key = manifest.shards[1].keys[2]
    summary = inspect_shards(clean, key, tmp_path / "panel.png")
    lines = summary.lines()
    total = sum(e.bytes for e in manifest.shards)
    assert lines[0] == f"shards: 3  samples: 9  bytes: {total:,} ({total / 9 / 1e6:.2f} MB per sample)"
    assert lines[1] == "source: json split train; in 9, written 9, rejected 0, words skipped 0"
    assert summary.record.key == key and summary.shard == SHARD
    assert any(line.startswith(f"record {key} (in {SHARD}): ") for line in lines)
    image = summary.record.arrays["image"]
    assert image.shape[2] == 3 and max(image.shape[:2]) == 128  # the resized image, without its padding
    assert f"  image              u1   {str(list(image.shape)):16s} {image.nbytes:>10,} bytes" in lines
    stored = sum(nbytes for *_, nbytes in summary.arrays)
    assert (f"  stored arrays {stored:,} bytes; expanded on the device to image + maps of {128 * 128 * 8:,} bytes "
            f"({128 * 128 * 8 / stored:.1f}x)") in lines
    assert lines[-1] == f"wrote {tmp_path / 'panel.png'}" and (tmp_path / "panel.png").stat().st_size > 0


def test_reduced_jpeg_decoding_builds_other_bytes_that_verify_against_the_source(synth_root, tmp_path):
    """transform.jpeg_reduction=auto (the default): its own fingerprint and bytes, proven by the live
    pipeline; "off" leaves the record settings, and so every earlier fingerprint, as they were."""
    whole = build(synth_root, tmp_path / "whole", settings(64, 3, "transform.jpeg_reduction=off"))
    reduced = build(synth_root, tmp_path / "reduced", settings(64))
    assert "jpeg_reduction" not in whole.manifest.record_settings["transform"]
    assert reduced.manifest.record_settings["transform"]["jpeg_reduction"] == "auto"
    assert reduced.manifest.fingerprint != whole.manifest.fingerprint
    assert load_config(None, settings(64, 3, "transform.jpeg_reduction=off")).fingerprint() == \
        whole.manifest.fingerprint
    assert [e.sha256 for e in reduced.manifest.shards] != [e.sha256 for e in whole.manifest.shards]
    report = verify_shards(tmp_path / "reduced", against_source=synth_root)
    assert report.ok, [p.line() for p in report.problems]
    assert report.compared_with_source == reduced.manifest.counts.written == 9
    earlier = verify_shards(tmp_path / "whole", load_config(None, settings(64, 3, "transform.jpeg_reduction=off")))
    assert earlier.ok, [p.line() for p in earlier.problems]  # a manifest without the setting: decoded whole
    stale = verify_shards(tmp_path / "reduced", load_config(None, settings(64, 3, "transform.jpeg_reduction=off")))
    assert stale.stale and "transform.jpeg_reduction" in " ".join(p.what for p in stale.problems)


def test_shards_and_checkpoints_from_before_jpeg_reduction_read_as_decoded_whole(synth_root, tmp_path):
    """A manifest or checkpoint without transform.jpeg_reduction was made with whole decoding: the
    settings taken from it say "off", so its fingerprint, train's shard check and a resume hold."""
    from wds_ocr.config import recorded
    from wds_ocr.shards.verify import config_from_manifest

    whole = build(synth_root, tmp_path / "whole", settings(64, 3, "transform.jpeg_reduction=off"))
    taken = config_from_manifest(load_manifest(tmp_path / "whole"))
    assert taken.transform.jpeg_reduction == "off"
    assert taken.fingerprint() == whole.manifest.fingerprint
    old_checkpoint_config = load_config(None, settings(64)).model_dump(mode="json")
    del old_checkpoint_config["transform"]["jpeg_reduction"]
    assert recorded(old_checkpoint_config)["transform"]["jpeg_reduction"] == "off"
    assert recorded({"loader": {}}) == {"loader": {}}  # only sections the settings hold
