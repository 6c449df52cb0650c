"""Evaluate a checkpoint: probability maps -> boxes in the original image -> ICDAR 2015 P/R/H.

Two inputs, one computation:

* ``evaluate_shards`` streams records (uint8 image + everything evaluation needs) from shards;
* ``evaluate_source`` runs the live path (``process_sample``) on the source images.

Both hand the same uint8 images, in the same order and batch composition, to ``probability_maps``
(normalize on the device, forward under autocast, sigmoid in float32) and each map to ``detect``:
the map is cut to the sample's valid (resized, unpadded) region, found from the record's inverse
matrix and original size, so padding never yields boxes; the boxes are shifted by the padding
offset (0 for top-left padding, the centring offset for centre padding) and mapped to the
original image with the inverse matrix. They are matched against the original-frame polygons
and don't-care flags with ``DetectionMetric``. Shards being bit-identical to the live path, the
two give identical precision, recall and H-mean. Under DDP (torchrun) each rank takes every
world-th sample and the counts are all-reduced; ``per_image`` then holds this rank's images.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from wds_ocr.config import Config, PostprocessConfig
from wds_ocr.data.coverage import Coverage
from wds_ocr.data.geometry import valid_region
from wds_ocr.data.pipeline import process_sample
from wds_ocr.data.sources import SourceSample, list_source
from wds_ocr.errors import SampleError
from wds_ocr.eval.metric import DetectionMetric, DetectionScore
from wds_ocr.eval.postprocess import Detection, boxes_from_prob, map_polygons
from wds_ocr.loader.device import normalize
from wds_ocr.loader.stream import SampleInfo, ShardStream, make_loader
from wds_ocr.shards.build import record_key
from wds_ocr.run.checkpoint import load_model
from wds_ocr.run.runtime import Runtime, autocast, check_precision, resolve_precision, start_runtime, stop_runtime

EvalProgress = Callable[[int, int], None]  # (images done on this rank, images this rank will do)


@dataclass(frozen=True)
class ImageEval:
    name: str
    detections: int
    matched: int
    gt_care: int
    det_care: int
    coverage: Coverage = Coverage()  # its ground-truth words: in the training targets, or left out and why


@dataclass(frozen=True)
class EvalResult:
    score: DetectionScore  # over all ranks
    images: int  # images evaluated, all ranks
    seconds: float  # wall time of the evaluation loop (model loading excluded)
    images_per_s: float
    mode: str  # precision mode: "bf16-mixed", "16-mixed" or "32"
    skipped: tuple[str, ...] = ()  # "name: reason" of samples left out (this rank)
    per_image: tuple[ImageEval, ...] = field(default=(), repr=False)  # this rank's images, in order
    world_size: int = 1
    # The ground truth's words (all ranks) by what the records' target settings made of them: words
    # left out for size count as ground truth here but were never in the training targets.
    coverage: Coverage = Coverage()


def detect(prob: np.ndarray, inverse_matrix: np.ndarray, original_size: tuple[int, int],
           config: PostprocessConfig) -> list[Detection]:
    """Boxes of one (S, S) probability map, in original-image coordinates."""
    (offset_x, offset_y), (width, height) = valid_region(inverse_matrix, original_size)
    # The map from the offset on has the image at its top-left; boxes_from_prob zeroes the rest.
    found = boxes_from_prob(prob[offset_y:, offset_x:], config, valid=(width, height))
    shift = np.array([offset_x, offset_y], dtype=np.float64)
    mapped = map_polygons([d.polygon + shift for d in found], inverse_matrix)
    return [Detection(polygon=polygon, score=d.score) for polygon, d in zip(mapped, found)]


def probability_maps(model: torch.nn.Module, images: torch.Tensor, device: torch.device, precision: str) -> np.ndarray:
    """(N, S, S) float32 probabilities for (N, S, S, 3) uint8 images."""
    with torch.inference_mode():
        pixels = normalize(images.to(device, non_blocking=True))
        with autocast(device, precision):
            logits = model(pixels)["prob_logits"]
        prob = torch.sigmoid(logits[:, 0].float())
        # Synchronization point: the CPU waits here for the GPU to finish this batch.
        return prob.cpu().numpy()


def evaluate_batches(model: torch.nn.Module, batches: Iterable[tuple[torch.Tensor, Sequence[SampleInfo]]],
                     config: PostprocessConfig, precision: str, device: torch.device,
                     progress: EvalProgress | None = None, total: int = 0) -> tuple[DetectionMetric, list[ImageEval]]:
    """Run the model over (images, truths) batches and match every image; this rank's counts."""
    model.eval()
    metric = DetectionMetric()
    per_image: list[ImageEval] = []
    for images, truths in batches:
        prob = probability_maps(model, images, device, precision)
        for sample_prob, truth in zip(prob, truths):
            detections = detect(sample_prob, truth.inverse_matrix, truth.original_size, config)
            counts = metric.update(truth.polygons, truth.dont_care, [d.polygon for d in detections])
            per_image.append(ImageEval(truth.name, len(detections), counts.matched, counts.gt_care, counts.det_care,
                                       Coverage.from_codes(truth.left_out)))
        if progress is not None:
            progress(metric.images, total)
    return metric, per_image


def reduce_metric(metric: DetectionMetric, runtime: Runtime) -> DetectionMetric:
    """Sum the counts of all ranks (every rank must call this)."""
    if not runtime.distributed:
        return metric
    counts = torch.tensor(metric.counts(), dtype=torch.int64, device=runtime.device)
    dist.all_reduce(counts)
    # Synchronization point: .tolist() waits for the all-reduce.
    return DetectionMetric.from_counts(*counts.tolist(), iou_threshold=metric.iou_threshold,
                                       area_precision_threshold=metric.area_precision_threshold)


def _result(metric: DetectionMetric, runtime: Runtime, started: float, precision: str, skipped: list[str],
            per_image: list[ImageEval]) -> EvalResult:
    total = reduce_metric(metric, runtime)
    seconds = time.perf_counter() - started
    return EvalResult(score=total.score(), images=total.images, seconds=seconds,
                      images_per_s=total.images / seconds if seconds > 0 else 0.0, mode=precision,
                      skipped=tuple(skipped), per_image=tuple(per_image), world_size=runtime.world_size,
                      coverage=reduce_coverage(sum((i.coverage for i in per_image), Coverage()), runtime))


def reduce_coverage(coverage: Coverage, runtime: Runtime) -> Coverage:
    """Sum the word coverage of all ranks (every rank must call this)."""
    if not runtime.distributed:
        return coverage
    counts = torch.tensor(list(coverage.as_dict().values()), dtype=torch.int64, device=runtime.device)
    dist.all_reduce(counts)
    return Coverage(*counts.tolist())


def evaluate_shards(checkpoint: str | Path, shards: str | Path, config: Config | None = None,
                    precision: str = "auto", batch_size: int = 8, workers: int = 2, device: str = "auto",
                    progress: EvalProgress | None = None) -> EvalResult:
    """P/R/H of ``checkpoint`` on a shard folder or URL. ``config`` (default: the checkpoint's)
    supplies post-processing and the loader's verify/on_error settings."""
    check_precision(precision)
    runtime = start_runtime(device)
    precision = resolve_precision(precision, runtime.device)
    try:
        model, stored = load_model(checkpoint, runtime.device)
        config = config or stored
        stream = ShardStream(shards, batch_size, train=False, verify=config.loader.verify_hashes,
                             on_error=config.loader.on_error, rank=runtime.rank, world_size=runtime.world_size)
        total = sum(len(plan.samples) for plan in stream.plans())
        skipped: list[str] = []

        def batches() -> Iterator[tuple[torch.Tensor, list[Any]]]:
            for batch in make_loader(stream, workers, mode=config.loader.mode):
                skipped.extend(f"{shard} [{key}]: {reason}" for shard, key, reason in batch.skipped)
                if len(batch):
                    yield batch.images, batch.info

        started = time.perf_counter()
        metric, per_image = evaluate_batches(model, batches(), config.postprocess, precision, runtime.device,
                                             progress, total)
        return _result(metric, runtime, started, precision, skipped, per_image)
    finally:
        stop_runtime(runtime)


class _LiveSamples(torch.utils.data.Dataset):
    """The live path per sample: (uint8 image, truth) or (None, "name: reason") for a bad sample."""

    def __init__(self, samples: list[SourceSample], config: Config):
        self.samples = samples
        self.config = config

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[np.ndarray | None, SampleInfo | str]:
        try:
            processed = process_sample(self.samples[index], self.config)
        except SampleError as exc:
            return None, str(exc)
        meta = processed.meta
        truth = SampleInfo(record_key(processed.index, meta.name), meta.name, meta.original_size, meta.inverse_matrix,
                           list(meta.polygons_original), np.asarray(meta.dont_care, dtype=bool),
                           np.asarray(meta.left_out, dtype=np.uint8))
        return processed.image, truth


def _as_is(item: Any) -> Any:
    return item


def _batched_live(dataset: _LiveSamples, batch_size: int, workers: int,
                  skipped: list[str]) -> Iterator[tuple[torch.Tensor, list[SampleInfo]]]:
    """Batches of consecutive good samples (bad ones left out first, as the shard build does)."""
    extra: dict[str, Any] = {"multiprocessing_context": "fork"} if workers > 0 and os.name == "posix" else {}
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers, collate_fn=_as_is, **extra)
    images: list[np.ndarray] = []
    truths: list[SampleInfo] = []
    for image, truth in loader:
        if image is None:
            skipped.append(truth)
            continue
        images.append(image)
        truths.append(truth)
        if len(images) == batch_size:
            yield torch.from_numpy(np.stack(images)), truths
            images, truths = [], []
    if images:
        yield torch.from_numpy(np.stack(images)), truths


def evaluate_source(checkpoint: str | Path, source_dir: str | Path, split: str, config: Config | None = None,
                    precision: str = "auto", batch_size: int = 8, workers: int = 2, device: str = "auto",
                    progress: EvalProgress | None = None) -> EvalResult:
    """P/R/H of ``checkpoint`` on a source split through the live path (no shards). ``config``
    (default: the checkpoint's) supplies the source, transform and post-processing settings."""
    check_precision(precision)
    runtime = start_runtime(device)
    precision = resolve_precision(precision, runtime.device)
    try:
        model, stored = load_model(checkpoint, runtime.device)
        config = config or stored
        listing = list_source(source_dir, split, config.source)
        skipped = [f"{reject.name}: {reject.reason}" for reject in listing.rejects] if runtime.is_main else []
        mine = listing.samples[runtime.rank :: runtime.world_size]
        started = time.perf_counter()
        metric, per_image = evaluate_batches(
            model, _batched_live(_LiveSamples(mine, config), batch_size, workers, skipped), config.postprocess,
            precision, runtime.device, progress, len(mine))
        return _result(metric, runtime, started, precision, skipped, per_image)
    finally:
        stop_runtime(runtime)
