"""The end-to-end commands through the CLI: demo, train, evaluate, predict, bench."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from wds_ocr.cli import cli


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> tuple[Path, str]:
    """A small demo: 8 receipts, one epoch (seconds, not minutes)."""
    out = tmp_path_factory.mktemp("demo") / "demo"
    result = CliRunner().invoke(cli, ["demo", "--out", str(out), "--n", "8", "--workers", "1",
                                      "--set", "train.epochs=1", "--set", "postprocess.box_thresh=0.3"])
    assert result.exit_code == 0, result.output
    return out, result.output


def test_demo_tells_the_whole_story(demo_run):
    out, output = demo_run
    stages = [line for line in output.splitlines() if line.startswith("== ")]
    assert stages == ["== synth", "== build-shards", "== verify", "== train", "== evaluate", "== timings"]
    assert "8 receipts (train 6, val 2), 51 words, 2 stored with an EXIF orientation tag" in output
    assert "train: 6 written, 0 rejected; 1 shard (at most 8 samples or 1.1 GB each: shards.max_samples, " \
           "shards.max_bytes), built" in output
    # not a terminal: the train stage's progress comes as plain lines (stderr), the last one at the end
    assert re.search(r"^train: 1/1 steps \(100%\), [0-9.]+ (s/step|steps/s); epoch 0, loss [0-9.]+", output, re.M)
    assert "train: 6 records, 6 bit-equal to the live pipeline: OK" in output
    assert "shards and live path agree: yes" in output
    assert (out / "run" / "last.pt").is_file() and (out / "shards" / "val" / "manifest.json").is_file()
    again = CliRunner().invoke(cli, ["demo", "--out", str(out), "--n", "8", "--workers", "1",
                                     "--set", "train.epochs=1", "--set", "postprocess.box_thresh=0.3"])
    assert again.exit_code == 0, again.output
    assert "reusing" in again.output and "train: 6 written, 0 rejected; 1 shard (at most 8 samples or 1.1 GB each: " \
           "shards.max_samples, shards.max_bytes), up to date, reused" in again.output


def test_evaluate_from_shards_and_source_agree_as_json(demo_run):
    out, _ = demo_run
    checkpoint = str(out / "run" / "last.pt")
    runner = CliRunner()
    common = ["--checkpoint", checkpoint, "--json", "--workers", "0", "--set", "postprocess.box_thresh=0.3"]
    from_shards = runner.invoke(cli, ["evaluate", "--shards", str(out / "shards" / "val"), *common])
    from_source = runner.invoke(cli, ["evaluate", "--source", str(out / "data"), "--split", "val", *common])
    assert from_shards.exit_code == 0 and from_source.exit_code == 0, from_shards.output + from_source.output
    a, b = json.loads(from_shards.output), json.loads(from_source.output)
    assert a["images"] == 2
    assert {k: a[k] for k in ("precision", "recall", "hmean", "matched", "gt_care", "det_care")} == \
           {k: b[k] for k in ("precision", "recall", "hmean", "matched", "gt_care", "det_care")}


def test_evaluate_needs_exactly_one_input(demo_run):
    out, _ = demo_run
    result = CliRunner().invoke(cli, ["evaluate", "--checkpoint", str(out / "run" / "last.pt")])
    assert result.exit_code == 2
    assert "error: give exactly one of --shards or --source" in result.output


def test_evaluate_sweep_prints_the_best_settings_and_refuses_bad_specs(demo_run):
    out, _ = demo_run
    common = ["evaluate", "--checkpoint", str(out / "run" / "last.pt"), "--shards", str(out / "shards" / "train"),
              "--workers", "0", "--quiet"]
    result = CliRunner().invoke(cli, [*common, "--sweep", "box_thresh=0.3,0.05", "--sweep", "thresh=0.3,0.01",
                                      "--json"])
    assert result.exit_code == 0, result.output
    body = json.loads(result.output)
    sweep = body["sweep"]
    assert len(sweep) == 4 and [s["hmean"] for s in sweep] == sorted((s["hmean"] for s in sweep), reverse=True)
    assert {(s["postprocess"]["box_thresh"], s["postprocess"]["thresh"]) for s in sweep} == \
        {(0.3, 0.3), (0.3, 0.01), (0.05, 0.3), (0.05, 0.01)}
    assert all(s["gt_care"] == body["gt_care"] for s in sweep)
    text = CliRunner().invoke(cli, [*common, "--sweep", "box_thresh=0.3,0.05", "--sweep", "thresh=0.3,0.01"])
    assert text.exit_code == 0, text.output
    assert "sweep: 4 post-processing settings on the same maps (IoU), best 4:" in text.output
    assert re.search(r"^best: (--set postprocess\.\w+=[0-9.]+ ?)+$|^best: the settings in use$", text.output, re.M)
    saved = out / "run" / "tuned.pt"
    tuned = CliRunner().invoke(cli, [*common, "--sweep", "box_thresh=0.3,0.05", "--sweep", "thresh=0.3,0.01",
                                     "--json", "--save-best", str(saved)])
    assert tuned.exit_code == 0, tuned.output
    best = json.loads(tuned.output)["sweep"][0]
    from wds_ocr.run.checkpoint import open_checkpoint

    stored = open_checkpoint(saved).config.postprocess
    assert (stored.thresh, stored.box_thresh) == (best["postprocess"]["thresh"], best["postprocess"]["box_thresh"])
    again = json.loads(CliRunner().invoke(cli, ["evaluate", "--checkpoint", str(saved), "--shards",
                                                str(out / "shards" / "train"), "--workers", "0", "--json"]).output)
    assert (again["hmean"], again["matched"], again["det_care"]) == (best["hmean"], best["matched"], best["det_care"])
    unwritable = CliRunner().invoke(cli, [*common, "--sweep", "thresh=0.3", "--save-best",
                                          str(saved / "inside-a-file.pt")])
    assert unwritable.exit_code == 1
    assert f"error: --save-best {saved / 'inside-a-file.pt'} cannot be written: " in unwritable.output
    refused = CliRunner().invoke(cli, [*common, "--save-best", str(saved)])
    assert refused.exit_code == 2 and "error: --save-best needs --sweep" in refused.output
    bad = CliRunner().invoke(cli, [*common, "--sweep", "unclip=1.5"])
    assert bad.exit_code == 2
    assert "error: --sweep 'unclip=1.5': expected FIELD=V1,V2,... with FIELD one of thresh, box_thresh, " \
           "unclip_ratio, min_size" in bad.output


def test_predict_writes_json_and_overlays(demo_run, tmp_path):
    out, _ = demo_run
    images = sorted((out / "data" / "images" / "val").glob("*.jpg"))
    result = CliRunner().invoke(cli, ["predict", "--checkpoint", str(out / "run" / "last.pt"), *map(str, images),
                                      "--out", str(tmp_path / "pred")])
    assert result.exit_code == 0, result.output
    assert f"{len(images)} images predicted into {tmp_path / 'pred'}" in result.output
    for image in images:
        body = json.loads((tmp_path / "pred" / f"{image.stem}.json").read_text())
        assert body["image"] == image.name and body["width"] > 0
        assert (tmp_path / "pred" / f"{image.stem}.png").is_file()


def test_predict_names_a_bad_image(demo_run, tmp_path):
    out, _ = demo_run
    bad = tmp_path / "notes.jpg"
    bad.write_text("not an image")
    result = CliRunner().invoke(cli, ["predict", "--checkpoint", str(out / "run" / "last.pt"), str(bad),
                                      "--out", str(tmp_path / "pred")])
    assert result.exit_code == 1
    assert result.output == (f"error: {bad}: not an image: the data starts with b'not an i', not a JPEG, PNG, WebP, "
                             "TIFF or BMP signature; check that the file is really an image\n")


def test_train_resumes_from_its_checkpoint_with_its_settings(demo_run, tmp_path):
    out, _ = demo_run
    shards = str(out / "shards" / "train")
    runner = CliRunner()
    first = runner.invoke(cli, ["train", "--shards", shards, "--out", str(tmp_path / "run"), "--stop-after", "1",
                                "--quiet", "--set", "model.neck_channels=64", "--set", "train.epochs=2",
                                "--set", "loader.batch_size=4"])
    assert first.exit_code == 0, first.output
    assert "trained 1 step over 1 epoch on 1 process in" in first.output
    checkpoint = str(tmp_path / "run" / "last.pt")
    # an override that changes what the saved position means is refused, naming the setting
    changed = runner.invoke(cli, ["train", "--shards", shards, "--out", str(tmp_path / "run"), "--quiet",
                                  "--resume", checkpoint, "--set", "loader.batch_size=2"])
    assert changed.exit_code == 2
    assert (f"error: cannot resume from {checkpoint}: loader.batch_size is 4 in the checkpoint, 2 now; changing it "
            "would change what the saved position means. Resume without that override (a resume takes its settings "
            "from the checkpoint), or start a new run in another --out folder") in changed.output
    # no --set repeated: the checkpoint's settings (neck 64, 2 epochs, batch 4) are the run's
    resumed = runner.invoke(cli, ["train", "--shards", shards, "--out", str(tmp_path / "run"), "--quiet",
                                  "--resume", checkpoint])
    assert resumed.exit_code == 0, resumed.output
    assert "trained 2 steps over 2 epochs on 1 process in" in resumed.output  # 6 samples / batch 4 = 1 step per epoch
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["event"] == "train"]
    assert steps == sorted(set(steps)) and steps[-1] == 2


def test_train_max_steps_sets_the_run_length(demo_run, tmp_path):
    out, _ = demo_run
    result = CliRunner().invoke(cli, ["train", "--shards", str(out / "shards" / "train"), "--out", str(tmp_path),
                                      "--max-steps", "3", "--quiet", "--set", "model.neck_channels=32",
                                      "--set", "loader.batch_size=4"])
    assert result.exit_code == 0, result.output
    assert "trained 3 steps over 3 epochs on 1 process in" in result.output  # train.epochs (10) does not apply


def test_train_refuses_settings_the_shards_were_not_built_with(demo_run, tmp_path):
    out, _ = demo_run
    result = CliRunner().invoke(cli, ["train", "--shards", str(out / "shards" / "train"), "--out", str(tmp_path),
                                      "--set", "transform.size=256"])
    assert result.exit_code == 2  # a configuration these shards cannot serve
    assert "error:" in result.output and "transform.size" in result.output


def test_shards_of_an_older_format_are_refused_with_the_rebuild_command(demo_run, tmp_path):
    out, _ = demo_run
    old = tmp_path / "demo"
    shutil.copytree(out / "data", old / "data")
    shutil.copytree(out / "shards", old / "shards")
    for split in ("train", "val"):  # what a demo folder built before the compact records holds
        manifest = old / "shards" / split / "manifest.json"
        manifest.write_text(manifest.read_text().replace('"schema_version": 4', '"schema_version": 3'))
    train = old / "shards" / "train"
    runner = CliRunner()
    rebuild = (f"{train / 'manifest.json'} has schema_version 3, written by an older wds-ocr (this one reads version "
               f"4: compact records with per-member checksums); rebuild the shards: wds-ocr build-shards SOURCE "
               f"--split train --out {train} --overwrite")
    trained = runner.invoke(cli, ["train", "--shards", str(train), "--out", str(tmp_path / "run")])
    assert trained.exit_code == 1 and trained.output.strip() == f"error: {rebuild}"
    verified = runner.invoke(cli, ["verify", str(train)])
    assert verified.exit_code == 1 and rebuild in verified.output and "Traceback" not in verified.output
    rebuilt = runner.invoke(cli, ["build-shards", str(old / "data"), "--split", "train", "--out", str(train),
                                  "--overwrite", "--set", "transform.size=128"])
    assert rebuilt.exit_code == 0, rebuilt.output
    assert json.loads((train / "manifest.json").read_text())["schema_version"] == 4
    for split in ("train", "val"):  # old again: the demo rebuilds the shards in its own folder
        manifest = old / "shards" / split / "manifest.json"
        manifest.write_text(manifest.read_text().replace('"schema_version": 4', '"schema_version": 3'))
    demo = runner.invoke(cli, ["demo", "--out", str(old), "--n", "8", "--workers", "1", "--set", "train.epochs=1"])
    assert demo.exit_code == 0 and "Traceback" not in demo.output, demo.output
    assert "train: 6 written, 0 rejected; 1 shard" in demo.output and ", built" in demo.output
    assert json.loads((train / "manifest.json").read_text())["schema_version"] == 4


def test_bench_reports_every_path_side_by_side(demo_run):
    out, _ = demo_run
    shards = out / "shards" / "val"
    result = CliRunner().invoke(cli, ["bench", str(out / "data"), "--shards", str(shards), "--seconds", "0",
                                      "--batch", "2", "--workers", "1", "--peers", "webdataset", "--http", "python",
                                      "--no-live", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output[result.output.index("{\n"):])
    assert sorted(report["median"]) == ["peer: webdataset", "shards (HTTP, threads)", "shards (processes)",
                                        "shards (threads)"]
    for name, row in report["median"].items():
        assert row["samples"] == row["epochs"] * 2, name  # the 2 val receipts, whole epochs
    threads_row, sizes = report["median"]["shards (threads)"], report["record_bytes"]
    assert threads_row["bytes_read"] == pytest.approx(threads_row["epochs"] * sizes["mean"] * sizes["count"])
    assert report["record_bytes"]["count"] == 2 and report["record_bytes"]["full_arrays"] == 128 * 128 * 8
    assert report["http_server"] == "Python ThreadingHTTPServer with os.sendfile, in its own process"
    ratios = report["rounds"][0]["ratios"]
    threads = report["median"]["shards (threads)"]["samples_per_second"]
    assert ratios["processes_over_threads"] == report["median"]["shards (processes)"]["samples_per_second"] / threads
    assert ratios["threads_over_live"] is None and ratios["threads_expanded_fraction_of_raw_read"] > 0
    bare = report["rounds"][0]["bare_read_mb_per_second"]
    assert bare > 0 and report["bare_read_mb_per_second"] == bare
    assert ratios["threads_fraction_of_bare_reads"] == report["median"]["shards (threads)"]["mb_per_second"] / bare
    assert ratios["bare_reads_fraction_of_raw_read"] == bare / report["rounds"][0]["raw_read_mb_per_second"]
    bad = CliRunner().invoke(cli, ["bench", str(out / "data"), "--shards", str(shards), "--peers", "tfds"])
    assert bad.exit_code == 2 and "--peers: unknown tfds; choose from webdataset, litdata, mosaic or none" in bad.output
