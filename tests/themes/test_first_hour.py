"""A new user's first hour (issue 11): every bad input below ends in one `error:` line with the
exit code the README promises (2: bad usage or configuration, 1: a problem found or an operation
that failed) and never a traceback; the messages say what to give instead."""

from __future__ import annotations

import json
import re
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import build_small_shards, random_checkpoint
from wds_ocr.cli import cli
from wds_ocr.config import load_config

CONFIG = load_config(None, ["transform.size=64", "model.neck_channels=32"])


def invoke(*args: str):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exc_info
    assert "Traceback" not in result.output
    return result


@pytest.fixture(scope="module")
def shards(synth_root, tmp_path_factory) -> Path:
    return build_small_shards(synth_root, tmp_path_factory.mktemp("first-hour") / "shards")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return random_checkpoint(tmp_path_factory.mktemp("model"), CONFIG)


@pytest.fixture
def text_file(tmp_path) -> Path:
    path = tmp_path / "notes.pt"
    path.write_text("hello, not a checkpoint\n")
    return path


def test_a_text_file_as_checkpoint_is_named_in_every_command(text_file, shards, synth_root, tmp_path):
    expected = (f"error: checkpoint {text_file} is not a torch checkpoint: the file starts with b'hell', while "
                "torch.save writes a zip archive (starting with b'PK\\x03\\x04'); pass the last.pt or best.pt that "
                "wds-ocr train wrote\n")
    image = next((synth_root / "images" / "val").iterdir())
    for args in (["evaluate", "--checkpoint", text_file, "--shards", shards],
                 ["predict", "--checkpoint", text_file, "--out", tmp_path / "p", image],
                 ["train", "--shards", shards, "--resume", text_file, "--out", tmp_path / "r"]):
        result = invoke(*args)
        assert (result.exit_code, result.output) == (1, expected), args


def test_neck_channels_must_be_a_multiple_of_4_at_config_time(shards, tmp_path):
    result = invoke("train", "--shards", shards, "--out", tmp_path, "--set", "model.neck_channels=10")
    assert result.exit_code == 2
    assert result.output == ("error: invalid configuration:\n  model.neck_channels: Input should be a multiple of 4 "
                             "(got 10); allowed: 8 <= neck_channels <= 1024, a multiple of 4\n")
    assert not (tmp_path / "last.pt").exists()


def test_an_unknown_split_lists_the_splits_there_are(synth_root, tmp_path):
    result = invoke("build-shards", synth_root, "--split", "valid", "--out", tmp_path / "s")
    assert result.exit_code == 2
    assert result.output == (f"error: {synth_root} has no split 'valid' (source.format json); the splits it has: "
                             "train, val\n")
    empty = tmp_path / "empty"
    empty.mkdir()
    result = invoke("build-shards", empty, "--split", "train", "--out", tmp_path / "s")
    assert (result.exit_code, result.output) == (2, f"error: {empty} has no split 'train' (source.format json); it "
                                                    "has none (ROOT/jsons/<split>.json and ROOT/images/<split>/ "
                                                    "expected)\n")
    assert not (tmp_path / "s").exists()


def test_evaluate_and_bench_with_an_unknown_split_exit_2(synth_root, shards, checkpoint):
    result = invoke("evaluate", "--checkpoint", checkpoint, "--source", synth_root, "--split", "test")
    assert result.exit_code == 2 and "has no split 'test'" in result.output and "train, val" in result.output
    result = invoke("bench", synth_root, "--shards", shards, "--split", "test", "--seconds", "0")
    assert result.exit_code == 2 and "has no split 'test'" in result.output


@pytest.mark.parametrize("text, message", [
    ("3/2", "--partition '3/2': part i of n counts from 0, so it needs 0 <= i < n (here 0/2 .. 1/2)"),
    ("2/2", "--partition '2/2': part i of n counts from 0, so it needs 0 <= i < n (here 0/2 .. 1/2)"),
    ("abc", "--partition 'abc' must look like i/n, e.g. 0/4 (i counts from 0)"),
    ("1/0", "--partition '1/0': n is the number of parts, at least 1"),
])
def test_a_partition_that_does_not_exist_is_bad_usage(synth_root, tmp_path, text, message):
    result = invoke("build-shards", synth_root, "--split", "train", "--out", tmp_path / "s", "--partition", text)
    assert (result.exit_code, result.output) == (2, f"error: {message}\n")


def test_train_settings_the_shards_cannot_serve_are_bad_configuration(shards, tmp_path):
    result = invoke("train", "--shards", shards, "--out", tmp_path, "--set", "transform.size=128")
    assert result.exit_code == 2
    assert result.output == (f"error: {shards} was built with other settings (transform.size: built with 64, config "
                             "has 128); train with the settings the shards were built with (drop the --set/--config "
                             "values that change them), or rebuild the shards with those settings\n")


def test_a_shard_file_given_as_shards_says_to_give_its_folder(shards, tmp_path, checkpoint):
    tar = shards / "shard-000000.tar"
    expected = (f"error: {tar} is one shard, not a shard folder: give the folder that holds the shards and "
                f"manifest.json (here {shards}) or the manifest.json itself\n")
    for args in (["train", "--shards", tar, "--out", tmp_path], ["evaluate", "--checkpoint", checkpoint,
                                                                  "--shards", tar], ["inspect", tar]):
        result = invoke(*args)
        assert result.exit_code == 2 and result.output.splitlines()[-1] + "\n" == expected, args


def test_inspect_key_takes_a_file_name_or_a_unique_prefix(shards):
    from wds_ocr.shards.manifest import load_manifest

    keys = [k for entry in load_manifest(shards).shards for k in entry.keys]
    key = keys[4]
    index, stem = key.split("_", 1)
    full = invoke("inspect", shards, "--key", key)
    assert full.exit_code == 0, full.output
    line = next(x for x in full.output.splitlines() if x.startswith("record "))
    assert line.startswith(f"record {key} (in shard-000001.tar): {stem}.jpg, original ")
    for key in (stem, f"{stem}.jpg", index, key[:11]):
        result = invoke("inspect", shards, "--key", key)
        assert result.exit_code == 0 and line in result.output.splitlines(), key
    ambiguous = invoke("inspect", shards, "--key", "synth_000")
    assert ambiguous.exit_code == 2
    named = [k for k in keys if k.split("_", 1)[1].startswith("synth_000")]
    assert len(named) > 5
    assert ambiguous.output == (f"error: {shards}: --key 'synth_000' names {len(named)} records "
                                f"({', '.join(named[:5])} and {len(named) - 5} more); give more of the key\n")
    missing = invoke("inspect", shards, "--key", "receipt_9")
    assert (missing.exit_code, missing.output) == (
        2, f"error: {shards}: no record has the key, file name or key prefix 'receipt_9' (keys look like "
           f"{', '.join(keys[:3])}; --key takes a key, a source file name or a unique prefix of either)\n")


def test_inspect_png_has_four_labelled_panels_on_white(shards, tmp_path):
    result = invoke("inspect", shards, "--png", tmp_path / "r.png")
    assert result.exit_code == 0, result.output
    picture = cv2.imread(str(tmp_path / "r.png"))
    # 64 px records are enlarged 5x to 320 px panels: 4 panels, 3 gaps of 8 and a border of 8 each side
    assert picture.shape == (8 + 26 + 320 + 48 + 8, 4 * 320 + 3 * 8, 3)
    gaps = picture[8 + 26:8 + 26 + 320, [320 + 3, 2 * 320 + 8 + 3, 3 * 320 + 16 + 3]]
    assert (gaps == 255).all()  # white separators: the image's black padding never runs into the gt panel
    titles = picture[8:8 + 26]
    for panel in range(4):  # each title bar holds dark text on white
        x = panel * (320 + 8)
        bar = titles[:, x:x + 320]
        assert (bar < 100).any() and (bar == 255).mean() > 0.8, panel
    colour_bar = picture[8 + 26 + 320 + 6:8 + 26 + 320 + 18, 3 * 328 + 60:3 * 328 + 260]
    assert len({tuple(p) for p in colour_bar.reshape(-1, 3)}) > 50  # the viridis ramp under thresh_map


def test_verify_summarizes_many_problems_and_all_prints_each(shards, tmp_path, monkeypatch):
    from wds_ocr.cli import shards as shard_commands

    monkeypatch.setattr(shard_commands, "VERIFY_SHOWN", 5)  # these small shards give fewer than the default 20
    other = tmp_path / "other"
    from wds_ocr.data.synth import synthesize

    synthesize(other, 12, seed=7)
    summary = invoke("verify", shards, "--against-source", other)
    assert summary.exit_code == 1
    lines = summary.output.splitlines()
    assert re.fullmatch(r"\d+ problems of \d+ kinds \(--all prints every one\):", lines[0])
    total = int(lines[0].split()[0])
    assert total > 5
    counted = [int(m.group(1)) for m in (re.fullmatch(r"  (\d+) x .+", x) for x in lines) if m]
    assert sum(counted) == total  # the groups add up to every problem
    assert len(lines) < 40 and not any(x.startswith("- ") for x in lines)
    everything = invoke("verify", shards, "--against-source", other, "--all")
    assert everything.exit_code == 1
    problems = [x for x in everything.output.splitlines()[:-2]]
    assert len(problems) == total and not any(x.startswith("- -:") or " -: " in x for x in problems)


def test_verify_config_starts_from_the_manifest(shards):
    same = invoke("verify", shards, "--set", "shards.max_samples=2")  # not a record setting: still current
    assert same.exit_code == 0, same.output
    changed = invoke("verify", shards, "--set", "targets.min_text_size=4")
    assert changed.exit_code == 1
    assert changed.output.splitlines()[0] == ("stale: shards were built with other settings (targets.min_text_size: "
                                              "built with 3.0, now 4.0); rebuild them")


def test_predict_skip_bad_exits_0_when_something_was_predicted(checkpoint, synth_root, tmp_path):
    image = sorted((synth_root / "images" / "val").iterdir())[0]
    missing = tmp_path / "nosuch.jpg"
    alone = invoke("predict", "--checkpoint", checkpoint, "--out", tmp_path / "a", missing)
    assert alone.exit_code == 1 and f"error: {missing}: image file not found" in alone.output
    assert not (tmp_path / "a").exists()  # no empty output folder
    mixed = invoke("predict", "--checkpoint", checkpoint, "--out", tmp_path / "b", "--skip-bad", missing, image)
    assert mixed.exit_code == 0, mixed.output
    assert f"skipped {missing}: image file not found" in mixed.output
    assert re.search(rf"1 images predicted into {re.escape(str(tmp_path / 'b'))}, \d+ text regions .*; 1 skipped",
                     mixed.output)
    assert json.loads((tmp_path / "b" / f"{image.stem}.json").read_text())["image"] == image.name
    nothing = invoke("predict", "--checkpoint", checkpoint, "--out", tmp_path / "c", "--skip-bad", missing)
    assert nothing.exit_code == 1 and "0 images predicted (nothing written to" in nothing.output
    assert not (tmp_path / "c").exists()


def test_build_summary_names_reasons_without_placeholders(tmp_path):
    from wds_ocr.data.synth import synthesize

    root = tmp_path / "data"
    synthesize(root, 4, seed=1, val_fraction=0.25)
    annotations = root / "jsons" / "train.json"
    doc = json.loads(annotations.read_text())
    for entry in doc["images"].values():
        first = sorted(entry["words"])[0]
        entry["words"][first]["points"] = [[1, 1], [5, 5]]  # 2 points: the word is skipped
    annotations.write_text(json.dumps(doc))
    result = invoke("build-shards", root, "--split", "train", "--out", tmp_path / "s", "--quiet",
                    "--set", "transform.size=64")
    assert result.exit_code == 0, result.output
    assert "#" not in result.output
    assert "    3 x word: polygon has 2 points, need at least 3\n" in result.output
    assert "4 shards (at most 256 samples" not in result.output and "1 shard (at most 256 samples or 1.1 GB each: " \
        "shards.max_samples, shards.max_bytes)" in result.output


def test_train_run_record_names_its_shards(shards, tmp_path):
    result = invoke("train", "--shards", shards, "--val-shards", shards, "--out", tmp_path / "run", "--max-steps", "1",
                    "--quiet", "--set", "model.neck_channels=32", "--set", "loader.batch_size=2")
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["train_shards"] == str(shards.resolve()) and record["val_shards"] == str(shards.resolve())
    assert record["resumed_from"] is None and re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", record["started"])
    assert np.isfinite(json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0]).get("loss", 0.0))


def test_the_readme_loader_example_runs_as_written_on_this_machine(shards):
    """The README's "loader in your own training code" block, run on CPU torch (the set-up's)."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("## The loader in your own training code", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    assert 'to_device(batch, device)' in code and 'torch.cuda.is_available()' in code
    code = code.replace('"shards/train"', repr(str(shards))).replace("range(10)", "range(1)")
    code = code.replace("batch_size=8", "batch_size=2")
    code = code.replace("        ...\n", "        seen.append((images.shape, images.dtype, sorted(maps)))\n")
    scope: dict = {"seen": []}
    exec(compile(code, "README.md", "exec"), scope)
    assert len(scope["seen"]) == 4  # 9 samples in full batches of 2
    shape, dtype, names = scope["seen"][0]
    assert tuple(shape) == (2, 3, 64, 64) and dtype == torch.float32
    assert names == ["gt", "mask", "thresh_map", "thresh_mask"]
