"""The detection core on the torch side: model -> probability maps -> boxes -> matched counts.

``evaluate`` (shards and live path), ``predict`` and training's validation all come here.
``run_detection`` is the evaluation pass, pipelined:

    main process:  [data k+1] [forward k+1 on the device] [maps k+1 -> ring] [data k+2] ...
    workers:                  [post-process + match batch k .................]

The forward pass of batch k+1 overlaps the post-processing and matching of batch k, which run in
``post_workers`` processes (``infer.postpool``) fed through a shared-memory ring; with
``post_workers=0`` the main process does that work itself after each forward. Both call the same
``scoring.score_image`` on the same bits (maps leave the device in ``scoring.MapForm``), and the
outcomes are kept in image order, so counts, scores and ``per_image`` are identical for any number
of workers and any batch size that gives the same maps. Under DDP each rank scores its own images
and the sums are all-reduced (``reduce_counts``).

Time breakdown (``EvalTimes``, this rank): data wait (blocked on the loader), device time of the
forward (CUDA events on CUDA, wall time elsewhere), device wait (blocked copying maps off the
device, which on CUDA includes waiting for the forward to finish), post-processing and matching
(summed over images, wherever they ran), result wait (blocked on the workers: no free ring
buffer, or the last results), worker start (seconds until every worker was up: they import while
the first batches load and run, and until one is up the main process scores the batches itself,
``inline_images``), total wall time and images/s.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from wds_ocr.config import PostprocessConfig
from wds_ocr.data.coverage import Coverage
from wds_ocr.eval.cleval import CLEvalCounts, require_cleval
from wds_ocr.eval.metric import DetectionMetric
from wds_ocr.infer.postpool import PostPool
from wds_ocr.infer.scoring import ImageOutcome, ImageTruth, MapForm, ScoringSettings, detect, score_image
from wds_ocr.data.geometry import valid_region
from wds_ocr.data.pipeline import IMAGENET, Normalization
from wds_ocr.loader.batch import SampleInfo
from wds_ocr.loader.device import normalize
from wds_ocr.model.dbnet import STRIDE, DBNet
from wds_ocr.run.runtime import Runtime, autocast, autocast_dtype, cpu_threads_beside, usable_cores

EvalProgress = Callable[[int, int], None]  # (images done on this rank, images this rank will do)
# Batches whose maps may be in the ring at once (one being filled, the others in work).
RING_GROUPS = 3
_LOGIT_DTYPES = (torch.bfloat16, torch.float16)

__all__ = ["DetectionRun", "EvalTimes", "ImageEval", "ImageTruth", "detect", "device_maps", "probability_maps",
           "reduce_cleval", "reduce_counts", "reduce_coverage", "reduce_metric", "resolve_post_workers",
           "run_detection", "truth_from_info"]


@dataclass(frozen=True)
class ImageEval:
    name: str
    detections: int
    matched: int
    gt_care: int
    det_care: int
    coverage: Coverage = Coverage()  # its ground-truth words: in the training targets, or left out and why
    cleval: CLEvalCounts | None = None  # with metric "cleval"


@dataclass(frozen=True)
class EvalTimes:
    """Where one evaluation pass's time went (seconds, this rank)."""

    data_wait_s: float = 0.0
    device_s: float = 0.0
    device_wait_s: float = 0.0
    postprocess_s: float = 0.0
    matching_s: float = 0.0
    result_wait_s: float = 0.0
    worker_start_s: float = 0.0  # until every worker was up (not a wait: see inline_images)
    inline_images: int = 0  # scored in the main process while no worker was up yet
    total_s: float = 0.0
    images: int = 0
    post_workers: int = 0
    device_timing: str = "wall"  # "cuda-events" on CUDA

    @property
    def images_per_s(self) -> float:
        return self.images / self.total_s if self.total_s > 0 else 0.0

    @property
    def device_busy(self) -> float:
        """Share of the wall time the device spent in the forward pass."""
        return self.device_s / self.total_s if self.total_s > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"data_wait_s": self.data_wait_s, "device_s": self.device_s, "device_wait_s": self.device_wait_s,
                "postprocess_s": self.postprocess_s, "matching_s": self.matching_s,
                "result_wait_s": self.result_wait_s, "worker_start_s": self.worker_start_s,
                "inline_images": self.inline_images,
                "total_s": self.total_s, "images": self.images,
                "images_per_s": self.images_per_s, "device_busy": self.device_busy,
                "post_workers": self.post_workers, "device_timing": self.device_timing}


@dataclass
class DetectionRun:
    """This rank's outcome of ``run_detection`` (reduce with ``reduce_counts`` under DDP)."""

    metric: DetectionMetric
    cleval: CLEvalCounts | None
    per_image: list[ImageEval] = field(repr=False)
    times: EvalTimes
    # (settings, counts) for each ``alternatives`` entry of ``run_detection``, in order
    alternatives: list[tuple[PostprocessConfig, DetectionMetric]] = field(default_factory=list)


def truth_from_info(info: SampleInfo, texts: bool = False) -> ImageTruth:
    """The ground truth of one image, from the loader's SampleInfo (a record's, or the live
    pipeline's: ``info_from_meta``); the only place an ImageTruth is made from a sample.
    ``texts``: carry the transcriptions (CLEval counts characters; the IoU metric needs none)."""
    return ImageTruth(info.name, (int(info.original_size[0]), int(info.original_size[1])),
                      np.asarray(info.inverse_matrix, dtype=np.float64), tuple(info.polygons),
                      np.asarray(info.dont_care, dtype=bool), np.asarray(info.left_out, dtype=np.uint8),
                      tuple(info.texts) if texts else None)


def resolve_post_workers(setting: int | None, loader_workers: int, runtime: Runtime | None = None) -> int:
    """``evaluation.post_workers``: a number as given; None: the cores this process may use (its
    share under torchrun) minus the loader's workers, at least 0 (the main process then does it)."""
    if setting is not None:
        return setting
    local_ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    return max(0, usable_cores() // local_ranks - loader_workers)


def model_normalization(model: torch.nn.Module) -> Normalization:
    """The input normalization of a DBNet, also inside a DDP or ``torch.compile`` wrapper."""
    while not isinstance(model, DBNet) and isinstance(getattr(model, "module", getattr(model, "_orig_mod", None)),
                                                       torch.nn.Module):
        model = getattr(model, "module", None) or model._orig_mod
    return getattr(model, "normalization", IMAGENET)


def device_maps(model: torch.nn.Module, images: torch.Tensor, device: torch.device, precision: str,
                sigmoid: bool = True) -> torch.Tensor:
    """(N, S, S) maps on the device in their transfer form: float32 probabilities, or the 16-bit
    logits' bits (as int16) under bf16/fp16 autocast (see ``scoring.MapForm``). ``sigmoid=False``
    leaves float32 logits as they are (the caller applies the sigmoid where the maps go)."""
    with torch.inference_mode():
        pixels = normalize(images.to(device, non_blocking=True), model_normalization(model))
        with autocast(device, precision):
            logits = model(pixels)["prob_logits"][:, 0]
        if logits.dtype in _LOGIT_DTYPES:
            return logits.contiguous().view(torch.int16)
        return torch.sigmoid(logits.float()) if sigmoid else logits.float()


def map_form(maps: torch.Tensor, logits_dtype: torch.dtype | None, device: torch.device) -> MapForm:
    """The MapForm of ``device_maps``' output; for 16-bit logits (of ``logits_dtype``, the autocast
    dtype) the table of the sigmoid of every 16-bit value, computed once by the device itself."""
    if maps.dtype == torch.float32:
        return MapForm("float32")
    with torch.inference_mode():
        patterns = torch.arange(1 << 16, dtype=torch.int32, device=device).to(torch.int16).view(logits_dtype)
        table = torch.sigmoid(patterns.float()).cpu().numpy()
    return MapForm("logits16", np.ascontiguousarray(table, dtype=np.float32))


def probability_maps(model: torch.nn.Module, images: torch.Tensor, device: torch.device, precision: str,
                     window: tuple[slice, slice] | None = None) -> np.ndarray:
    """(N, H, W) float32 probabilities for (N, H, W, 3) uint8 images: exactly what evaluation scores.
    ``window`` (a ``content_window``): the model runs on that part only; the maps are 0 elsewhere."""
    if window is not None:
        full = np.zeros(images.shape[:3], dtype=np.float32)
        full[:, window[0], window[1]] = probability_maps(model, images[:, window[0], window[1]], device, precision)
        return full
    maps = device_maps(model, images, device, precision)
    host = maps.cpu().numpy()  # synchronization point: the CPU waits for the device here
    if maps.dtype == torch.float32:
        return host
    form = map_form(maps, autocast_dtype(device, precision), device)
    return form.table[host.view(np.uint16)]


class _InlineScorer:
    """``post_workers=0``: the PostPool interface, scoring in this process as maps are submitted."""

    def __init__(self, settings: ScoringSettings):
        self.settings = settings
        self.outcomes: dict[int, ImageOutcome] = {}
        self.waited_s = 0.0
        self.start_wait_s = 0.0
        self.up_s = 0.0
        self.inline_images = 0
        self._buffer: np.ndarray | None = None
        self._form: MapForm | None = None

    def __enter__(self) -> "_InlineScorer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self._buffer = None

    def open_ring(self, form: MapForm, map_size: int, capacity: int) -> None:
        self._form = form
        self._buffer = np.empty((capacity, map_size, map_size), dtype=form.dtype)

    def acquire(self, count: int) -> tuple[int, np.ndarray]:
        if not 0 < count <= len(self._buffer):
            raise ValueError(f"a batch of {count} maps does not fit the buffer of {len(self._buffer)}")
        return 0, self._buffer[:count]

    def submit(self, group: int, truths: list[ImageTruth]) -> None:
        for row, truth in enumerate(truths):
            self.outcomes[len(self.outcomes)] = score_image(self._buffer[row], self._form, truth, self.settings)

    def poll(self) -> None:
        pass

    def finish(self) -> None:
        pass


def content_window(truths: Sequence[Any], side: int) -> tuple[slice, slice]:
    """(rows, columns) of a batch's (side x side) records that hold every image of the batch: the
    union of their valid regions, its start rounded down and its size up to multiples of STRIDE.
    ``truths``: anything with ``inverse_matrix`` and ``original_size`` (an ``ImageTruth``)."""
    regions = [valid_region(t.inverse_matrix, t.original_size) for t in truths]
    bounds = []
    for axis in (1, 0):  # rows (y), then columns (x)
        start = min(offset[axis] for offset, _ in regions) // STRIDE * STRIDE
        stop = max(offset[axis] + size[axis] for offset, size in regions)
        stop = min(side, start + -(-(stop - start) // STRIDE) * STRIDE)
        bounds.append(slice(start, stop))
    return bounds[0], bounds[1]


def run_detection(model: torch.nn.Module, batches: Iterable[tuple[torch.Tensor, Sequence[ImageTruth]]],
                  config: PostprocessConfig, precision: str, device: torch.device, *, post_workers: int = 0,
                  metric: str = "iou", capacity: int | None = None, progress: EvalProgress | None = None,
                  total: int = 0, pool_options: dict[str, Any] | None = None,
                  crop_to_content: bool = False,
                  alternatives: Sequence[PostprocessConfig] = ()) -> DetectionRun:
    """Run the model over (uint8 images, truths) batches and score every image (this rank's counts).

    ``capacity``: the largest batch (default: the first batch's size); ``pool_options``: the worker
    pool's deadlines (``start_timeout``, ``result_timeout``) and ``inline_start`` (False: wait for
    the workers instead of scoring in this process until one is up). ``crop_to_content``: run the
    model on each batch's ``content_window`` only (scoring reads nothing outside it).
    ``alternatives``: other post-processing settings, each scored (IoU) on the same maps.
    """
    settings = ScoringSettings(config, metric, tuple(alternatives))
    if metric == "cleval":
        require_cleval()
    model.eval()
    on_cuda = device.type == "cuda"
    events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
    data_wait = device_s = device_wait = 0.0
    truths_in_order: list[ImageTruth] = []
    scorer = PostPool(post_workers, settings, RING_GROUPS, **(pool_options or {})) if post_workers else \
        _InlineScorer(settings)
    started = time.perf_counter()
    with scorer, cpu_threads_beside(post_workers, device):
        iterator = iter(batches)
        opened = False
        while True:
            waiting = time.perf_counter()
            item = next(iterator, None)  # blocks until the loader has a batch: the data wait
            data_wait += time.perf_counter() - waiting
            if item is None:
                break
            images, truths = item
            if len(truths) == 0:
                continue
            forward = time.perf_counter()
            if on_cuda:
                begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                begin.record()
            # On a CPU device the float32 sigmoid is written straight into the ring (below): the
            # same kernel on the same logits, one pass over the maps instead of two.
            window = content_window(truths, int(images.shape[1])) if crop_to_content else (slice(None), slice(None))
            maps = device_maps(model, images[:, window[0], window[1]], device, precision,
                               sigmoid=device.type != "cpu")
            if on_cuda:
                end.record()
                events.append((begin, end))
            else:
                device_s += time.perf_counter() - forward
            logits_out = device.type == "cpu" and maps.dtype == torch.float32
            if not opened:
                form = map_form(maps, autocast_dtype(device, precision), device)
                scorer.open_ring(form, int(images.shape[1]), max(capacity or 0, len(truths)))
                opened = True
            group, host = scorer.acquire(len(truths))
            copying = time.perf_counter()
            # Synchronization point: the copy waits for the device to finish this batch's forward.
            target = torch.from_numpy(host.view(np.int16) if maps.dtype == torch.int16 else host)[:, window[0], window[1]]
            if logits_out:
                torch.sigmoid(maps, out=target)
            else:
                target.copy_(maps)
            device_wait += time.perf_counter() - copying
            scorer.submit(group, list(truths))
            truths_in_order.extend(truths)
            scorer.poll()
            if progress is not None:
                progress(len(scorer.outcomes), total)
        scorer.finish()
        outcomes = [scorer.outcomes[index] for index in range(len(truths_in_order))]
        result_wait = scorer.waited_s + scorer.start_wait_s
        worker_start, inline = scorer.up_s, scorer.inline_images
    seconds = time.perf_counter() - started
    if on_cuda and events:
        torch.cuda.synchronize(device)
        device_s = sum(begin.elapsed_time(end) for begin, end in events) / 1000.0
    if progress is not None:
        progress(len(outcomes), total)

    accumulator = DetectionMetric()
    cleval = CLEvalCounts() if metric == "cleval" else None
    per_image = []
    others = [DetectionMetric() for _ in alternatives]
    for truth, outcome in zip(truths_in_order, outcomes):
        for other, (matched, gt_care, det_care) in zip(others, outcome.alternatives):
            other.matched += matched
            other.gt_care += gt_care
            other.det_care += det_care
            other.images += 1
        accumulator.matched += outcome.matched
        accumulator.gt_care += outcome.gt_care
        accumulator.det_care += outcome.det_care
        accumulator.images += 1
        if cleval is not None:
            cleval = cleval + outcome.cleval
        per_image.append(ImageEval(truth.name, outcome.detections, outcome.matched, outcome.gt_care,
                                   outcome.det_care, Coverage.from_codes(truth.left_out), outcome.cleval))
    times = EvalTimes(data_wait, device_s, device_wait, sum(o.postprocess_s for o in outcomes),
                      sum(o.matching_s for o in outcomes), result_wait, worker_start, inline, seconds, len(outcomes),
                      post_workers,
                      "cuda-events" if on_cuda else "wall")
    return DetectionRun(accumulator, cleval, per_image, times, list(zip(alternatives, others)))


def reduce_counts(values: Sequence[float], runtime: Runtime, dtype: torch.dtype = torch.int64) -> list:
    """Sum ``values`` over all ranks (every rank must call this, with the same length)."""
    if not runtime.distributed:
        return list(values)
    tensor = torch.tensor(list(values), dtype=dtype, device=runtime.device)
    dist.all_reduce(tensor)
    return tensor.tolist()  # synchronization point: waits for the all-reduce


def reduce_metric(metric: DetectionMetric, runtime: Runtime) -> DetectionMetric:
    """The IoU counts of all ranks."""
    counts = reduce_counts(metric.counts(), runtime)
    return DetectionMetric.from_counts(*counts, iou_threshold=metric.iou_threshold,
                                       area_precision_threshold=metric.area_precision_threshold)


def reduce_cleval(counts: CLEvalCounts | None, runtime: Runtime) -> CLEvalCounts | None:
    """The CLEval counts of all ranks (float64: granularity penalties are fractional in general)."""
    if counts is None:
        return None
    return CLEvalCounts.from_list(reduce_counts(counts.as_list(), runtime, torch.float64))


def reduce_coverage(coverage: Coverage, runtime: Runtime) -> Coverage:
    """The word coverage of all ranks."""
    return Coverage(*reduce_counts(list(coverage.as_dict().values()), runtime))
