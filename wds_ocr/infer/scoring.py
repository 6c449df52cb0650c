"""One image's evaluation on the CPU: its map -> boxes in the original image -> matched counts.

This is the work that post-processing workers do, and what the main process does itself with
``post_workers=0``: the same function on the same bits, so the two give identical results. It
imports no torch (worker processes start in a fraction of a second and stay small).

*Map forms.* A probability map leaves the device in the smallest form that keeps the results
identical (``MapForm``):

- ``"float32"``: the probabilities themselves (precision "32": the logits are float32, and any
  narrower copy of the probabilities would change box scores near ``box_thresh``);
- ``"logits16"``: under bf16/fp16 autocast the model's logits are 16-bit, so the probability of a
  pixel is a function of 16 bits: the map travels as those bits (half the bytes) and
  ``probability = table[bits]``, where the 65,536-entry table was computed once by the device's
  own float32 sigmoid of every 16-bit value. That is bit-for-bit what the device would have sent.

*Regions.* Only the sample's valid (resized, unpadded) region of the map is post-processed, found
from its inverse matrix and original size; boxes found there are shifted by the padding offset
and mapped to the original image with the inverse matrix (mode ``wds``), or scaled to the
original size and rounded as MhLiao/DB does (mode ``db``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from wds_ocr.config import PostprocessConfig
from wds_ocr.data.geometry import valid_region
from wds_ocr.eval.cleval import CLEvalCounts, cleval_image
from wds_ocr.eval.metric import match_image
from wds_ocr.eval.postprocess import Detection, boxes_from_prob, map_polygons

MAP_FORMS = ("float32", "logits16")
MAP_DTYPES = {"float32": np.dtype("<f4"), "logits16": np.dtype("<u2")}
LUT_SIZE = 1 << 16
METRICS = ("iou", "cleval")


@dataclass(frozen=True, eq=False)
class MapForm:
    """How maps travel from the device: ``kind`` in MAP_FORMS; ``table`` (65,536 float32) for logits16."""

    kind: str = "float32"
    table: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.kind not in MAP_FORMS:
            raise ValueError(f"map form must be one of {', '.join(MAP_FORMS)}, got {self.kind!r}")
        if (self.kind == "logits16") != (self.table is not None):
            raise ValueError("a logits16 map form needs its sigmoid table, a float32 one none")
        if self.table is not None and (self.table.dtype != np.float32 or self.table.shape != (LUT_SIZE,)):
            raise ValueError(f"the sigmoid table must be {LUT_SIZE} float32 values, got {self.table.dtype} "
                             f"{self.table.shape}")

    @property
    def dtype(self) -> np.dtype:
        return MAP_DTYPES[self.kind]

    def probabilities(self, raw: np.ndarray, offset: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
        """The float32 probabilities of the ``size = (width, height)`` region at ``offset`` of a raw map."""
        (x, y), (width, height) = offset, size
        region = raw[y : y + height, x : x + width]
        if self.table is None:
            return region
        return self.table[region]


@dataclass(frozen=True, eq=False)
class ImageTruth:
    """What scoring one image needs, in the original image's frame."""

    name: str
    original_size: tuple[int, int]  # (width, height)
    inverse_matrix: np.ndarray  # (3, 3) transformed -> original
    polygons: tuple[np.ndarray, ...]  # ground-truth word polygons, original frame
    dont_care: np.ndarray  # (P,) bool
    left_out: np.ndarray  # (P,) uint8 LeftOut codes
    texts: tuple[str, ...] | None = None  # transcriptions (CLEval needs them)


@dataclass(frozen=True)
class ImageOutcome:
    """One image's result; times are seconds spent in this image's post-processing and matching."""

    detections: int
    matched: int
    gt_care: int
    det_care: int
    cleval: CLEvalCounts | None
    postprocess_s: float
    matching_s: float
    # (matched, gt_care, det_care) under each of ``ScoringSettings.alternatives``, in order
    alternatives: tuple[tuple[int, int, int], ...] = ()


# Post-processing settings one evaluation may score besides its own (each costs a post-processing
# and a matching pass per image: ~15 ms for a receipt at 1600 px on one CPU core).
MAX_ALTERNATIVES = 256


@dataclass(frozen=True)
class ScoringSettings:
    postprocess: PostprocessConfig
    metric: str = "iou"
    # Other post-processing settings to score the same maps with (``evaluate --sweep``), IoU only.
    alternatives: tuple[PostprocessConfig, ...] = ()

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ValueError(f"metric must be one of {', '.join(METRICS)}, got {self.metric!r}")
        if len(self.alternatives) > MAX_ALTERNATIVES:
            raise ValueError(f"at most {MAX_ALTERNATIVES} post-processing alternatives, got {len(self.alternatives)}")


def detect_region(prob: np.ndarray, offset: tuple[int, int], inverse_matrix: np.ndarray,
                  original_size: tuple[int, int], config: PostprocessConfig) -> list[Detection]:
    """Boxes in original-image coordinates from the probabilities of a sample's valid region."""
    if config.mode == "db":
        return boxes_from_prob(prob, config, dest=original_size)
    found = boxes_from_prob(prob, config)
    shift = np.array(offset, dtype=np.float64)
    mapped = map_polygons([d.polygon + shift for d in found], inverse_matrix)
    for polygon in mapped:
        polygon.setflags(write=False)
    return [Detection(polygon=polygon, score=d.score) for polygon, d in zip(mapped, found)]


def detect(prob: np.ndarray, inverse_matrix: np.ndarray, original_size: tuple[int, int],
           config: PostprocessConfig) -> list[Detection]:
    """Boxes of one whole (S, S) float32 probability map, in original-image coordinates."""
    offset, size = valid_region(inverse_matrix, original_size)
    (x, y), (width, height) = offset, size
    return detect_region(np.asarray(prob)[y : y + height, x : x + width], offset, inverse_matrix, original_size,
                         config)


def score_image(raw: np.ndarray, form: MapForm, truth: ImageTruth, settings: ScoringSettings) -> ImageOutcome:
    """Post-process one raw map (in ``form``) and match its boxes against ``truth``."""
    started = time.perf_counter()
    offset, size = valid_region(truth.inverse_matrix, truth.original_size)
    prob = form.probabilities(raw, offset, size)
    detections = detect_region(prob, offset, truth.inverse_matrix, truth.original_size, settings.postprocess)
    polygons = [d.polygon for d in detections]
    matching = time.perf_counter()
    counts = match_image(truth.polygons, truth.dont_care, polygons)
    cleval = None
    if settings.metric == "cleval":
        if truth.texts is None:
            raise ValueError(f"{truth.name}: CLEval needs the ground truth's transcriptions, and none came with it")
        cleval = cleval_image(truth.polygons, truth.dont_care, truth.texts, polygons)
    alternatives = []
    for config in settings.alternatives:
        found = detect_region(prob, offset, truth.inverse_matrix, truth.original_size, config)
        other = match_image(truth.polygons, truth.dont_care, [d.polygon for d in found])
        alternatives.append((other.matched, other.gt_care, other.det_care))
    done = time.perf_counter()
    return ImageOutcome(len(detections), counts.matched, counts.gt_care, counts.det_care, cleval,
                        matching - started, done - matching, tuple(alternatives))


def truth_arrays(polygons: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Polygons as (all vertices float64 (V, 2), vertices per polygon int32 (P,))."""
    if not polygons:
        return np.zeros((0, 2), dtype=np.float64), np.zeros(0, dtype=np.int32)
    sizes = np.array([len(p) for p in polygons], dtype=np.int32)
    return np.concatenate([np.asarray(p, dtype=np.float64).reshape(-1, 2) for p in polygons]), sizes


def split_polygons(points: np.ndarray, sizes: np.ndarray) -> tuple[np.ndarray, ...]:
    bounds = np.cumsum(sizes)[:-1] if len(sizes) else []
    return tuple(np.split(points, bounds)) if len(sizes) else ()
