"""Experiment tools under tools/ that the benchmarks' figures come from: their parts checked on
known inputs (the runs themselves are recorded in docs/BENCHMARKS.md)."""

from __future__ import annotations

import importlib.util

import cv2
import numpy as np
import pytest
import torch

from conftest import REPO_ROOT


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def guided():
    return _tool("finetune_guided")


def test_a_kernel_is_missed_only_where_the_teacher_stays_under_the_bound(guided):
    gt = torch.zeros(1, 16, 32)
    gt[0, 4:8, 2:10] = 1  # a word the teacher sees
    gt[0, 4:8, 20:24] = 1  # a word it does not
    teacher = torch.zeros(1, 16, 32)
    teacher[0, 5, 3] = 0.6
    teacher[0, 5, 21] = 0.09
    missed = guided.missed_kernels(gt, teacher, 0.1)
    assert missed[0, 4:8, 20:24].all() and int(missed.sum()) == 16
    teacher[0, 5, 21] = 0.1  # at the bound: seen
    assert not guided.missed_kernels(gt, teacher, 0.1).any()


def test_the_guided_loss_is_small_for_the_target_and_large_against_it(guided):
    target = torch.zeros(2, 8, 8)
    target[:, 2:5, 2:6] = 1
    valid = torch.ones_like(target)
    agree = guided.guided_loss(torch.where(target > 0, 12.0, -12.0), target, valid)
    oppose = guided.guided_loss(torch.where(target > 0, -12.0, 12.0), target, valid)
    assert float(agree) < 1e-3
    assert float(oppose) > 5 * 11.9  # every counted pixel wrong by a logit of 12, plus dice near 1
    masked = guided.guided_loss(torch.where(target > 0, -12.0, 12.0), target, torch.zeros_like(target))
    assert float(masked) == pytest.approx(1.0, abs=1e-3)  # nothing valid: only dice's constant remains
    one_wrong = torch.where(target > 0, 12.0, -12.0)
    one_wrong[0, 2, 2] = -12.0  # one positive pixel wrong by a logit of 12
    weight = torch.ones_like(target)
    weight[0, 2, 2] = 10.0  # --short-weight 10 on that pixel
    plain = guided.guided_loss(one_wrong, target, valid)
    weighted = guided.guided_loss(one_wrong, target, valid, weight)
    # 24 positives and their 72 hardest negatives share the BCE's denominator; x5 for the BCE's weight
    assert float(weighted - plain) == pytest.approx(5 * 9 * 12.0 / 96, rel=1e-3)


def test_word_masks_hold_the_word_polygons_and_the_pipelines_kernels(guided, synth_root):
    from wds_ocr.config import load_config
    from wds_ocr.data.images import read_image_bytes
    from wds_ocr.data.pipeline import process_sample
    from wds_ocr.data.sources import list_source

    size = 128
    everything = guided.word_masks(synth_root, "val", size, [], short=10**6)
    short = guided.word_masks(synth_root, "val", size, [], short=3)
    config = load_config(None, [f"transform.size={size}"])
    samples = list_source(synth_root, "val", config.source).samples
    assert sorted(everything) == sorted(sample.name for sample in samples)
    shorter = 0
    for sample in samples:
        processed = process_sample(sample, config, read_image_bytes(sample.image_path, sample.name))
        mask = everything[sample.name].numpy()
        # bit 2 with every word chosen: the kernels the pipeline writes into the record's gt map
        np.testing.assert_array_equal((mask >> 1) & 1, processed.targets.gt)
        words = np.zeros((size, size), np.uint8)
        for polygon in processed.meta.polygons:
            cv2.fillPoly(words, [np.round(np.asarray(polygon)).astype(np.int32)], 1)
        np.testing.assert_array_equal(mask & 1, words)
        few = short[sample.name].numpy()
        np.testing.assert_array_equal(few & 1, words)
        assert not np.any(((few >> 1) & 1) > ((mask >> 1) & 1))  # short words' kernels are a part
        shorter += int(((few >> 1) & 1).sum() < ((mask >> 1) & 1).sum())
    assert shorter == len(samples)  # each synthetic receipt has words longer than 3 characters


# ---------------------------------------------------------------- the PP-OCRv4 GPU check (tools/gpu_check.py --ppocr)


@pytest.fixture(scope="module")
def gpu_check():
    return _tool("gpu_check")


def test_a_shrunk_split_gives_the_records_of_the_originals(gpu_check, sroie_root, tmp_path):
    """The copy a device machine trains on: upright, 1600 px, points scaled; the 1600 px records
    built from it match those built from the original receipts (one of them EXIF-rotated)."""
    from wds_ocr.config import load_config
    from wds_ocr.data.images import read_image_bytes, read_orientation
    from wds_ocr.data.pipeline import process_sample
    from wds_ocr.data.sources import list_source

    subset = gpu_check.subset_source(sroie_root, tmp_path / "subset", (5, 0))  # sroie_020 is EXIF-rotated
    assert read_orientation((subset / "images" / "train" / "sroie_020.jpg").read_bytes()) == 3
    counts = gpu_check.shrink_split(subset, "train", tmp_path / "copy", 1600)
    assert counts == {"images": 5, "words": counts["words"], "samples_in": 5, "left_out": [], "words_left_out": []}
    config = load_config(None, ["transform.size=1600", "transform.jpeg_reduction=off"])
    originals = list_source(subset, "train", config.source).samples
    copies = list_source(tmp_path / "copy", "train", config.source).samples
    assert [s.name for s in copies] == [s.name for s in originals] and sum(len(s.words) for s in copies) == counts["words"]
    for original, copy in zip(originals, copies):
        data = read_image_bytes(copy.image_path, copy.name)
        assert read_orientation(data) == 1
        a = process_sample(original, config, read_image_bytes(original.image_path, original.name))
        b = process_sample(copy, config, data)
        assert a.image.shape == b.image.shape
        assert np.abs(a.image.astype(np.int16) - b.image.astype(np.int16)).mean() < 2.0  # resampling and JPEG noise
        for p, q in zip(a.meta.polygons, b.meta.polygons):
            assert np.abs(np.asarray(p) - np.asarray(q)).max() < 1.0  # record pixels
        assert [w.text for w in copy.words] == [w.text for w in original.words]


def test_the_ppocr_check_runs_end_to_end_on_the_cpu(gpu_check, synth_root, tmp_path):
    import json
    import subprocess
    import sys

    from conftest import random_checkpoint
    from wds_ocr.config import load_config

    init = random_checkpoint(tmp_path, load_config(None, ["model.neck_channels=32"]))
    script = str(REPO_ROOT / "tools" / "gpu_check.py")
    prepared = tmp_path / "prepared"
    ready = gpu_check.ppocr_prepare(gpu_check.parse_args(["--ppocr-prepare", str(prepared), "--init", str(init),
                                                          "--source", str(synth_root)]))
    assert ready["train"]["images"] == 9 and (prepared / "init.pt").read_bytes() == init.read_bytes()
    done = subprocess.run([sys.executable, script, "--ppocr", str(prepared), "--out", str(tmp_path / "out"),
                           "--smoke", "--device", "cpu", "--guided-steps", "2", "--db-steps", "2"],
                          capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["build"]["records"] == 9
    assert summary["guided"]["returncode"] == 0 and "after 2 steps" in summary["guided"]["log"][-1]
    assert summary["db"]["returncode"] == 0 and summary["db"]["steps"] == 2
    assert (tmp_path / "out" / "guided.pt").is_file() and (tmp_path / "out" / "db.pt").is_file()
    import shutil

    broken = shutil.copytree(synth_root, tmp_path / "broken")
    (broken / "images" / "train" / "synth_0001.jpg").write_bytes(b"\xff\xd8\xff not a whole JPEG")
    (broken / "images" / "train" / "stray.jpg").write_bytes((broken / "images" / "train" / "synth_0002.jpg").read_bytes())
    counts = gpu_check.shrink_split(broken, "train", tmp_path / "copy", 1600)
    assert counts["images"] == 8 and counts["samples_in"] == 10  # 9 annotated, one stray image
    assert counts["left_out"] == [f"stray.jpg: image has no entry in {broken / 'jsons' / 'train.json'}",
                                  "synth_0001.jpg: truncated JPEG: the file ends inside its header; copy or download "
                                  "the file again (it is incomplete)"]
    (tmp_path / "bad.pt").write_bytes(b"garbage")
    with pytest.raises(SystemExit, match="bad.pt is not a torch checkpoint"):
        gpu_check.main(["--ppocr-prepare", str(tmp_path / "never"), "--init", str(tmp_path / "bad.pt"),
                        "--source", str(synth_root)])
    assert not (tmp_path / "never").exists()
    with pytest.raises(SystemExit, match="init.pt is missing: run --ppocr-prepare"):
        gpu_check.main(["--ppocr", str(tmp_path / "nothing"), "--out", str(tmp_path)])
