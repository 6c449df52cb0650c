"""Hostile manifests and rebuilt shards (issue 9, points 6 and 7): every edit is a clear error (no
traceback, no large allocation), verify catches entries removed with the counts lowered to match
and rejects that disagree with the counts, a build refuses to replace shards built with other
settings unless --overwrite, and a reader says the shards were rebuilt under it."""

from __future__ import annotations

import json
import shutil
import time
import tracemalloc
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import build_small_shards, copy_shards
from wds_ocr.cli import cli
from wds_ocr.config import load_config
from wds_ocr.errors import ManifestError, ShardFormatError, ShardsChangedError
from wds_ocr.loader.loaders import make_loader
from wds_ocr.loader.stream import ShardStream
from wds_ocr.shards.build import build_shards
from wds_ocr.shards.manifest import load_manifest, parse_manifest
from wds_ocr.shards.verify import verify_shards


@pytest.fixture
def folder(uneven_shards, tmp_path) -> Path:
    return copy_shards(uneven_shards, tmp_path / "s")


def body_of(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def refused(body: dict | str) -> str:
    tracemalloc.start()
    try:
        with pytest.raises(ManifestError) as caught:
            parse_manifest(body if isinstance(body, str) else json.dumps(body), "m.json")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20
    return str(caught.value)


SHARD = "m.json shard 'shard-000000.tar'"


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda b: b["record_settings"]["transform"].update(size=30016),
         "m.json: record_settings are outside what this wds-ocr allows: transform.size: Input should be less than "
         "or equal to 4096 (got 30016); allowed: 32 <= size <= 4096, a multiple of 32"),
        (lambda b: b["record_settings"]["transform"].update(size=[640]),
         "m.json: record_settings are outside what this wds-ocr allows: transform.size: Input should be a valid "
         "integer (got [640])"),
        (lambda b: b["record_settings"]["targets"].update(thresh_min=float("nan")),
         "m.json: record_settings are outside what this wds-ocr allows: targets.thresh_min: Input should be a finite "
         "number (got nan)"),
        (lambda b: b["shards"][0].update(name="shard-000000.tar\x00x"),
         "m.json shard 'shard-000000.tar\\x00x': shard names must be plain file names of the form shard-NNNNNN.tar "
         "(or shard-pIIIofNNN-NNNNNN.tar); paths, URLs and other names are refused"),
        (lambda b: b["shards"][0]["offsets"].__setitem__(1, 2**70),
         f"{SHARD}: a member spans {2**70} bytes, over the format's 2147484672"),
        (lambda b: b["shards"][0]["offsets"].__setitem__(0, False),
         f"{SHARD}: offsets must be increasing multiples of 512 starting at 0"),
        (lambda b: b["shards"][0]["offsets"].__setitem__(1, "512"),
         f"{SHARD}: offsets must be increasing multiples of 512 starting at 0"),
        (lambda b: b["shards"][0].update(bytes=2**70), f"{SHARD}: field 'bytes' is {2**70}, outside 0..2199023255552"),
        (lambda b: b["shards"][0].update(samples=True), f"{SHARD}: field 'samples' has the wrong type (bool)"),
        (lambda b: b["shards"][0]["checksums"].__setitem__(0, "xyz"),
         f"{SHARD}: checksums must be 16-digit lowercase hex strings"),
        (lambda b: b["shards"][0]["keys"].__setitem__(0, "../../x"),
         f"{SHARD}: keys must be record keys (a listing index of 7+ digits, '_', then letters, digits, '_' or '-')"),
        (lambda b: b["counts"].update(rejected=-1), "m.json counts: field 'rejected' is -1, outside 0..1000000000000"),
        (lambda b: b["counts"].update(rejected=3),
         "m.json: counts.samples_in=9 is not written 9 + rejected 3"),
        (lambda b: b.update(schema_version=2),
         "m.json has schema_version 2, written by an older wds-ocr (this one reads version 4: compact records with "
         "per-member checksums); rebuild the shards: wds-ocr build-shards SOURCE --split train --out . --overwrite"),
        (lambda b: b.update(schema_version=3),  # full-array records (record version 2)
         "m.json has schema_version 3, written by an older wds-ocr (this one reads version 4: compact records with "
         "per-member checksums); rebuild the shards: wds-ocr build-shards SOURCE --split train --out . --overwrite"),
        (lambda b: b.update(checksum="crc32"),
         "m.json: checksum 'crc32' is not one this wds-ocr computes ('xxh3_64'); rebuild the shards"),
        (lambda b: b.update(surprise=1), "m.json: unknown fields ['surprise']"),
    ],
)
def test_manifest_edits_are_clear_errors(folder, edit, message):
    body = body_of(folder)
    edit(body)
    assert refused(body) == message


def test_deeply_nested_json_is_a_clear_error():
    assert refused('{"schema": ' + "[" * 200_000 + "]" * 200_000 + "}") == "m.json is nested too deeply to be a manifest"


def test_an_integer_of_thousands_of_digits_is_a_clear_error(folder):
    """CPython refuses int() of more than 4,300 digits with a bare ValueError; the manifest parser
    stops at 24 digits and says so."""
    text = (folder / "manifest.json").read_text()
    body = body_of(folder)
    hostile = text.replace(f'"bytes": {body["shards"][0]["bytes"]}', '"bytes": ' + "9" * 5000, 1)
    assert hostile != text
    assert refused(hostile) == "m.json holds an integer of 5000 digits (at most 24 are read): 999999999999...; " \
                               "no manifest field needs such a number"


@pytest.mark.parametrize("digits", ["٠١٢٣٤٥٦٧٨٩", "０１２３４５６７８９", "𝟎𝟏𝟐𝟑𝟒𝟓𝟔𝟕𝟖𝟗"])
def test_shard_names_and_keys_in_other_scripts_digits_are_refused(folder, digits):
    """re's \\d (and str.isdigit) match Arabic-Indic, full-width and mathematical digits; names
    and keys are ASCII."""
    other = str.maketrans("0123456789", digits)
    body = body_of(folder)
    body["shards"][0]["name"] = body["shards"][0]["name"].translate(other)
    assert "shard-" in refused(body) and body["shards"][0]["name"] in refused(body)
    body = body_of(folder)
    key = body["shards"][0]["keys"][0]
    body["shards"][0]["keys"][0] = key[:7].translate(other) + key[7:]
    body["shards"][0]["first_key"] = body["shards"][0]["keys"][0]
    assert refused(body) == "m.json shard 'shard-000000.tar': keys must be record keys (a listing index of 7+ " \
                            "digits, '_', then letters, digits, '_' or '-')"


def test_an_oversized_transform_size_never_allocates_a_batch(folder):
    body = body_of(folder)
    body["record_settings"]["transform"]["size"] = 30016
    (folder / "manifest.json").write_text(json.dumps(body))
    tracemalloc.start()
    try:
        with pytest.raises(ManifestError, match="transform.size: Input should be less than or equal to 4096"):
            ShardStream(folder, batch_size=8)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20


def test_a_shard_that_is_a_folder_or_a_device_is_named(folder):
    (folder / "shard-000001.tar").unlink()
    (folder / "shard-000001.tar").mkdir()
    stream = ShardStream(folder, batch_size=9)
    with pytest.raises(ShardFormatError) as caught:
        list(make_loader(stream, 0, mode="processes"))
    assert str(caught.value) == f"shard-000001.tar [{stream.manifest.shards[1].keys[0]}]: {folder / 'shard-000001.tar'} is not a regular file"
    assert [p.what for p in verify_shards(folder).problems][0] == f"{folder / 'shard-000001.tar'} is not a regular file"
    shutil.rmtree(folder / "shard-000001.tar")
    (folder / "shard-000001.tar").symlink_to("/dev/zero")
    with pytest.raises(ShardFormatError, match="is a symbolic link to /dev/zero, outside its folder"):
        list(make_loader(ShardStream(folder, batch_size=9), 0, mode="processes"))


def test_a_removed_entry_with_lowered_counts_is_caught(folder):
    body = body_of(folder)
    removed = body["shards"].pop()  # shard-000002.tar, still on disk
    body["counts"]["written"] -= removed["samples"]
    (folder / "manifest.json").write_text(json.dumps(body))
    report = verify_shards(folder)
    assert [p.what for p in report.problems] == [
        f"{folder / 'manifest.json'}: counts.samples_in=9 is not written 8 + rejected 0"]
    body["counts"]["samples_in"] -= removed["samples"]  # and the listing too: the file betrays it
    body["source"]["listed"] -= removed["samples"]
    (folder / "manifest.json").write_text(json.dumps(body))
    report = verify_shards(folder)
    assert [(p.shard, p.what) for p in report.problems] == [
        ("shard-000002.tar", "shard file in the folder is not listed in the manifest (entry removed from the "
                             "manifest?)")]


def test_rejects_that_disagree_with_the_counts_are_caught(synth_root, tmp_path):
    source = tmp_path / "source"
    shutil.copytree(synth_root, source)
    (source / "images" / "train" / "junk.jpg").write_bytes(b"not an image")
    annotations = json.loads((source / "jsons" / "train.json").read_text())
    annotations["images"]["junk.jpg"] = {"words": {}}
    (source / "jsons" / "train.json").write_text(json.dumps(annotations))
    out = build_small_shards(source, tmp_path / "s")
    assert verify_shards(out).ok
    rejects = out / "rejects.jsonl"
    lines = rejects.read_text().splitlines()
    rejects.write_text("\n".join(line for line in lines if '"kind": "sample"' not in line) + "\n")
    assert [p.what for p in verify_shards(out).problems] == [
        f"rejects.jsonl lists 0 rejected samples and {len(lines) - 1} skipped words, the manifest counts 1 and "
        f"{len(lines) - 1}"]
    rejects.write_text('{"index": "x"}\n')
    assert [p.what for p in verify_shards(out).problems] == [
        "rejects.jsonl line 1: expected an object with index, kind, name, word_id and reason"]


# --- rebuilt shards -----------------------------------------------------------------------------


def test_build_refuses_other_settings_without_overwrite(synth_root, tmp_path):
    out = build_small_shards(synth_root, tmp_path / "s")
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    args = ["build-shards", str(synth_root), "--split", "train", "--out", str(out), "--quiet",
            "--set", "transform.size=96", "--set", "shards.max_samples=4"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1
    assert result.output == (
        f"error: {out} holds shards built with other settings (manifest.json: transform.size: 64 there, 96 now); "
        "pass --overwrite (overwrite=True) to replace them (a run reading them will stop with an error), or "
        "build into another --out\n")
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    result = CliRunner().invoke(cli, [*args, "--overwrite"])
    assert result.exit_code == 0, result.output
    assert load_manifest(out).image_size == 96
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "shard-000000.tar").write_bytes(b"someone else's")
    result = CliRunner().invoke(cli, ["build-shards", str(synth_root), "--split", "train", "--out", str(foreign),
                                      "--quiet"])
    assert result.exit_code == 1 and "shard-000000.tar belong to no manifest or journal here" in result.output


@pytest.mark.parametrize("verify", [True, False])
def test_a_reader_says_the_shards_were_rebuilt_under_it(synth_root, tmp_path, verify):
    out = build_small_shards(synth_root, tmp_path / "s")  # 9 samples, 64 px, shards of 4, 4, 1
    stream = ShardStream(out, batch_size=2, verify_hashes=verify)
    batches = iter(make_loader(stream, 1, prefetch=1, mode="threads"))
    assert len(next(batches)) == 2  # shard 0 is open
    started = time.perf_counter()
    build_shards(synth_root, "train", out, load_config(None, ["transform.size=96", "shards.max_samples=4"]),
                 overwrite=True)
    with pytest.raises(ShardsChangedError) as caught:
        for _ in batches:
            pass
    assert str(caught.value) == (
        f"{out / 'manifest.json'} changed since this loader opened it (it was replaced): the shards were rebuilt "
        "while it was reading; restart the run to read the new shards (a training run resumes from its last.pt), "
        "and rebuild only into folders nothing is reading")
    with pytest.raises(ShardsChangedError):  # and the next epoch does not start on them either
        list(make_loader(stream, 0, mode="processes"))
    assert time.perf_counter() - started < 30
