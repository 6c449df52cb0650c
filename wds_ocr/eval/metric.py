"""ICDAR 2015 detection protocol (IoU), as the official script and MhLiao/DB's ``iou.py``.

Per image:

- A detection is *don't care* when the share of its own area that lies inside some don't-care
  ground-truth polygon exceeds ``area_precision_threshold``; it then counts neither way.
- Matching is one-to-one and greedy in (ground truth, detection) index order: a pair matches when
  its IoU exceeds ``iou_threshold`` and neither side is already matched or don't care.
- ``gt_care`` / ``det_care`` count the polygons that are not don't care.

Over a dataset the counts are summed and precision, recall and H-mean computed once from the sums
(not averaged over images): P = matched / det_care, R = matched / gt_care, H = 2PR / (P + R), each
0 where its denominator is 0.

Invalid polygons (the official script has no rule; DB's ``iou.py`` silently drops every polygon
that is not valid and simple): a self-intersecting polygon, e.g. a quad with two corners swapped,
is repaired with ``shapely.make_valid`` and its polygonal parts are kept. A polygon that still has
no area (collinear or repeated points, fewer than three points, non-finite coordinates) can never
be matched and is dropped from the counts, as DB does; its index is reported in
``ImageCounts.gt_dropped`` / ``det_dropped``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import shapely
from shapely.geometry import MultiPolygon, Polygon
from shapely.geometry.base import BaseGeometry


@dataclass(frozen=True)
class ImageCounts:
    """One image's outcome. Indices refer to positions in the inputs given to ``match_image``."""

    matched: int
    gt_care: int
    det_care: int
    pairs: tuple[tuple[int, int], ...] = ()  # (gt index, det index) of each match, in match order
    gt_dont_care: tuple[int, ...] = ()
    det_dont_care: tuple[int, ...] = ()
    gt_dropped: tuple[int, ...] = ()  # no area even after repair: not counted
    det_dropped: tuple[int, ...] = ()


@dataclass(frozen=True)
class DetectionScore:
    precision: float
    recall: float
    hmean: float
    matched: int
    gt_care: int
    det_care: int
    images: int


def match_image(
    gt_polygons: Sequence[np.ndarray],
    gt_dont_care: Sequence[bool],
    det_polygons: Sequence[np.ndarray],
    iou_threshold: float = 0.5,
    area_precision_threshold: float = 0.5,
) -> ImageCounts:
    """Match one image's detections to its ground truth (see the module docstring for the rules)."""
    thresholds = {"iou_threshold": iou_threshold, "area_precision_threshold": area_precision_threshold}
    for name, value in thresholds.items():
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must lie in [0, 1], got {value!r}")
    if len(gt_polygons) != len(gt_dont_care):
        raise ValueError(
            f"{len(gt_polygons)} ground-truth polygons but {len(gt_dont_care)} don't-care flags"
        )
    gt_index, gt_shapes, gt_dropped = _usable_geometries(gt_polygons)
    det_index, det_shapes, det_dropped = _usable_geometries(det_polygons)
    gt_ignored = np.array([bool(gt_dont_care[i]) for i in gt_index], dtype=bool)
    det_ignored = np.zeros(len(det_shapes), dtype=bool)

    intersections = _intersection_areas(gt_shapes, det_shapes)
    gt_areas = shapely.area(gt_shapes)
    det_areas = shapely.area(det_shapes)

    if gt_ignored.any() and len(det_shapes):
        inside_share = intersections[gt_ignored] / det_areas[np.newaxis, :]
        det_ignored = (inside_share > area_precision_threshold).any(axis=0)

    pairs: list[tuple[int, int]] = []
    if len(gt_shapes) and len(det_shapes):
        unions = gt_areas[:, np.newaxis] + det_areas[np.newaxis, :] - intersections
        iou = intersections / unions
        det_taken = det_ignored.copy()
        for g in np.flatnonzero(~gt_ignored):
            for d in range(len(det_shapes)):
                if not det_taken[d] and iou[g, d] > iou_threshold:
                    det_taken[d] = True
                    pairs.append((gt_index[g], det_index[d]))
                    break

    return ImageCounts(
        matched=len(pairs),
        gt_care=int((~gt_ignored).sum()),
        det_care=int((~det_ignored).sum()),
        pairs=tuple(pairs),
        gt_dont_care=tuple(gt_index[i] for i in np.flatnonzero(gt_ignored)),
        det_dont_care=tuple(det_index[i] for i in np.flatnonzero(det_ignored)),
        gt_dropped=gt_dropped,
        det_dropped=det_dropped,
    )


@dataclass
class DetectionMetric:
    """Sums per-image counts; ``score()`` turns the sums into precision, recall and H-mean.

    Ranks combine with ``merge`` (in one process) or by all-reducing ``counts()`` and rebuilding
    with ``from_counts``.
    """

    iou_threshold: float = 0.5
    area_precision_threshold: float = 0.5
    matched: int = 0
    gt_care: int = 0
    det_care: int = 0
    images: int = 0

    def update(
        self,
        gt_polygons: Sequence[np.ndarray],
        gt_dont_care: Sequence[bool],
        det_polygons: Sequence[np.ndarray],
    ) -> ImageCounts:
        """Match one image and add its counts."""
        result = match_image(
            gt_polygons,
            gt_dont_care,
            det_polygons,
            iou_threshold=self.iou_threshold,
            area_precision_threshold=self.area_precision_threshold,
        )
        self.matched += result.matched
        self.gt_care += result.gt_care
        self.det_care += result.det_care
        self.images += 1
        return result

    def merge(self, other: "DetectionMetric") -> None:
        """Add another accumulator's counts (made with the same thresholds) to this one."""
        if (other.iou_threshold, other.area_precision_threshold) != (
            self.iou_threshold,
            self.area_precision_threshold,
        ):
            raise ValueError(
                "cannot merge metrics with different thresholds: "
                f"iou {self.iou_threshold} vs {other.iou_threshold}, "
                f"area precision {self.area_precision_threshold} vs {other.area_precision_threshold}"
            )
        self.matched += other.matched
        self.gt_care += other.gt_care
        self.det_care += other.det_care
        self.images += other.images

    def counts(self) -> tuple[int, int, int, int]:
        """``(matched, gt_care, det_care, images)``: the sums to all-reduce across ranks."""
        return (self.matched, self.gt_care, self.det_care, self.images)

    @classmethod
    def from_counts(
        cls,
        matched: int,
        gt_care: int,
        det_care: int,
        images: int,
        *,
        iou_threshold: float = 0.5,
        area_precision_threshold: float = 0.5,
    ) -> "DetectionMetric":
        """Rebuild an accumulator from (for example all-reduced) ``counts()``."""
        values = {"matched": matched, "gt_care": gt_care, "det_care": det_care, "images": images}
        whole = {}
        for name, value in values.items():
            number = int(value)
            if number != value or number < 0:
                raise ValueError(f"{name} must be a non-negative whole number, got {value!r}")
            whole[name] = number
        if whole["matched"] > min(whole["gt_care"], whole["det_care"]):
            raise ValueError(
                f"matched ({whole['matched']}) cannot exceed gt_care ({whole['gt_care']}) "
                f"or det_care ({whole['det_care']})"
            )
        return cls(
            iou_threshold=iou_threshold,
            area_precision_threshold=area_precision_threshold,
            **whole,
        )

    def score(self) -> DetectionScore:
        precision = self.matched / self.det_care if self.det_care else 0.0
        recall = self.matched / self.gt_care if self.gt_care else 0.0
        total = precision + recall
        hmean = 2.0 * precision * recall / total if total else 0.0
        return DetectionScore(
            precision=precision,
            recall=recall,
            hmean=hmean,
            matched=self.matched,
            gt_care=self.gt_care,
            det_care=self.det_care,
            images=self.images,
        )


def _usable_geometries(
    polygons: Sequence[np.ndarray],
) -> tuple[list[int], np.ndarray, tuple[int, ...]]:
    """Shapely geometries of the polygons that have area: (their input indices, them, dropped indices)."""
    kept_index: list[int] = []
    kept: list[BaseGeometry] = []
    dropped: list[int] = []
    for index, points in enumerate(polygons):
        geometry = _to_geometry(points)
        if geometry is None:
            dropped.append(index)
        else:
            kept_index.append(index)
            kept.append(geometry)
    return kept_index, np.array(kept, dtype=object), tuple(dropped)


def _to_geometry(points: np.ndarray) -> BaseGeometry | None:
    """A valid (Multi)Polygon with positive area, or None where the points enclose no area."""
    array = np.asarray(points, dtype=np.float64)
    if array.ndim != 2 or array.shape[1] != 2 or len(array) < 3 or not np.isfinite(array).all():
        return None
    geometry: BaseGeometry = Polygon(array)
    if not geometry.is_valid:
        repaired = shapely.make_valid(geometry)
        parts = [
            part
            for part in shapely.get_parts(repaired)
            if isinstance(part, (Polygon, MultiPolygon)) and part.area > 0.0
        ]
        if not parts:
            return None
        geometry = shapely.union_all(parts)
    if geometry.area <= 0.0:
        return None
    return geometry


def _intersection_areas(gt_shapes: np.ndarray, det_shapes: np.ndarray) -> np.ndarray:
    """``(n_gt, n_det)`` intersection areas, computed only for pairs whose extents overlap."""
    areas = np.zeros((len(gt_shapes), len(det_shapes)), dtype=np.float64)
    if len(gt_shapes) == 0 or len(det_shapes) == 0:
        return areas
    gt_rows, det_cols = shapely.STRtree(det_shapes).query(gt_shapes, predicate="intersects")
    if len(gt_rows):
        areas[gt_rows, det_cols] = shapely.area(
            shapely.intersection(gt_shapes[gt_rows], det_shapes[det_cols])
        )
    return areas
