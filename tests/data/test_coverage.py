"""Target coverage: which words the training targets hold, which they leave out and why, reported
by the build, the manifest, inspect, verify and evaluate."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from wds_ocr.cli import cli
from wds_ocr.config import load_config
from wds_ocr.data.coverage import Coverage, LeftOut
from wds_ocr.data.targets import make_targets
from wds_ocr.shards.build import build_shards
from wds_ocr.shards.codec import decode_record
from wds_ocr.shards.manifest import load_manifest
from wds_ocr.shards.tario import iter_members


def _box(x: float, y: float, w: float, h: float) -> np.ndarray:
    return np.array([[x, y], [x + w, y], [x + w, y + h], [x, y + h]], dtype=np.float64)


def test_make_targets_gives_each_polygon_its_reason():
    config = load_config(None, ["targets.min_text_size=6", "targets.shrink_ratio=0.4"]).targets
    polygons = [
        _box(10, 10, 60, 12),  # kept
        _box(10, 40, 60, 12),  # don't-care
        _box(10, 70, 60, 4),  # 4 px high: below min_text_size 6
        _box(10, 90, 0.5, 0.5),  # area below one pixel
    ]
    targets = make_targets(polygons, [False, True, False, False], 128, 128, config)
    assert targets.left_out.tolist() == [LeftOut.KEPT, LeftOut.DONT_CARE, LeftOut.TOO_SMALL, LeftOut.TOO_SMALL]
    assert targets.ignored.tolist() == [False, True, True, True]
    # area 39.6 and 8.7 px high, so min_text_size 6 keeps it; its integer corners (0,0), (100,8),
    # (100,8) leave the shrink offset nothing
    sliver = np.array([[0.2, 0.2], [100.3, 8.1], [100.4, 8.9]])
    vanished = make_targets([sliver], [False], 64, 128, config)
    assert vanished.left_out.tolist() == [LeftOut.SHRINK_VANISHED]
    assert not vanished.gt.any() and not vanished.thresh_mask.any()


def test_coverage_counts_summary_and_warning():
    coverage = Coverage.from_codes([0, 0, 0, 0, 0, 0, 1, 2, 2, 3])
    assert coverage == Coverage(words=10, in_targets=6, dont_care=1, too_small=2, shrink_vanished=1)
    assert (coverage.trainable, coverage.left_out_for_size, coverage.left_out) == (9, 3, 4)
    assert coverage.size_share == pytest.approx(3 / 9)
    assert coverage.summary() == ("words in the targets 6 (60.0%) of 10; left out: don't-care 1 (10.0%), "
                                  "too small 2 (20.0%), shrink vanished 1 (10.0%)")
    assert coverage.size_warning(8, 640, 0.4) == (
        "warning: 33.3% of the 9 words that are not don't-care are left out of the training targets for size "
        "(2 too small, 1 vanished when shrunk); evaluation still counts them. Lower targets.min_text_size "
        "(now 8), raise transform.size (now 640) or raise targets.shrink_ratio (now 0.4)")
    # 1 of 10 not-don't-care words (10%) is not more than the 10% threshold
    assert Coverage.from_codes([0] * 9 + [2]).size_warning(8, 640, 0.4) is None
    assert Coverage.from_codes([]) == Coverage() and Coverage().size_share == 0.0
    assert coverage + coverage == Coverage(20, 12, 2, 4, 2)
    assert Coverage.from_dict(coverage.as_dict()) == coverage


def test_coverage_refuses_bad_codes_and_fields():
    with pytest.raises(ValueError, match=r"left_out codes must be 0\.\.3, got \[0, 7\]"):
        Coverage.from_codes([0, 7])
    with pytest.raises(ValueError, match=r"counts\.words\.too_small must be a non-negative integer, got -1"):
        Coverage.from_dict({"words": 1, "in_targets": 1, "dont_care": 0, "too_small": -1, "shrink_vanished": 0},
                           "counts.words")
    with pytest.raises(ValueError, match=r"in_targets \+ dont_care \+ too_small \+ shrink_vanished != words"):
        Coverage.from_dict({"words": 5, "in_targets": 1, "dont_care": 0, "too_small": 0, "shrink_vanished": 0})


def _record_codes(folder: Path) -> list[int]:
    codes: list[int] = []
    manifest = load_manifest(folder)
    for entry in manifest.shards:
        with open(folder / entry.name, "rb") as handle:
            for member in iter_members(handle, entry.name):
                codes += decode_record(member.data, entry.name, member.key).arrays["left_out"].tolist()
    return codes


@pytest.fixture(scope="module")
def coarse(synth_root, tmp_path_factory) -> tuple[Path, str]:
    """The synthetic train split at 64 px with min_text_size 6: most words too small."""
    out = tmp_path_factory.mktemp("coverage") / "coarse"
    result = CliRunner().invoke(cli, ["build-shards", str(synth_root), "--split", "train", "--out", str(out),
                                      "--quiet", "--set", "transform.size=64", "--set", "targets.min_text_size=6"])
    assert result.exit_code == 0, result.output
    return out, result.output


def test_build_counts_match_the_records_and_warn_about_size(coarse):
    out, output = coarse
    coverage = load_manifest(out).coverage
    assert coverage == Coverage.from_codes(_record_codes(out))
    assert coverage.words == coverage.in_targets + coverage.dont_care + coverage.too_small + coverage.shrink_vanished
    assert coverage.too_small > 0 and coverage.size_share > 0.1
    assert coverage.summary() in output.splitlines()
    settings = load_manifest(out).record_settings
    assert settings["targets"]["min_text_size"] == 6
    assert (f"warning: {coverage.size_share:.1%} of the {coverage.trainable} words that are not don't-care are "
            "left out of the training targets for size") in output
    assert "Lower targets.min_text_size (now 6), raise transform.size (now 64)" in output


def test_a_build_that_keeps_the_text_does_not_warn(synth_root, tmp_path):
    result = CliRunner().invoke(cli, ["build-shards", str(synth_root), "--split", "train", "--out", str(tmp_path),
                                      "--quiet", "--set", "transform.size=256", "--set", "targets.min_text_size=2"])
    assert result.exit_code == 0, result.output
    coverage = load_manifest(tmp_path).coverage
    assert coverage.size_share <= 0.1 and coverage.in_targets > 0
    assert coverage.summary() in result.output and "warning" not in result.output


def test_verify_json_and_inspect_report_the_coverage(coarse):
    out, _ = coarse
    manifest = load_manifest(out)
    verified = CliRunner().invoke(cli, ["verify", str(out), "--json"])
    assert verified.exit_code == 0, verified.output
    report = json.loads(verified.output)
    assert report["coverage"] == manifest.counts.words.as_dict() == manifest.coverage.as_dict()
    text = CliRunner().invoke(cli, ["verify", str(out)])
    assert manifest.coverage.summary() in text.output.splitlines()
    inspected = CliRunner().invoke(cli, ["inspect", str(out)])
    assert inspected.exit_code == 0, inspected.output
    lines = inspected.output.splitlines()
    assert manifest.coverage.summary() in lines
    first = manifest.shards[0].keys[0]
    with open(out / manifest.shards[0].name, "rb") as handle:
        record = decode_record(next(iter_members(handle, manifest.shards[0].name)).data)
    assert record.key == first
    assert f"  {Coverage.from_codes(record.arrays['left_out']).summary()}" in lines


def test_verify_catches_coverage_counts_edited_in_the_manifest(coarse, tmp_path):
    out, _ = coarse
    copy = tmp_path / "copy"
    copy.mkdir()
    for path in out.iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    body = json.loads((copy / "manifest.json").read_text())
    words = body["counts"]["words"]
    words["in_targets"] += words["too_small"]
    words["too_small"] = 0
    (copy / "manifest.json").write_text(json.dumps(body))
    result = CliRunner().invoke(cli, ["verify", str(copy)])
    assert result.exit_code == 1
    assert "differs from the manifest's counts.words" in result.output


def test_a_manifest_with_malformed_coverage_is_refused(coarse, tmp_path):
    out, _ = coarse
    body = json.loads((out / "manifest.json").read_text())
    body["counts"]["words"]["dont_care"] = "many"
    (tmp_path / "manifest.json").write_text(json.dumps(body))
    result = CliRunner().invoke(cli, ["inspect", str(tmp_path)])
    assert result.exit_code == 1
    assert "counts.words.dont_care must be a non-negative integer, got 'many'" in result.output


def test_merged_parts_add_up_their_coverage(synth_root, tmp_path):
    config = load_config(None, ["transform.size=64", "targets.min_text_size=6"])
    whole = build_shards(synth_root, "train", tmp_path / "whole", config).manifest
    from wds_ocr.shards.build import Partition
    from wds_ocr.shards.merge import merge_parts

    for index in range(2):
        build_shards(synth_root, "train", tmp_path / "parts", config, partition=Partition(index, 2))
    merged, _ = merge_parts(tmp_path / "parts")
    assert merged.coverage == whole.coverage and merged.counts == whole.counts
