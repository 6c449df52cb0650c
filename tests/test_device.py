"""Device-side steps: normalization equals the live CPU path; augmentation moves image and maps together."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from wds_ocr.config import AugmentConfig
from wds_ocr.data.pipeline import normalize_image
from wds_ocr.loader.device import Augmenter, normalize, prepare, to_device
from wds_ocr.loader.stream import ShardStream, make_loader

from conftest import build_small_shards


@pytest.fixture(scope="module")
def batch(synth_root, tmp_path_factory):
    """Four receipts at 256x256: large enough for text to survive min_text_size in gt."""
    folder = build_small_shards(synth_root, tmp_path_factory.mktemp("device") / "s", size=256)
    batch = next(iter(make_loader(ShardStream(folder, batch_size=4), 0)))
    assert int(batch.gt.sum()) > 1000
    return batch


def test_normalize_matches_the_live_cpu_normalization(batch):
    out = normalize(batch.images)
    assert out.shape == (4, 3, 256, 256) and out.dtype == torch.float32
    assert out.is_contiguous(memory_format=torch.channels_last)
    for row in range(4):
        expected = normalize_image(batch.images[row].numpy())
        np.testing.assert_allclose(out[row].numpy(), expected, rtol=1e-6, atol=1e-5)


def test_to_device_keeps_dtypes_and_values(batch):
    moved = to_device(batch, "cpu")
    assert moved.images.dtype == torch.uint8 and moved.thresh_map.dtype == torch.float16
    assert torch.equal(moved.gt, batch.gt)


def maps_of(batch):
    return to_device(batch, "cpu").maps()


def test_identity_affine_changes_nothing(batch):
    config = AugmentConfig(hflip=0.0, affine=True, scale_min=1.0, scale_max=1.0, rotate_degrees=0.0, translate=0.0)
    images = batch.images.permute(0, 3, 1, 2).float()
    out, maps = Augmenter(config, thresh_min=0.3)(images, maps_of(batch))
    torch.testing.assert_close(out, images, rtol=0, atol=0.01)  # grid arithmetic rounding only
    for name, value in maps_of(batch).items():
        torch.testing.assert_close(maps[name].float(), value.float(), rtol=0, atol=1e-3)


def test_flip_mirrors_image_and_maps_together(batch):
    config = AugmentConfig(hflip=1.0, affine=False)
    images = batch.images.permute(0, 3, 1, 2).float()
    out, maps = Augmenter(config, thresh_min=0.3)(images, maps_of(batch))
    assert torch.equal(out, images.flip(-1))
    for name, value in maps_of(batch).items():
        assert torch.equal(maps[name], value.flip(-1)), name


def test_random_affine_keeps_maps_valid_and_is_reproducible(batch):
    config = AugmentConfig(hflip=0.5, affine=True, scale_min=0.7, scale_max=1.3, rotate_degrees=15, translate=0.1)
    augmenter = Augmenter(config, thresh_min=0.3, seed=5)
    images = batch.images.permute(0, 3, 1, 2).float()
    out, maps = augmenter(images, maps_of(batch), epoch=1, index=2)
    again, maps_again = augmenter(images, maps_of(batch), epoch=1, index=2)
    other, _ = augmenter(images, maps_of(batch), epoch=1, index=3)
    assert torch.equal(out, again) and all(torch.equal(maps[k], maps_again[k]) for k in maps)
    assert not torch.equal(out, other)
    for name in ("gt", "mask", "thresh_mask"):
        assert maps[name].dtype == torch.uint8 and set(maps[name].unique().tolist()) <= {0, 1}
    thresh = maps["thresh_map"].float()
    assert maps["thresh_map"].dtype == torch.float16
    assert float(thresh.min()) >= 0.3 - 1e-3 and float(thresh.max()) <= 0.7 + 1e-3
    assert float(out.min()) >= 0.0 and float(out.max()) <= 255.0
    # image and maps move together: an "image" that is the gt map itself, augmented with the same
    # draw, lands on the augmented gt (bilinear vs nearest differ only along edges)
    gt_image = batch.gt.float().mul(255.0).unsqueeze(1).repeat(1, 3, 1, 1)
    moved, moved_maps = augmenter(gt_image, maps_of(batch), epoch=1, index=2)
    agreement = ((moved[:, 0] > 127.5) == moved_maps["gt"].bool()).float().mean()
    assert float(agreement) > 0.995
    assert int(moved_maps["gt"].sum()) > 0 and not torch.equal(moved_maps["gt"], batch.gt)


def test_prepare_returns_normalized_channels_last(batch):
    moved = to_device(batch, "cpu")
    images, maps = prepare(moved, Augmenter(AugmentConfig(hflip=1.0, affine=False), 0.3))
    assert images.is_contiguous(memory_format=torch.channels_last)
    expected = normalize(batch.images.flip(2))
    assert torch.equal(images, expected)
    assert torch.equal(maps["gt"], batch.gt.flip(-1))
