"""How faithful is warping the stored target maps, against rebuilding them from warped polygons?

The device augmentation (``wds_ocr.loader.device.Augmenter``) moves image and maps through one
sampling grid: nearest for gt / mask / thresh_mask, bilinear for thresh_map. DB instead warps the
polygons and builds the targets again. This script does both for every record of a shard folder,
with the same random draws, and compares:

* gt IoU: |warped AND rebuilt| / |warped OR rebuilt| over all gt pixels;
* mask agreement: share of pixels where the two masks agree, and the IoU of their 0 (ignored) areas;
* thresh_map L1: mean |warped - rebuilt| inside the union of the two thresh_masks, and over all pixels;
* words (wholly inside the output) whose kept/ignored status changes: min_text_size applied to
  the warped size instead of the stored one;
* for scale: the gt IoU and thresh_map L1 between the rebuilt targets and the same polygons moved
  by half a pixel, i.e. what rasterization alone changes.

    .venv/bin/python tools/aug_fidelity.py shards/sroie-train [--set augment.crop_size=320] [--json]

Polygons are mapped with the exact affine the grid applies (continuous pixel coordinates,
align_corners=False); the rebuilt targets use ``make_targets`` with the shards' target settings.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import torch

from wds_ocr.config import load_config
from wds_ocr.data.targets import make_targets
from wds_ocr.loader.device import Augmenter, content_regions, to_device
from wds_ocr.loader.loaders import make_loader
from wds_ocr.loader.stream import ShardStream
from wds_ocr.shards.verify import config_from_manifest


def output_to_input(theta: np.ndarray, out_size: int, in_size: int) -> np.ndarray:
    """3x3 map from output continuous pixel coordinates to input ones, for one (2, 3) theta."""
    to_normalized = np.array([[2.0 / out_size, 0, -1.0], [0, 2.0 / out_size, -1.0], [0, 0, 1.0]])
    from_normalized = np.array([[in_size / 2.0, 0, in_size / 2.0], [0, in_size / 2.0, in_size / 2.0], [0, 0, 1.0]])
    grid = np.vstack([theta, [0.0, 0.0, 1.0]])
    return from_normalized @ grid @ to_normalized


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("shards")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="augment.* settings on top of the defaults (repeatable)")
    parser.add_argument("--epochs", type=int, default=2, help="augmentation draws per record")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    stream = ShardStream(args.shards, batch_size=4)
    built = config_from_manifest(stream.manifest)
    config = load_config(None, args.overrides, base=built.model_dump(mode="json"))
    augmenter = Augmenter(config.augment, config.targets.thresh_min, seed=config.train.seed)
    size = stream.size
    totals = dict(gt_inter=0, gt_union=0, shift_inter=0, shift_union=0, shift_l1_band=0.0, shift_band=0,
                  words_inside=0, mask_agree=0, pixels=0, ignored_inter=0, ignored_union=0,
                  l1_band=0.0, band=0, l1_all=0.0, words=0, words_flipped=0)
    for epoch in range(args.epochs):
        for batch in make_loader(stream, 0, mode="threads"):
            device = to_device(batch, "cpu")
            raw = device.images.permute(0, 3, 1, 2).float()
            regions = content_regions(batch.info)
            _, warped = augmenter(raw, device.maps(), epoch, batch.index, 0, regions)
            # the same draws again, to recover each sample's theta
            generator = augmenter._generator(raw.device, epoch, batch.index, 0)
            n = raw.shape[0]
            if config.augment.crop_size:
                theta = augmenter.crop_theta(n, size, regions, raw.device, generator)
                out_size = config.augment.crop_size
            else:
                theta = augmenter.theta(n, raw.device, generator)
                out_size = size
            for row, info in enumerate(batch.info):
                record_polygons = [np.asarray(p) for p in _record_polygons(stream, batch, row)]
                forward = np.linalg.inv(output_to_input(theta[row].numpy().astype(np.float64), out_size, size))
                moved = [(np.c_[p, np.ones(len(p))] @ forward.T)[:, :2] for p in record_polygons]
                rebuilt = make_targets(moved, list(info.dont_care), out_size, out_size, config.targets)
                before = make_targets(record_polygons, list(info.dont_care), size, size, config.targets)
                gt_w = warped["gt"][row].numpy().astype(bool)
                gt_r = rebuilt.gt.astype(bool)
                totals["gt_inter"] += int((gt_w & gt_r).sum())
                totals["gt_union"] += int((gt_w | gt_r).sum())
                shifted_targets = make_targets([p + 0.5 for p in moved], list(info.dont_care), out_size, out_size,
                                               config.targets)
                shifted = shifted_targets.gt.astype(bool)
                totals["shift_inter"] += int((shifted & gt_r).sum())
                totals["shift_union"] += int((shifted | gt_r).sum())
                shift_band = shifted_targets.thresh_mask.astype(bool) | rebuilt.thresh_mask.astype(bool)
                shift_difference = np.abs(shifted_targets.thresh_map.astype(np.float32)
                                          - rebuilt.thresh_map.astype(np.float32))
                totals["shift_l1_band"] += float(shift_difference[shift_band].sum())
                totals["shift_band"] += int(shift_band.sum())
                mask_w = warped["mask"][row].numpy().astype(bool)
                mask_r = rebuilt.mask.astype(bool)
                totals["mask_agree"] += int((mask_w == mask_r).sum())
                totals["pixels"] += mask_w.size
                totals["ignored_inter"] += int((~mask_w & ~mask_r).sum())
                totals["ignored_union"] += int((~mask_w | ~mask_r).sum())
                thresh_w = warped["thresh_map"][row].numpy().astype(np.float32)
                thresh_r = rebuilt.thresh_map.astype(np.float32)
                band = warped["thresh_mask"][row].numpy().astype(bool) | rebuilt.thresh_mask.astype(bool)
                difference = np.abs(thresh_w - thresh_r)
                totals["l1_band"] += float(difference[band].sum())
                totals["band"] += int(band.sum())
                totals["l1_all"] += float(difference.sum())
                # words wholly inside the output: a word cut by a crop's edge is clipped (and may become
                # too small) when rebuilt, while the warped maps keep its visible part as text
                inside = np.array([bool((m >= 0).all() and (m <= out_size).all()) for m in moved], dtype=bool)
                totals["words"] += len(record_polygons)
                totals["words_inside"] += int(inside.sum())
                totals["words_flipped"] += int((before.ignored != rebuilt.ignored)[inside].sum())
    result = {
        "shards": str(args.shards),
        "augment": config.augment.model_dump(mode="json"),
        "draws": args.epochs * stream.manifest.total_samples,
        "gt_iou": totals["gt_inter"] / max(totals["gt_union"], 1),
        "gt_iou_of_a_half_pixel_shift": totals["shift_inter"] / max(totals["shift_union"], 1),
        "mask_agreement": totals["mask_agree"] / max(totals["pixels"], 1),
        "ignored_region_iou": totals["ignored_inter"] / max(totals["ignored_union"], 1),
        "thresh_map_l1_in_band": totals["l1_band"] / max(totals["band"], 1),
        "thresh_map_l1_in_band_of_a_half_pixel_shift": totals["shift_l1_band"] / max(totals["shift_band"], 1),
        "thresh_map_l1_all_pixels": totals["l1_all"] / max(totals["pixels"], 1),
        "words_wholly_inside": totals["words_inside"] / max(totals["words"], 1),
        "words_kept_or_ignored_changed": totals["words_flipped"] / max(totals["words_inside"], 1),
    }
    if args.json:
        print(json.dumps(result, indent=1, sort_keys=True))
    else:
        for name, value in result.items():
            print(f"{name:32s} {value if not isinstance(value, float) else f'{value:.4f}'}")
    return 0


def _record_polygons(stream: ShardStream, batch, row: int) -> list[np.ndarray]:
    """The record's polygons in the transformed (record) frame, read again from the shard."""
    from wds_ocr.shards.codec import decode_record

    key = batch.info[row].key
    for index, entry in enumerate(stream.manifest.shards):
        if key in entry.keys:
            _, data = stream.read_member(index, entry.keys.index(key))
            return decode_record(data, entry.name, key).polygons("polygons")
    raise KeyError(key)


if __name__ == "__main__":
    torch.set_num_threads(2)
    sys.exit(main())
