"""CLEval (Baek et al., 2020), detection only, through the ``cleval`` package (the optional extra
``pip install 'wds-ocr[cleval]'``).

CLEval scores characters rather than boxes: each ground-truth word is cut into as many pseudo
characters as its transcription has (their centres evenly spaced along the box), a detection
earns the characters whose centres it contains once it is matched (one-to-one, one-to-many or
many-to-one, with an area-precision constraint), splits and merges cost a granularity penalty,
and an unmatched detection counts as false-positive characters estimated from its aspect ratio.
Over a dataset the character counts are summed and precision/recall computed once from the sums,
as the package's own ``CLEvalMetric`` does:

    recall    = max(0, tp_recall - gran_recall) / char_gt
    precision = max(0, tp_precision - gran_precision) / char_det

This module calls the package's per-image ``evaluation`` with end-to-end scoring off (there are no
recognized transcriptions; the package's own ``CLEvalMetric.update`` cannot score detections
without transcriptions against transcribed ground truth: it then turns end-to-end scoring on and
fails on the missing texts) and keeps the per-image counts as plain numbers, so they add up the same
in any order and all-reduce across ranks. The package imports torch (for its torchmetrics
wrapper), so it is imported only when CLEval is asked for.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import astuple, dataclass, fields

import numpy as np

from wds_ocr.errors import ConfigError
from wds_ocr.eval.postprocess import min_area_quad

INSTALL_HINT = "pip install 'wds-ocr[cleval]' (or pip install cleval)"


@dataclass(frozen=True)
class CLEvalOptions:
    """The package's settings (its defaults); only detection is scored."""

    recall_granularity_penalty: float = 1.0
    precision_granularity_penalty: float = 1.0
    vertical_aspect_ratio_thresh: float = 0.5
    area_precision_constraint: float = 0.3


class _PackageOptions:
    """The attribute names ``cleval.eval_functions.evaluation`` reads."""

    def __init__(self, options: CLEvalOptions):
        self.DUMP_SAMPLE_RESULT = False
        self.E2E = False
        self.ORIENTATION = False
        self.CASE_SENSITIVE = True
        self.RECALL_GRANULARITY_PENALTY_WEIGHT = options.recall_granularity_penalty
        self.PRECISION_GRANULARITY_PENALTY_WEIGHT = options.precision_granularity_penalty
        self.VERTICAL_ASPECT_RATIO_THRESH = options.vertical_aspect_ratio_thresh
        self.AREA_PRECISION_CONSTRAINT = options.area_precision_constraint


@dataclass(frozen=True)
class CLEvalCounts:
    """One image's (or a sum of images') character counts."""

    char_gt: int = 0  # characters of the cared-for ground truth
    char_det: int = 0  # characters the detections claim, false positives included
    tp_recall: int = 0
    gran_recall: float = 0.0
    tp_precision: int = 0
    gran_precision: float = 0.0
    char_fp: int = 0
    splits: int = 0
    merges: int = 0
    overlapped: int = 0

    def __add__(self, other: "CLEvalCounts") -> "CLEvalCounts":
        return CLEvalCounts(*(a + b for a, b in zip(astuple(self), astuple(other))))

    def as_list(self) -> list[float]:
        return list(astuple(self))

    @classmethod
    def from_list(cls, values: Sequence[float]) -> "CLEvalCounts":
        kinds = [f.type for f in fields(cls)]
        if len(values) != len(kinds):
            raise ValueError(f"CLEval counts need {len(kinds)} numbers, got {len(values)}")
        return cls(*(float(v) if kind in (float, "float") else int(round(v)) for v, kind in zip(values, kinds)))

    def score(self) -> "CLEvalScore":
        recall = max(0.0, self.tp_recall - self.gran_recall) / self.char_gt if self.char_gt else 0.0
        precision = max(0.0, self.tp_precision - self.gran_precision) / self.char_det if self.char_det else 0.0
        total = precision + recall
        hmean = 2.0 * precision * recall / total if total else 0.0
        return CLEvalScore(precision, recall, hmean, self)


@dataclass(frozen=True)
class CLEvalScore:
    precision: float
    recall: float
    hmean: float
    counts: CLEvalCounts


def require_cleval() -> None:
    """Raise a ConfigError saying how to install the package where it is missing or broken."""
    try:
        import cleval.eval_functions  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any import failure means the metric cannot run
        raise ConfigError(f"--metric cleval needs the cleval package, which cannot be imported here "
                          f"({type(exc).__name__}: {exc}); install it with {INSTALL_HINT}") from None


def _box(points: np.ndarray, is_dont_care: bool, transcription: str):
    """The package's QUAD for a polygon; one with other than four points is replaced by its
    minimum-area rectangle (the package's POLY type lacks attributes its own evaluation reads in
    cleval 0.1.1, so it cannot be used)."""
    from cleval.box_types import QUAD

    array = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    if len(array) != 4:
        array = min_area_quad(array)
    return QUAD([float(v) for v in array.reshape(-1)], confidence=0.0, transcription=transcription,
                is_dc=is_dont_care)


def cleval_image(gt_polygons: Sequence[np.ndarray], gt_dont_care: Sequence[bool], gt_texts: Sequence[str],
                 det_polygons: Sequence[np.ndarray], options: CLEvalOptions = CLEvalOptions()) -> CLEvalCounts:
    """Score one image's detections against its ground truth (word polygons, don't-care flags and
    transcriptions, which set each word's character count)."""
    from cleval.eval_functions import evaluation

    if not len(gt_polygons) == len(gt_dont_care) == len(gt_texts):
        raise ValueError(f"{len(gt_polygons)} ground-truth polygons, {len(gt_dont_care)} don't-care flags and "
                         f"{len(gt_texts)} transcriptions: they must pair up")
    gt_boxes = [_box(p, bool(dc), str(text)) for p, dc, text in zip(gt_polygons, gt_dont_care, gt_texts)]
    det_boxes = [_box(p, False, "") for p in det_polygons]
    stats = evaluation(_PackageOptions(options), gt_boxes, det_boxes).stats
    det = stats.det
    return CLEvalCounts(int(det.num_char_gt), int(det.num_char_det), int(det.num_char_tp_recall),
                        float(det.gran_score_recall), int(det.num_char_tp_precision), float(det.gran_score_precision),
                        int(det.num_char_fp), int(stats.num_splitted), int(stats.num_merged),
                        int(stats.num_char_overlapped))
