"""Evaluate a checkpoint: probability maps -> boxes in the original image -> ICDAR 2015 P/R/H.

Two inputs, one computation:

* ``evaluate_shards`` streams records (uint8 image + everything evaluation needs) from shards;
* ``evaluate_source`` runs the live path (``process_sample``) on the source images.

Both hand the same uint8 images, in the same order and batch composition, to the detection core
(``infer.detect.run_detection``: forward under autocast on the device, maps to a pool of
post-processing workers or the main process, boxes cut to each sample's valid region and mapped to
the original image, matched against the original-frame polygons and don't-care flags). Shards
being bit-identical to the live path, the two give identical precision, recall and H-mean. Under
DDP (torchrun) each rank takes every world-th sample and the counts are all-reduced;
``per_image`` and ``times`` then describe this rank.

A command opens its checkpoint once and passes the ``Checkpoint`` in (a path works too).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wds_ocr.config import Config, LoaderConfig, PostprocessConfig
from wds_ocr.data.coverage import Coverage
from wds_ocr.data.pipeline import process_sample
from wds_ocr.data.sources import SourceSample, list_source
from wds_ocr.errors import SampleError
from wds_ocr.eval.cleval import CLEvalScore
from wds_ocr.eval.metric import DetectionScore
from wds_ocr.infer.detect import (DetectionRun, EvalProgress, EvalTimes, ImageEval, ImageTruth, detect,
                                  reduce_cleval, reduce_coverage, reduce_metric, resolve_post_workers, run_detection,
                                  truth_from_info)
from wds_ocr.loader.batch import info_from_meta
from wds_ocr.loader.loaders import make_loader
from wds_ocr.loader.stream import ShardStream
from wds_ocr.run.checkpoint import Checkpoint, open_checkpoint
from wds_ocr.run.runtime import Runtime, check_precision, resolve_precision, start_runtime, stop_runtime

__all__ = ["EvalResult", "ImageEval", "LiveSamples", "detect", "evaluate_shards", "evaluate_source", "live_batches",
           "postprocess_grid"]


@dataclass(frozen=True)
class EvalResult:
    score: DetectionScore  # ICDAR 2015 IoU, over all ranks
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
    times: EvalTimes = EvalTimes()  # this rank's time breakdown
    cleval: CLEvalScore | None = None  # with metric "cleval", over all ranks
    postprocess_mode: str = "wds"
    # ``sweep``: each other post-processing setting with its IoU score on the same maps, all ranks
    sweep: tuple[tuple[PostprocessConfig, DetectionScore], ...] = field(default=(), repr=False)


def _result(run: DetectionRun, runtime: Runtime, precision: str, skipped: list[str], config: Config) -> EvalResult:
    """Reduce this rank's run over all ranks (every rank must call this)."""
    total = reduce_metric(run.metric, runtime)
    cleval = reduce_cleval(run.cleval, runtime)
    coverage = reduce_coverage(sum((i.coverage for i in run.per_image), Coverage()), runtime)
    sweep = tuple((settings, reduce_metric(metric, runtime).score()) for settings, metric in run.alternatives)
    seconds = run.times.total_s
    return EvalResult(score=total.score(), images=total.images, seconds=seconds,
                      images_per_s=total.images / seconds if seconds > 0 else 0.0, mode=precision,
                      skipped=tuple(skipped), per_image=tuple(run.per_image), world_size=runtime.world_size,
                      coverage=coverage, times=run.times, cleval=None if cleval is None else cleval.score(),
                      postprocess_mode=config.postprocess.mode, sweep=sweep)


def _run(model: torch.nn.Module, batches, config: Config, loader: LoaderConfig, precision: str, runtime: Runtime,
         metric: str, progress: EvalProgress | None, total: int, pool_options: dict[str, Any] | None,
         sweep: Sequence[PostprocessConfig]) -> DetectionRun:
    """The one detection driver both inputs go through, with the config's evaluation settings."""
    return run_detection(model, batches, config.postprocess, precision, runtime.device,
                         crop_to_content=config.evaluation.crop_to_content,
                         post_workers=resolve_post_workers(config.evaluation.post_workers, loader.workers, runtime),
                         metric=metric, capacity=loader.batch_size, progress=progress, total=total,
                         pool_options=pool_options, alternatives=sweep)


def _open_stream(location: str | Path, loader: LoaderConfig, runtime: Runtime) -> ShardStream:
    return ShardStream(location, loader, rank=runtime.rank, world_size=runtime.world_size)


def evaluate_shards(checkpoint: str | Path | Checkpoint, shards: str | Path, config: Config | None = None,
                    precision: str = "auto", batch_size: int | None = None, workers: int | None = None,
                    device: str = "auto", progress: EvalProgress | None = None, *, metric: str = "iou",
                    pool_options: dict[str, Any] | None = None,
                    sweep: Sequence[PostprocessConfig] = ()) -> EvalResult:
    """P/R/H of ``checkpoint`` (a path or an open ``Checkpoint``) on a shard folder or URL.

    ``config`` (default: the checkpoint's) supplies post-processing, ``evaluation.post_workers``
    and the loader settings; ``batch_size`` / ``workers`` (None: the config's) override its loader
    section. ``metric="cleval"`` adds CLEval to the IoU protocol. ``sweep``: other post-processing
    settings scored (IoU) on the same probability maps (``EvalResult.sweep``).
    """
    check_precision(precision)
    checkpoint = open_checkpoint(checkpoint)
    config = config or checkpoint.config
    loader = config.loader.changed(batch_size=batch_size, workers=workers)
    runtime = start_runtime(device)
    precision = resolve_precision(precision, runtime.device)
    try:
        model = checkpoint.model(runtime.device)
        stream = _open_stream(shards, loader, runtime)
        total = sum(len(plan.samples) for plan in stream.plans())
        skipped: list[str] = []

        def batches() -> Iterator[tuple[torch.Tensor, list[ImageTruth]]]:
            for batch in make_loader(stream):
                skipped.extend(f"{shard} [{key}]: {reason}" for shard, key, reason in batch.skipped)
                if len(batch):
                    yield batch.images, [truth_from_info(i, texts=metric == "cleval") for i in batch.info]

        run = _run(model, batches(), config, loader, precision, runtime, metric, progress, total, pool_options, sweep)
        return _result(run, runtime, precision, skipped, config)
    finally:
        stop_runtime(runtime)


class LiveSamples(torch.utils.data.Dataset):
    """The live path per sample: (uint8 image, truth) or (None, "name: reason") for a bad sample."""

    def __init__(self, samples: list[SourceSample], config: Config):
        self.samples = samples
        self.config = config

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[np.ndarray | None, ImageTruth | str]:
        try:
            processed = process_sample(self.samples[index], self.config)
        except SampleError as exc:
            return None, str(exc)
        return processed.image, truth_from_info(info_from_meta(processed.meta), texts=True)


def _as_is(item: Any) -> Any:
    return item


def live_batches(dataset: LiveSamples, batch_size: int, workers: int,
                 skipped: list[str]) -> Iterator[tuple[torch.Tensor, list[ImageTruth]]]:
    """Batches of consecutive good samples (bad ones left out first, as the shard build does)."""
    extra: dict[str, Any] = {"multiprocessing_context": "fork"} if workers > 0 and os.name == "posix" else {}
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers, collate_fn=_as_is, **extra)
    images: list[np.ndarray] = []
    truths: list[ImageTruth] = []
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


def evaluate_source(checkpoint: str | Path | Checkpoint, source_dir: str | Path, split: str,
                    config: Config | None = None, precision: str = "auto", batch_size: int | None = None,
                    workers: int | None = None, device: str = "auto", progress: EvalProgress | None = None, *,
                    metric: str = "iou", pool_options: dict[str, Any] | None = None,
                    sweep: Sequence[PostprocessConfig] = ()) -> EvalResult:
    """P/R/H of ``checkpoint`` on a source split through the live path (no shards). ``config``
    (default: the checkpoint's) supplies the source, transform and post-processing settings;
    ``sweep`` as in ``evaluate_shards``."""
    check_precision(precision)
    checkpoint = open_checkpoint(checkpoint)
    config = config or checkpoint.config
    loader = config.loader.changed(batch_size=batch_size, workers=workers)
    runtime = start_runtime(device)
    precision = resolve_precision(precision, runtime.device)
    try:
        model = checkpoint.model(runtime.device)
        listing = list_source(source_dir, split, config.source)
        skipped = [f"{reject.name}: {reject.reason}" for reject in listing.rejects] if runtime.is_main else []
        mine = listing.samples[runtime.rank :: runtime.world_size]
        batches = live_batches(LiveSamples(mine, config), loader.batch_size, loader.workers, skipped)
        run = _run(model, batches, config, loader, precision, runtime, metric, progress, len(mine), pool_options, sweep)
        return _result(run, runtime, precision, skipped, config)
    finally:
        stop_runtime(runtime)


# The post-processing fields ``evaluate --sweep`` can vary (``mode`` and ``max_candidates`` stay).
SWEEP_FIELDS = ("thresh", "box_thresh", "unclip_ratio", "min_size", "min_unclip", "glyph_height", "glyph_size")


def postprocess_grid(base: PostprocessConfig, specs: Sequence[str]) -> list[PostprocessConfig]:
    """Every combination of ``FIELD=V1,V2,..`` specs (``thresh=0.3,0.5 unclip_ratio=1.2,1.5``), the
    other fields as in ``base``. ValueError, naming the spec, for an unknown field, a value that is
    not a number or not valid for its field, a field given twice or more than MAX_ALTERNATIVES
    combinations."""
    from itertools import product

    from pydantic import ValidationError

    from wds_ocr.infer.scoring import MAX_ALTERNATIVES

    axes: dict[str, list[float]] = {}
    for spec in specs:
        name, sep, values = spec.partition("=")
        name = name.strip().removeprefix("postprocess.")
        if not sep or name not in SWEEP_FIELDS:
            raise ValueError(f"--sweep {spec!r}: expected FIELD=V1,V2,... with FIELD one of {', '.join(SWEEP_FIELDS)}")
        if name in axes:
            raise ValueError(f"--sweep {spec!r}: {name} is given twice")
        try:
            axes[name] = [float(v) for v in values.split(",") if v.strip()]
        except ValueError:
            raise ValueError(f"--sweep {spec!r}: the values must be numbers separated by commas") from None
        if not axes[name]:
            raise ValueError(f"--sweep {spec!r}: no values")
    count = 1
    for values in axes.values():
        count *= len(values)
    if count > MAX_ALTERNATIVES:
        raise ValueError(f"--sweep: {count} combinations; at most {MAX_ALTERNATIVES} (each costs a post-processing "
                         "and matching pass per image)")
    grid = []
    for combination in product(*axes.values()):
        changes = dict(zip(axes, combination))
        try:
            grid.append(PostprocessConfig.model_validate({**base.model_dump(), **changes}))
        except ValidationError as exc:
            error = exc.errors()[0]
            field_name = ".".join(str(part) for part in error["loc"])
            raise ValueError(f"--sweep: postprocess.{field_name}={changes.get(field_name)}: {error['msg']}") from None
    return grid
