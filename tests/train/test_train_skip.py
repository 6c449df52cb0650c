"""Training with loader.on_error=skip survives batches whose every sample is corrupt."""

from __future__ import annotations

import json

from conftest import build_small_shards, copy_shards, rewrite_record
from wds_ocr.config import load_config
from wds_ocr.shards.manifest import load_manifest
from wds_ocr.train.loop import train


def test_all_corrupt_batches_are_skipped_and_counted(synth_root, tmp_path):
    good = build_small_shards(synth_root, tmp_path / "good", size=64, max_samples=100)
    folder = copy_shards(good, tmp_path / "bad")
    for key in load_manifest(folder).shards[0].keys:
        rewrite_record(folder, key, lambda header: header.__setitem__("version", 99))
    config = load_config(None, ["transform.size=64", "loader.on_error=skip", "loader.batch_size=3",
                                "loader.mode=threads", "loader.workers=1", "model.neck_channels=32",
                                "train.epochs=1", "train.precision=32", "train.log_every=1"])
    result = train(config, folder, out_dir=tmp_path / "run", device="cpu")
    assert result.steps == 3 and result.epochs == 1  # 9 samples / 3: every batch empty, none crashed
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines if line["event"] == "train"] == [1, 2, 3]
    assert result.skipped == 9  # the SkipPolicy's count reaches the result and the metrics
    skips = [line for line in lines if line["event"] == "skips"]
    assert len(skips) == 1 and skips[0]["skipped"] == 9 and skips[0]["step"] == 3
    assert skips[0]["examples"][0].endswith("record version 99 is not supported (this code reads 3); "
                                            "rebuild the shards or upgrade wds-ocr")
