"""DB post-processing: one probability map -> scored quadrilaterals (MhLiao/DB ``boxes_from_bitmap``).

Steps, per connected region of ``prob > thresh``:

1. its contour (``cv2.findContours``, RETR_LIST + CHAIN_APPROX_SIMPLE; the first ``max_candidates``);
2. the minimum-area rectangle of the contour; dropped when its short side is below ``min_size``;
3. score = mean probability inside that rectangle; dropped when below ``box_thresh``;
4. unclip: the rectangle offset outwards by ``area * unclip_ratio / perimeter``, at least ``min_unclip`` (pyclipper, round
   joins), which undoes the shrink the training targets applied to the text polygons;
5. the minimum-area rectangle of the grown shape; dropped when its short side is below
   ``min_size + 2``; finally clipped to the image;
6. with ``glyph_height`` > 0, lone glyphs grow (``_grow_glyphs``): the image's text height is the
   median short side of its line boxes (long side more than twice the short), the text direction
   their mean orientation; a box whose long side is under ``glyph_size`` x that height and whose
   extent across the text direction is under ``glyph_height`` x that height is redrawn as the
   rectangle along the text direction that holds it, ``glyph_height`` x the text height high
   (centred). DB's unclip grows a box by about half its *narrow* side, so the few-pixel
   kernel of a "1" comes back too short as well as too narrow for its word.

Coordinates are in the map's pixel frame with cv2's convention: a pixel's (column, row) index is its
coordinate, so a region covering columns 30..89 yields a contour from x=30 to x=89.

Two modes (``postprocess.mode``) differ only in how steps 3-5 treat fractions of a pixel:

- ``wds`` (default): the score's mask is filled from the rectangle's corners *rounded* (cv2's
  corners carry float noise such as 29.99998, which truncation would turn into 29), unclip offsets
  the exact corners at 1/256 px, and the boxes keep their sub-pixel coordinates (the caller maps
  them to the original image with the sample's inverse matrix).
- ``db``: MhLiao/DB's SegDetectorRepresenter (boxes mode) exactly: float32 corners, the score's mask
  from corners *truncated* towards zero, unclip on the corners truncated to whole pixels (what
  pyclipper does with float input) at pyclipper's default arc tolerance, DB's tie rule when two
  corners share a coordinate, and the final corners scaled to ``dest`` (default: the map's own
  size) and rounded to whole pixels. Use it to compare with published DB numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import pyclipper
from shapely.geometry import Polygon

from wds_ocr.config import PostprocessConfig
from wds_ocr.data.geometry import apply_matrix

# pyclipper works on integers: coordinates are scaled by this factor so the offset keeps 1/256 px.
_CLIPPER_SCALE = 256.0
# Largest distance (in pixels) between a round join's true arc and its polygon approximation.
_ARC_TOLERANCE_PX = 0.25


@dataclass(frozen=True, eq=False)
class Detection:
    """One detected text box: four corners clockwise from the top-left, and its mean probability."""

    polygon: np.ndarray  # (4, 2) float64, read-only
    score: float


def boxes_from_prob(
    prob: np.ndarray,
    config: PostprocessConfig,
    valid: tuple[int, int] | None = None,
    dest: tuple[int, int] | None = None,
) -> list[Detection]:
    """Scored boxes from one ``(H, W)`` probability map.

    ``valid=(width, height)`` says only the top-left ``width x height`` part of the map is image and
    the rest is padding: the map is cut to that part (a view, nothing is copied), so padding never
    yields a box nor lowers a score, and boxes are clipped to it. ``dest=(width, height)`` (mode
    ``db`` only) is DB's ``dest_width, dest_height``: the size the corners are scaled to before
    they are rounded (default: the valid size, i.e. rounded in the map's frame).
    """
    prob = np.asarray(prob)
    if prob.ndim != 2:
        raise ValueError(f"prob must be a 2-D (H, W) map, got shape {prob.shape}")
    if prob.dtype != np.float32:
        prob = prob.astype(np.float32)
    height, width = prob.shape
    if valid is not None:
        valid_width, valid_height = int(valid[0]), int(valid[1])
        if not (0 <= valid_width <= width and 0 <= valid_height <= height):
            raise ValueError(
                f"valid region {valid} does not fit a map of width {width}, height {height}"
            )
        prob = prob[:valid_height, :valid_width]
        width, height = valid_width, valid_height
    if dest is not None and config.mode != "db":
        raise ValueError("dest applies to postprocess.mode 'db' only (mode 'wds' keeps sub-pixel corners)")
    if width == 0 or height == 0:
        return []

    bitmap = (prob > config.thresh).astype(np.uint8)
    contours, _ = cv2.findContours(bitmap, cv2.RETR_LIST, cv2.CHAIN_APPROX_SIMPLE)
    if config.mode == "db":
        return _db_boxes(prob, contours, config, dest or (width, height))

    detections = []
    for contour in contours[: config.max_candidates]:
        box, short_side = _min_area_box(contour.reshape(-1, 2))
        if short_side < config.min_size:
            continue
        score = _mean_inside(prob, box)
        if score < config.box_thresh:
            continue
        grown = _unclip(box, config.unclip_ratio, config.min_unclip)
        if grown is None:
            continue
        box, short_side = _min_area_box(grown)
        if short_side < config.min_size + 2:
            continue
        box[:, 0] = np.clip(box[:, 0], 0.0, float(width))
        box[:, 1] = np.clip(box[:, 1], 0.0, float(height))
        box.setflags(write=False)
        detections.append(Detection(polygon=box, score=score))
    if config.glyph_height > 0:
        detections = _grow_glyphs(detections, config, width, height)
    return detections


# Boxes at least this many times as long as high are text lines; this many make a text height.
_LINE_ASPECT = 2.0
_MIN_LINES = 3


def _edges(polygon: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A closed polygon's edge vectors and their lengths."""
    edges = np.diff(np.vstack([polygon, polygon[:1]]), axis=0)
    return edges, np.linalg.norm(edges, axis=1)


def _grow_glyphs(detections: list[Detection], config: PostprocessConfig, width: int, height: int) -> list[Detection]:
    """Step 6 of the module docstring: lone glyphs' boxes grown to the image's text height."""
    sides, doubled = [], []
    for detection in detections:
        edges, lengths = _edges(detection.polygon)
        longest = int(np.argmax(lengths))
        if lengths.min() > 0 and lengths[longest] > _LINE_ASPECT * lengths.min():
            angle = float(np.arctan2(edges[longest, 1], edges[longest, 0]))
            sides.append(float(lengths.min()))
            doubled.append((np.cos(2 * angle), np.sin(2 * angle)))
    if len(sides) < _MIN_LINES:
        return detections
    text_height = float(np.median(sides))
    cos2, sin2 = np.mean(doubled, axis=0)
    angle = 0.5 * float(np.arctan2(sin2, cos2))
    along = np.array([np.cos(angle), np.sin(angle)])
    across = np.array([-along[1], along[0]])
    grown = []
    for detection in detections:
        polygon = detection.polygon
        if _edges(polygon)[1].max() >= config.glyph_size * text_height:
            grown.append(detection)
            continue
        u, v = polygon @ along, polygon @ across
        if v.max() - v.min() >= config.glyph_height * text_height:
            grown.append(detection)
            continue
        centre, half = 0.5 * (v.min() + v.max()), 0.5 * config.glyph_height * text_height
        ends = ((u.min(), centre - half), (u.max(), centre - half), (u.max(), centre + half), (u.min(), centre + half))
        corners = np.array([a * along + b * across for a, b in ends])
        box = _order_clockwise(corners)
        box[:, 0] = np.clip(box[:, 0], 0.0, float(width))
        box[:, 1] = np.clip(box[:, 1], 0.0, float(height))
        box.setflags(write=False)
        grown.append(Detection(polygon=box, score=detection.score))
    return grown


def map_polygons(polygons: list[np.ndarray], matrix: np.ndarray) -> list[np.ndarray]:
    """Apply a 3x3 affine or projective ``matrix`` to each ``(K, 2)`` point array (float64 out)."""
    matrix = np.asarray(matrix, dtype=np.float64)
    if matrix.shape != (3, 3):
        raise ValueError(f"matrix must be 3x3, got shape {matrix.shape}")
    return [apply_matrix(np.asarray(polygon, dtype=np.float64).reshape(-1, 2), matrix) for polygon in polygons]


def min_area_quad(points: np.ndarray) -> np.ndarray:
    """The minimum-area rectangle of ``(K, 2)`` points: (4, 2) float64, clockwise from top-left."""
    return _min_area_box(points)[0]


def _min_area_box(points: np.ndarray) -> tuple[np.ndarray, float]:
    """Minimum-area rectangle of ``points``: corners ordered clockwise from top-left, short side."""
    rect = cv2.minAreaRect(np.asarray(points, dtype=np.float32).reshape(-1, 1, 2))
    corners = cv2.boxPoints(rect).astype(np.float64)
    return _order_clockwise(corners), float(min(rect[1]))


def _order_clockwise(corners: np.ndarray) -> np.ndarray:
    """Order four rectangle corners as top-left, top-right, bottom-right, bottom-left.

    The two corners with the smallest x form the left side (the upper one is top-left), the other
    two the right side; with y pointing down that order runs clockwise on screen.
    """
    by_x = corners[np.argsort(corners[:, 0], kind="stable")]
    left, right = by_x[:2], by_x[2:]
    top_left, bottom_left = left[np.argsort(left[:, 1], kind="stable")]
    top_right, bottom_right = right[np.argsort(right[:, 1], kind="stable")]
    return np.array([top_left, top_right, bottom_right, bottom_left], dtype=np.float64)


def _mean_inside(prob: np.ndarray, box: np.ndarray) -> float:
    """Mean of ``prob`` over the pixels of the filled ``box``, computed within its bounding rectangle."""
    map_height, map_width = prob.shape
    x_min = int(np.clip(np.floor(box[:, 0].min()), 0, map_width - 1))
    x_max = int(np.clip(np.ceil(box[:, 0].max()), 0, map_width - 1))
    y_min = int(np.clip(np.floor(box[:, 1].min()), 0, map_height - 1))
    y_max = int(np.clip(np.ceil(box[:, 1].max()), 0, map_height - 1))
    mask = np.zeros((y_max - y_min + 1, x_max - x_min + 1), dtype=np.uint8)
    # Rounded, not truncated: box corners from cv2.boxPoints carry float noise (29.99998).
    local = np.round(box - np.array([x_min, y_min])).astype(np.int32)
    cv2.fillPoly(mask, [local.reshape(-1, 1, 2)], 1)
    return float(cv2.mean(prob[y_min : y_max + 1, x_min : x_max + 1], mask)[0])


def _unclip(box: np.ndarray, unclip_ratio: float, at_least: float = 0.0) -> np.ndarray | None:
    """Offset ``box`` outwards by ``area * unclip_ratio / perimeter`` (at least ``at_least``); None
    for a degenerate box."""
    xs, ys = box[:, 0], box[:, 1]
    area = 0.5 * abs(float(np.dot(xs, np.roll(ys, -1)) - np.dot(ys, np.roll(xs, -1))))
    perimeter = float(np.linalg.norm(box - np.roll(box, -1, axis=0), axis=1).sum())
    if area <= 0.0 or perimeter <= 0.0:
        return None
    distance = max(area * unclip_ratio / perimeter, at_least)
    offset = pyclipper.PyclipperOffset()
    offset.ArcTolerance = _ARC_TOLERANCE_PX * _CLIPPER_SCALE
    offset.AddPath(
        np.round(box * _CLIPPER_SCALE).astype(np.int64).tolist(),
        pyclipper.JT_ROUND,
        pyclipper.ET_CLOSEDPOLYGON,
    )
    paths = offset.Execute(distance * _CLIPPER_SCALE)
    if not paths:
        return None
    return np.concatenate([np.asarray(path, dtype=np.float64) for path in paths]) / _CLIPPER_SCALE


# ---------------------------------------------------------------- mode "db": MhLiao/DB exactly


def _db_boxes(prob: np.ndarray, contours: tuple, config: PostprocessConfig,
              dest: tuple[int, int]) -> list[Detection]:
    """DB's boxes_from_bitmap on a map already cut to the image: corners scaled to ``dest`` and
    rounded. Where DB itself would fail (unclip yielding no path, or several of unequal length:
    numpy cannot stack them) the candidate is dropped."""
    height, width = prob.shape
    dest_width, dest_height = int(dest[0]), int(dest[1])
    detections = []
    for contour in contours[: config.max_candidates]:
        box, short_side = _db_mini_box(contour)
        if short_side < config.min_size:
            continue
        score = _db_score(prob, box)
        if config.box_thresh > score:
            continue
        grown = _db_unclip(box, config.unclip_ratio)
        if grown is None:
            continue
        box, short_side = _db_mini_box(grown)
        if short_side < config.min_size + 2:
            continue
        corners = box.astype(np.float64)
        corners[:, 0] = np.clip(np.round(box[:, 0] / width * dest_width), 0, dest_width)
        corners[:, 1] = np.clip(np.round(box[:, 1] / height * dest_height), 0, dest_height)
        corners.setflags(write=False)
        detections.append(Detection(polygon=corners, score=score))
    return detections


def _db_mini_box(points: np.ndarray) -> tuple[np.ndarray, float]:
    """DB's get_mini_boxes: float32 corners sorted by x (stably); of the two left ones the lower is
    the top-left only when its y is strictly smaller, otherwise the second is (likewise right)."""
    rect = cv2.minAreaRect(np.asarray(points).reshape(-1, 1, 2))
    corners = cv2.boxPoints(rect)  # float32
    by_x = corners[np.argsort(corners[:, 0], kind="stable")]
    top_left, bottom_left = (by_x[0], by_x[1]) if by_x[1][1] > by_x[0][1] else (by_x[1], by_x[0])
    top_right, bottom_right = (by_x[2], by_x[3]) if by_x[3][1] > by_x[2][1] else (by_x[3], by_x[2])
    return np.array([top_left, top_right, bottom_right, bottom_left], dtype=np.float32), float(min(rect[1]))


def _db_score(prob: np.ndarray, box: np.ndarray) -> float:
    """DB's box_score_fast: the bounding rectangle from floor/ceil of the float32 corners (clipped
    to the map), the mask filled from the corners relative to it truncated to whole pixels."""
    map_height, map_width = prob.shape
    x_min = int(np.clip(np.floor(box[:, 0].min()), 0, map_width - 1))
    x_max = int(np.clip(np.ceil(box[:, 0].max()), 0, map_width - 1))
    y_min = int(np.clip(np.floor(box[:, 1].min()), 0, map_height - 1))
    y_max = int(np.clip(np.ceil(box[:, 1].max()), 0, map_height - 1))
    mask = np.zeros((y_max - y_min + 1, x_max - x_min + 1), dtype=np.uint8)
    local = (box.astype(np.float64) - np.array([x_min, y_min], dtype=np.float64)).astype(np.int32)
    cv2.fillPoly(mask, [local.reshape(-1, 1, 2)], 1)
    return float(cv2.mean(prob[y_min : y_max + 1, x_min : x_max + 1], mask)[0])


def _db_unclip(box: np.ndarray, unclip_ratio: float) -> np.ndarray | None:
    """DB's unclip: distance from the float corners' area and perimeter as shapely computes them,
    the offset path on the corners truncated towards zero, integer output points."""
    corners = box.astype(np.float64)
    shape = Polygon(corners)
    if shape.length <= 0.0:
        return None
    offset = pyclipper.PyclipperOffset()
    offset.AddPath(np.trunc(corners).astype(np.int64).tolist(), pyclipper.JT_ROUND, pyclipper.ET_CLOSEDPOLYGON)
    paths = offset.Execute(shape.area * unclip_ratio / shape.length)
    if not paths or len({len(path) for path in paths}) != 1:
        return None
    return np.concatenate([np.asarray(path, dtype=np.int64) for path in paths])
