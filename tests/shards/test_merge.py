"""Partitioned builds and merge: the merged manifest equals an unpartitioned build's."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from test_build import build, faulty_root, settings, snapshot, stats  # noqa: F401  (faulty_root: fixture)
from wds_ocr.cli import cli
from wds_ocr.errors import ManifestError
from wds_ocr.shards.build import Partition
from wds_ocr.shards.manifest import load_manifest
from wds_ocr.shards.merge import merge_parts
from wds_ocr.shards.tario import iter_members
from wds_ocr.shards.verify import verify_shards


def records(folder: Path) -> list[tuple[str, bytes]]:
    out = []
    for entry in load_manifest(folder).shards:
        with open(folder / entry.name, "rb") as handle:
            out += [(m.key, m.data) for m in iter_members(handle, entry.name)]
    return out


@pytest.fixture(scope="module")
def whole(faulty_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("whole") / "s"
    build(faulty_root, out, settings())
    return out


@pytest.fixture(scope="module")
def parts(faulty_root, tmp_path_factory) -> Path:
    """Parts 0/2 and 1/2, not merged."""
    out = tmp_path_factory.mktemp("parts") / "s"
    for index in range(2):
        build(faulty_root, out, settings(), partition=Partition(index, 2))
    return out


def copy(folder: Path, tmp_path: Path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(folder, target)
    return target


def test_merged_parts_equal_an_unpartitioned_build(whole, parts, faulty_root, tmp_path):
    folder = copy(parts, tmp_path)
    result = CliRunner().invoke(cli, ["merge", str(folder)])
    assert result.exit_code == 0, result.output
    merged, expected = load_manifest(folder), load_manifest(whole)
    assert result.output == f"merged 10 samples in {len(merged.shards)} shards into {folder / 'manifest.json'}\n"
    assert merged.counts == expected.counts
    assert {k: v for k, v in merged.counts.as_dict().items() if k != "words"} == {
        "samples_in": 15, "written": 10, "rejected": 5, "words_skipped": 4}
    assert merged.coverage.words > 0
    assert merged.source == expected.source
    assert merged.source["fingerprint"] is not None
    assert (merged.fingerprint, merged.record_settings, merged.shard_settings) == (
        expected.fingerprint, expected.record_settings, expected.shard_settings)
    assert merged.partition is None and merged.source_digests is None
    assert records(folder) == records(whole)
    assert [e.name for e in merged.shards] == [
        "shard-p000of002-000000.tar", "shard-p000of002-000001.tar",
        "shard-p001of002-000000.tar", "shard-p001of002-000001.tar",
    ]
    assert (folder / "rejects.jsonl").read_bytes() == (whole / "rejects.jsonl").read_bytes()
    report = verify_shards(folder, against_source=faulty_root)
    assert report.problems == [] and report.compared_with_source == 10


def test_part_manifests_record_their_range_and_digests(parts, faulty_root):
    first = load_manifest(parts / "manifest.part-p000of002.json")
    second = load_manifest(parts / "manifest.part-p001of002.json")
    assert first.partition.as_dict() == {"index": 0, "count": 2, "lo": 0, "hi": 7}
    assert second.partition.as_dict() == {"index": 1, "count": 2, "lo": 7, "hi": 14}
    assert len(first.source_digests) == 7 and first.source["fingerprint"] is None
    # The listing reject (orphan.jpg) is counted once, by part 0.
    assert first.counts.samples_in == 8 and second.counts.samples_in == 7
    report = verify_shards(parts / "manifest.part-p001of002.json", against_source=faulty_root)
    assert report.problems == [] and report.compared_with_source == 6  # 6 written, truncated.jpg rejected


def test_merge_refuses_a_missing_part(parts, tmp_path):
    folder = copy(parts, tmp_path)
    (folder / "manifest.part-p001of002.json").unlink()
    with pytest.raises(ManifestError) as caught:
        merge_parts(folder)
    assert str(caught.value) == f"{folder}: parts [1] of 2 are missing; build them before merging"
    result = CliRunner().invoke(cli, ["merge", str(folder)])
    assert result.exit_code == 1
    assert result.output == f"error: {folder}: parts [1] of 2 are missing; build them before merging\n"
    assert not (folder / "manifest.json").exists()


def test_merge_refuses_parts_built_with_other_settings(parts, faulty_root, tmp_path):
    folder = copy(parts, tmp_path)
    other = build(faulty_root, folder, settings(96), partition=Partition(1, 2), overwrite=True).manifest
    first = load_manifest(folder / "manifest.part-p000of002.json")
    with pytest.raises(ManifestError) as caught:
        merge_parts(folder)
    assert str(caught.value) == (
        f"manifest.part-p001of002.json and manifest.part-p000of002.json disagree on the config fingerprint: "
        f"{other.fingerprint!r} vs {first.fingerprint!r}; rebuild the parts with the same source and config")


def test_merge_refuses_parts_with_different_part_counts(parts, faulty_root, tmp_path):
    folder = copy(parts, tmp_path)
    build(faulty_root, folder, settings(), partition=Partition(2, 3))
    with pytest.raises(ManifestError) as caught:
        merge_parts(folder)
    assert str(caught.value) == ("manifest.part-p002of003.json and manifest.part-p000of002.json disagree on the "
                                 "part count: 3 vs 2; rebuild the parts with the same source and config")


def test_merge_refuses_a_missing_rejects_file(parts, tmp_path):
    folder = copy(parts, tmp_path)
    (folder / "rejects.part-p001of002.jsonl").unlink()
    with pytest.raises(ManifestError) as caught:
        merge_parts(folder)
    assert str(caught.value) == (f"{folder / 'rejects.part-p001of002.jsonl'} is missing: rebuild that part "
                                 "(build-shards --partition 1/2)")


def test_merge_of_an_empty_folder_explains_what_to_do(tmp_path):
    with pytest.raises(ManifestError) as caught:
        merge_parts(tmp_path)
    assert str(caught.value) == (f"{tmp_path} holds no part manifests (manifest.part-pIIIofNNN.json); "
                                 "run build-shards --partition i/n first")


def test_rebuilding_a_part_that_is_current_rewrites_nothing(parts, faulty_root, tmp_path):
    folder = copy(parts, tmp_path)
    before, files = stats(folder), snapshot(folder)
    result = build(faulty_root, folder, settings(), partition=Partition(0, 2))
    assert result.up_to_date and result.reused_shards == 2
    assert stats(folder) == before and snapshot(folder) == files
