"""The report's evaluation: every image's counts through evaluate's own functions, and the pixels
and polygons of the worst ones, drawn as overlays."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

# Overlay colours (RGB): ground truth, don't-care ground truth, detections. Chosen to stand out
# from paper-like backgrounds and from each other; the page's legend shows the same values.
GT_COLOR = (0, 170, 0)
DONT_CARE_COLOR = (255, 140, 0)
DET_COLOR = (30, 80, 255)
# Small records are enlarged (nearest neighbour: their pixels stay visible) to at least this side.
MIN_OVERLAY_SIDE = 384

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class ImageResult:
    """One image's counts (words that are not don't-care) and its rank key."""

    index: int  # position in evaluation order
    name: str
    key: str | None  # shard record key (None through the live path)
    matched: int
    gt_care: int
    det_care: int
    detections: int  # all boxes, don't-care ones included
    dont_care_gt: int

    @property
    def missed(self) -> int:
        return self.gt_care - self.matched

    @property
    def false_detections(self) -> int:
        return self.det_care - self.matched

    @property
    def precision(self) -> float | None:
        return self.matched / self.det_care if self.det_care else None

    @property
    def recall(self) -> float | None:
        return self.matched / self.gt_care if self.gt_care else None

    @property
    def hmean(self) -> float:
        total = self.gt_care + self.det_care
        return 2.0 * self.matched / total if total else 1.0

    def rank_key(self) -> tuple[float, int, int, str, int]:
        return (self.hmean, -self.missed, -self.false_detections, self.name, self.index)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "precision": self.precision, "recall": self.recall, "hmean": self.hmean,
                "missed": self.missed, "false_detections": self.false_detections}


@dataclass(frozen=True, eq=False)
class Kept:
    """What drawing one of the worst images needs, in the record frame of its valid region."""

    result: ImageResult
    image: np.ndarray  # (h, w, 3) uint8: the valid region of the record image
    gt: tuple[np.ndarray, ...]  # ground-truth polygons, relative to the region
    dont_care: np.ndarray  # (P,) bool
    detections: tuple[np.ndarray, ...]


# ---------------------------------------------------------------- evaluation


Fetch = Callable[[str | None, str], np.ndarray]  # (record key, image name) -> the record image (S, S, 3)


def batches_from_shards(shards: str, loader, skipped: list[str]) -> tuple[Iterator, int, Fetch]:
    """(images, truths, keys) batches of the shards as evaluate reads them, their count, and a way
    to read one record's image again by its key."""
    from wds_ocr.infer.detect import truth_from_info
    from wds_ocr.loader.loaders import make_loader
    from wds_ocr.loader.stream import ShardStream
    from wds_ocr.shards.codec import decode_record

    stream = ShardStream(shards, loader, rank=0, world_size=1)
    total = sum(len(plan.samples) for plan in stream.plans())

    def batches() -> Iterator:
        for batch in make_loader(stream):
            skipped.extend(f"{shard} [{key}]: {reason}" for shard, key, reason in batch.skipped)
            if len(batch):
                yield batch.images, [truth_from_info(i) for i in batch.info], [i.key for i in batch.info]

    places = {key: (index, position) for index, entry in enumerate(stream.manifest.shards)
              for position, key in enumerate(entry.keys)}

    def fetch(key: str | None, name: str) -> np.ndarray:
        index, position = places[key]
        _, data = stream.read_member(index, position)
        return decode_record(data, stream.manifest.shards[index].name, key).expand()["image"]

    return batches(), total, fetch


def batches_from_source(source: Path, split: str, config, loader, skipped: list[str]) -> tuple[Iterator, int, Fetch]:
    """The live path's batches exactly as evaluate_source makes them, their count, and a way to
    make one sample's record image again by its name."""
    from wds_ocr.data.sources import list_source
    from wds_ocr.infer.evaluate import LiveSamples, live_batches

    listing = list_source(source, split, config.source)
    skipped.extend(f"{reject.name}: {reject.reason}" for reject in listing.rejects)
    samples = LiveSamples(listing.samples, config)
    positions = {sample.name: index for index, sample in enumerate(listing.samples)}

    def batches() -> Iterator:
        for images, truths in live_batches(samples, loader.batch_size, loader.workers, skipped):
            yield images, truths, [None] * len(truths)

    def fetch(key: str | None, name: str) -> np.ndarray:
        return samples[positions[name]][0]

    return batches(), len(listing.samples), fetch


def _relative(polygons: Sequence[np.ndarray], forward: np.ndarray, offset: tuple[int, int]) -> tuple[np.ndarray, ...]:
    """Original-frame polygons -> the record frame (``forward``), relative to the valid region."""
    from wds_ocr.eval.postprocess import map_polygons

    shift = np.array(offset, dtype=np.float64)
    return tuple(p - shift for p in map_polygons(list(polygons), forward)) if len(polygons) else ()


def evaluate_images(checkpoint, batches: Iterator, config, precision: str, device, worst: int, fetch: Fetch, *,
                    post_workers: int = 0, capacity: int | None = None, progress: Progress | None = None,
                    total: int = 0) -> tuple[list[ImageResult], list[Kept]]:
    """Every image's counts (evaluation order) through evaluate's own run (``run_detection``: the
    same batches, content windows, post-processing and matching), then the worst ``worst`` images'
    pictures: each record image read again (``fetch``) and its detections made again, on its
    batch's content window, by the functions the scoring workers call."""
    import torch

    from wds_ocr.data.geometry import valid_region
    from wds_ocr.infer.detect import content_window, probability_maps, run_detection
    from wds_ocr.infer.scoring import detect

    model = checkpoint.model(device)
    crop = config.evaluation.crop_to_content
    truths: list = []
    keys: list[str | None] = []
    windows: list = []

    def counted() -> Iterator:
        for images, batch_truths, batch_keys in batches:
            window = content_window(batch_truths, int(images.shape[1])) if crop else None
            truths.extend(batch_truths)
            keys.extend(batch_keys)
            windows.extend([window] * len(batch_truths))
            yield images, batch_truths

    run = run_detection(model, counted(), config.postprocess, precision, device, post_workers=post_workers,
                        capacity=capacity, progress=progress, total=total, crop_to_content=crop)
    results = [ImageResult(index, image.name, keys[index], image.matched, image.gt_care, image.det_care,
                           image.detections, int(np.count_nonzero(truths[index].dont_care)))
               for index, image in enumerate(run.per_image)]
    kept: list[Kept] = []
    for result in sorted(results, key=ImageResult.rank_key)[:worst]:
        truth = truths[result.index]
        image = fetch(result.key, result.name)
        maps = probability_maps(model, torch.from_numpy(np.ascontiguousarray(image)[None]), device, precision,
                                windows[result.index])
        polygons = [d.polygon for d in detect(maps[0], truth.inverse_matrix, truth.original_size, config.postprocess)]
        (x, y), (width, height) = valid_region(truth.inverse_matrix, truth.original_size)
        forward = np.linalg.inv(truth.inverse_matrix)
        kept.append(Kept(result, np.array(image[y : y + height, x : x + width]),
                         _relative(truth.polygons, forward, (x, y)), np.asarray(truth.dont_care, dtype=bool),
                         _relative(polygons, forward, (x, y))))
    return results, kept


# ---------------------------------------------------------------- pictures


def draw_overlay(kept: Kept) -> np.ndarray:
    """The record image's valid region with ground truth, don't-care ground truth and detections."""
    image = kept.image
    height, width = image.shape[:2]
    scale = max(1, math.ceil(MIN_OVERLAY_SIDE / max(height, width, 1)))
    canvas = np.ascontiguousarray(cv2.resize(image, (width * scale, height * scale), interpolation=cv2.INTER_NEAREST)
                                  if scale > 1 else image.copy())
    thick = max(2, scale // 2)

    def draw(polygons: Sequence[np.ndarray], color: tuple[int, int, int], thickness: int) -> None:
        for polygon in polygons:
            points = np.round(np.asarray(polygon, dtype=np.float64) * scale).astype(np.int32).reshape(-1, 1, 2)
            cv2.polylines(canvas, [points], isClosed=True, color=color, thickness=thickness, lineType=cv2.LINE_AA)

    draw([p for p, ignored in zip(kept.gt, kept.dont_care) if not ignored], GT_COLOR, thick)
    draw([p for p, ignored in zip(kept.gt, kept.dont_care) if ignored], DONT_CARE_COLOR, thick)
    draw(kept.detections, DET_COLOR, max(1, thick // 2))
    return canvas


__all__ = ["DET_COLOR", "DONT_CARE_COLOR", "GT_COLOR", "ImageResult", "Kept", "batches_from_shards",
           "batches_from_source", "draw_overlay", "evaluate_images"]
