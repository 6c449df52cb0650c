"""Device-side steps: normalization equals the live CPU path; augmentation moves image and maps together."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from wds_ocr.config import AugmentConfig
from wds_ocr.data.pipeline import normalize_image
from wds_ocr.loader.device import Augmenter, normalize, prepare, to_device
from wds_ocr.loader.loaders import make_loader
from wds_ocr.loader.stream import ShardStream

from conftest import build_small_shards


@pytest.fixture(scope="module")
def batch(synth_root, tmp_path_factory):
    """Four receipts at 256x256: large enough for text to survive min_text_size in gt."""
    folder = build_small_shards(synth_root, tmp_path_factory.mktemp("device") / "s", size=256)
    batch = next(iter(make_loader(ShardStream(folder, batch_size=4), 0, mode="processes")))
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


# ---------------------------------------------------------------- crop windows


def _still(**changes) -> AugmentConfig:
    """No flip, scale 1, no rotation: only the window placement is random."""
    return AugmentConfig(**{"hflip": 0.0, "affine": True, "scale_min": 1.0, "scale_max": 1.0, "rotate_degrees": 0.0,
                            **changes})


def _region_image(n: int, size: int, regions: torch.Tensor) -> torch.Tensor:
    """(N, 3, S, S) float images: 255 inside each sample's region, 0 outside."""
    images = torch.zeros(n, 3, size, size)
    for row, (x, y, w, h) in enumerate(regions.int().tolist()):
        images[row, :, y : y + h, x : x + w] = 255.0
    return images


def test_a_whole_record_crop_without_randomness_is_the_identity(batch):
    augmenter = Augmenter(_still(crop_size=256), thresh_min=0.3)
    images = batch.images.permute(0, 3, 1, 2).float()
    out, maps = augmenter(images, maps_of(batch))
    torch.testing.assert_close(out, images, rtol=0, atol=0.01)
    for name, value in maps_of(batch).items():
        torch.testing.assert_close(maps[name].float(), value.float(), rtol=0, atol=1e-3)


def test_crop_windows_lie_inside_the_image_not_its_padding():
    n, size, crop = 16, 256, 96
    # images of 160 x 256 at the top left (a tall receipt padded on the right), and one of 60 x 200
    regions = torch.tensor([[0.0, 0.0, 160.0, 256.0]] * (n - 1) + [[0.0, 0.0, 60.0, 200.0]])
    images = _region_image(n, size, regions)
    maps = {"gt": torch.zeros(n, size, size, dtype=torch.uint8), "mask": torch.ones(n, size, size, dtype=torch.uint8),
            "thresh_map": torch.full((n, size, size), 0.3, dtype=torch.float16),
            "thresh_mask": torch.zeros(n, size, size, dtype=torch.uint8)}
    out, out_maps = Augmenter(_still(crop_size=crop), thresh_min=0.3, seed=3)(images, maps, regions=regions)
    assert out.shape == (n, 3, crop, crop) and out_maps["gt"].shape == (n, crop, crop)
    assert out_maps["mask"].dtype == torch.uint8 and out_maps["thresh_map"].dtype == torch.float16
    # every window of a large enough image is image only (bilinear edges aside)
    assert float(out[: n - 1, :, 1:-1, 1:-1].min()) > 254.0
    # the 60-px-wide image is narrower than the window: all 60 of its columns are inside it
    inside = (out[n - 1, 0] > 127.5).any(dim=0)
    assert int(inside.sum()) == 60
    # windows move: not every sample gets the same one
    centres = Augmenter(_still(crop_size=crop), 0.3, seed=3).crop_theta(n, size, regions, torch.device("cpu"),
                                                                         torch.Generator().manual_seed(0))[:, :, 2]
    assert centres[: n - 1, 0].std() > 0.05 and centres[: n - 1, 1].std() > 0.05


def test_random_crops_move_image_and_maps_together_and_repeat(batch):
    config = AugmentConfig(hflip=0.5, affine=True, scale_min=0.8, scale_max=1.25, rotate_degrees=10, crop_size=128)
    augmenter = Augmenter(config, thresh_min=0.3, seed=1)
    from wds_ocr.loader.device import content_regions

    regions = content_regions(batch.info)
    assert regions.shape == (4, 4)
    gt_image = batch.gt.float().mul(255.0).unsqueeze(1).repeat(1, 3, 1, 1)
    moved, maps = augmenter(gt_image, maps_of(batch), epoch=2, index=1, regions=regions)
    again, maps_again = augmenter(gt_image, maps_of(batch), epoch=2, index=1, regions=regions)
    assert torch.equal(moved, again) and all(torch.equal(maps[k], maps_again[k]) for k in maps)
    assert moved.shape == (4, 3, 128, 128)
    agreement = ((moved[:, 0] > 127.5) == maps["gt"].bool()).float().mean()
    assert float(agreement) > 0.99
    for name in ("gt", "mask", "thresh_mask"):
        assert set(maps[name].unique().tolist()) <= {0, 1}


def test_a_crop_larger_than_the_records_is_refused(batch):
    augmenter = Augmenter(AugmentConfig(crop_size=512), thresh_min=0.3)
    with pytest.raises(ValueError, match=r"augment.crop_size=512 needs square records of at least that side, got 256x256"):
        augmenter(batch.images.permute(0, 3, 1, 2).float(), maps_of(batch))


# --- expansion of the compact records ------------------------------------------------------------


def live_arrays(root, split, config, keys=None):
    from wds_ocr.data.pipeline import process_sample
    from wds_ocr.data.sources import list_source
    from wds_ocr.shards.codec import full_arrays
    from wds_ocr.shards.naming import record_key

    samples = list_source(root, split, config.source).samples
    return {record_key(s.index, s.name): full_arrays(process_sample(s, config)) for s in samples
            if keys is None or record_key(s.index, s.name) in keys}


def assert_expanded_equals_live(batch, moved, live) -> int:
    for row, key in enumerate(batch.keys):
        for name, array in live[key].items():
            got = (moved.images if name == "image" else getattr(moved, name))[row]
            assert got.dtype == {np.uint8: torch.uint8, np.float16: torch.float16}[array.dtype.type], name
            assert got.numpy().tobytes() == array.tobytes(), (key, name)
    return len(batch)


@pytest.mark.parametrize("mode", ["threads", "processes"])
def test_device_expansion_equals_the_live_pipeline_on_synthetic_receipts(synth_root, tmp_path, mode):
    from wds_ocr.config import load_config

    folder = build_small_shards(synth_root, tmp_path / "s", size=256, max_samples=4)
    live = live_arrays(synth_root, "train", load_config(None, ["transform.size=256"]))
    seen = 0
    for batch in make_loader(ShardStream(folder, batch_size=3), 2, mode=mode):
        seen += assert_expanded_equals_live(batch, to_device(batch, "cpu"), live)
    assert seen == 9


def test_device_expansion_equals_the_live_pipeline_on_real_receipts(sroie_root, tmp_path):
    """Five SROIE validation receipts at the default 640 (one with an EXIF orientation tag)."""
    from wds_ocr.config import load_config
    from wds_ocr.shards.build import Partition, build_shards

    config = load_config(None, [])
    result = build_shards(sroie_root, "val", tmp_path / "s", config, partition=Partition.parse("0/8"))
    keys = set(result.manifest.shards[0].keys)
    live = live_arrays(sroie_root, "val", config, keys)
    assert len(live) == 5
    stream = ShardStream(result.manifest_path, batch_size=2)
    seen = 0
    for batch in make_loader(stream, 2, mode="threads"):
        moved = to_device(batch, "cpu")
        seen += assert_expanded_equals_live(batch, moved, live)
        for name, value in moved.maps().items():  # and the host batch's CPU expansion is the same
            assert torch.equal(value, getattr(batch, name)), name
    assert seen == 5
    sizes = [entry.span(i)[1] - entry.span(i)[0] for entry in result.manifest.shards for i in range(entry.samples)]
    assert max(sizes) < 1_320_000  # a 640 px receipt was 3.29 MB as full arrays


def test_normalize_cpu_table_path_gives_the_elementwise_bits():
    # uint8 on the CPU goes through the per-channel table, float input through the elementwise ops
    images = torch.arange(256, dtype=torch.uint8).repeat(3 * 4 * 5 * 7).view(4, 5 * 16, 7 * 16, 3)
    table = normalize(images)
    elementwise = normalize(images.float())
    assert table.dtype == torch.float32 and table.shape == (4, 3, 80, 112)
    assert table.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(table, elementwise)
    assert set(images.unique().tolist()) == set(range(256))  # every level of every channel checked
