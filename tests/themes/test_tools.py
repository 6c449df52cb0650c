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
