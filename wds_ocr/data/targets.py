"""The four DBNet training targets at the transformed resolution (MhLiao/DB definitions).

Reads: text polygons in pixel coordinates of the transformed (height x width) image and one
don't-care flag per polygon. Produces: ``gt`` (shrunk text), ``mask`` (0 where the loss must
ignore), ``thresh_map`` (border distance field) and ``thresh_mask`` (dilated text), plus the
final ``ignored`` flag of every polygon. The steps follow MhLiao/DB's training processes
``MakeSegDetectionData`` then ``MakeBorderMap``:

1. Validate: clip every point to [0, width-1] x [0, height-1]; the signed sum
   sum (x[i+1] - x[i]) * (y[i+1] + y[i]) / 2 (summed in order) decides the rest: |sum| < 1 ->
   ignored; sum > 0 -> the point order is reversed. Later steps see the clipped, reordered points.
2. Ignored (don't-care, |sum| < 1, or min(height, width) of the clipped bounds < min_text_size):
   the polygon, truncated to int32, is filled with 0 in ``mask``.
3. Kept: offset distance D = area * (1 - shrink_ratio**2) / perimeter; pyclipper offsets the
   polygon by -D (JT_ROUND, ET_CLOSEDPOLYGON). No result -> ignored as in 2; otherwise the first
   resulting path is filled with 1 in ``gt``. Each polygon's outcome is reported as a ``LeftOut``
   code (kept, don't-care, too small, shrink vanished) so builds can say what the targets cover.
4. Border, for each polygon still kept: the polygon offset by +D (first path) is filled with 1
   in ``thresh_mask``; over its bounding box (limited to the image) every pixel gets
   1 - min(1, distance to the polygon outline / D), and ``canvas`` keeps the maximum over
   polygons. Finally thresh_map = canvas * (thresh_max - thresh_min) + thresh_min.

Bit-exactness with the reference: area and perimeter are computed the way GEOS (shapely, which
the reference calls) computes them, in the same order of operations, so D, and hence every
pyclipper result and every filled pixel of ``gt``, ``mask`` and ``thresh_mask``, is identical.
The distance field is computed in float64 on the reference's grid (coordinates relative to the
dilated polygon's bounding box), stored as float32, as the reference does.

Deliberate deviation (thresh_map only): the reference's point-to-segment distance uses the
endpoint distance wherever the angle the segment subtends at the pixel is acute. That is the
wrong test: a pixel whose projection falls inside the segment but which lies outside the circle
on the segment as diameter gets its distance to the nearer endpoint instead of its (smaller)
distance to the segment. Its law-of-cosines form also yields NaN for a pixel exactly on an
edge's line when rounding pushes the cosine past 1 (square root of a negative), and for a pixel
on a repeated vertex (0 / 0); fmax then skips the pixel, so the outline itself keeps thresh_min
(or another polygon's value). Here the distance is the true point-to-segment distance
(projection clamped to the segment), so the reference's map never exceeds this one. Measured on
all 150 SROIE receipts at 640 x 640: the branch test lowers the reference by at most 0.032
(about 270 pixels an image, near the short edges at the ends of text lines); the NaN pixels (in
25 receipts, up to 466 pixels in one) differ by the full thresh_max - thresh_min = 0.4.

Storage: masks are uint8 0/1 (exact, a quarter of float32's bytes). thresh_map is computed in
float32 and quantised to float16 at the very end: its values lie in [thresh_min, thresh_max]
(0.3..0.7 by default) where the float16 step is at most 2**-11 ~ 0.00049, far finer than the L1
target needs, and it halves the bytes. Quantising here, not at write time, makes the shards and
the live path agree bit for bit.

Robustness: an empty polygon list gives gt all 0, mask all 1, thresh_map all thresh_min,
thresh_mask all 0. Polygons partly (or wholly) outside the image are clipped first; degenerate
ones (fewer than 3 points, all points equal, collinear, signed area below 1) are ignored as in
the reference; repeated points and any number of points are handled. Malformed arguments
(mismatched lengths, a shape other than (K, 2), non-finite coordinates, a non-positive size)
raise ValueError; nothing asserts. Inputs are not modified.

Speed: one pass per polygon with small numpy blocks; the border field, float64 over the dilated
bounding box for all edges at once, is most of the time. Outputs are fresh arrays; float16
rounding is done on the float32 bit pattern (exactly numpy's rounding, several times faster).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import pyclipper

from wds_ocr.config import TargetConfig
from wds_ocr.data.coverage import LeftOut

# Largest edges x pixels block evaluated at once in the distance field (bounds temporary memory).
_DISTANCE_BLOCK_ELEMENTS = 1 << 20
# Smallest positive normal float16; from here up the bit-level rounding in _to_float16 is exact.
_FLOAT16_MIN_NORMAL = 2.0**-14

Box = tuple[int, int, int, int]  # (y0, y1, x0, x1) of a canvas region, inclusive


@dataclass(frozen=True)
class Targets:
    """DBNet targets of one transformed image."""

    gt: np.ndarray  # (H, W) uint8 in {0, 1}: shrunk text regions
    mask: np.ndarray  # (H, W) uint8 in {0, 1}: 0 over ignored (don't-care / too small / vanished) polygons
    thresh_map: np.ndarray  # (H, W) float16 in [thresh_min, thresh_max]
    thresh_mask: np.ndarray  # (H, W) uint8 in {0, 1}: dilated polygons of the kept text
    left_out: np.ndarray  # (P,) uint8 LeftOut code per input polygon: 0 = in the targets

    @property
    def ignored(self) -> np.ndarray:
        """(P,) bool: True where the polygon is masked out of the loss (any LeftOut but KEPT)."""
        return self.left_out != LeftOut.KEPT


def make_targets(
    polygons: Sequence[np.ndarray],
    dont_care: Sequence[bool],
    height: int,
    width: int,
    config: TargetConfig,
) -> Targets:
    """All four targets for ``polygons`` ((K, 2) float pixel coordinates) in a height x width image."""
    _check_arguments(polygons, dont_care, height, width)
    gt = np.zeros((height, width), dtype=np.uint8)
    mask = np.ones((height, width), dtype=np.uint8)
    thresh_mask = np.zeros((height, width), dtype=np.uint8)
    # np.zeros maps zero pages lazily: pixels no border field reaches cost nothing.
    canvas = np.zeros((height, width), dtype=np.float32)
    left_out = np.zeros(len(polygons), dtype=np.uint8)
    shrink_factor = 1.0 - config.shrink_ratio**2

    touched: Box | None = None  # bounds of every canvas pixel a border field reached
    for index, (points, flag) in enumerate(zip(polygons, dont_care)):
        polygon, degenerate = _clip_and_orient(_as_points(points, index), height, width)
        if flag or degenerate or _smaller_side(polygon) < config.min_text_size:
            _fill(mask, polygon, 0)
            left_out[index] = LeftOut.DONT_CARE if flag else LeftOut.TOO_SMALL
            continue
        area, perimeter = _area_and_perimeter(polygon)
        distance = area * shrink_factor / perimeter
        shrunk = _offset(polygon, -distance)
        if shrunk is None:
            _fill(mask, polygon, 0)
            left_out[index] = LeftOut.SHRINK_VANISHED
            continue
        _fill(gt, shrunk, 1)
        box = _draw_border(canvas, thresh_mask, polygon, distance)
        if box is not None:
            touched = box if touched is None else _union(touched, box)

    return Targets(
        gt=gt,
        mask=mask,
        thresh_map=_threshold_map(canvas, touched, config),
        thresh_mask=thresh_mask,
        left_out=left_out,
    )


def _check_arguments(polygons: Sequence[np.ndarray], dont_care: Sequence[bool], height: int, width: int) -> None:
    if len(polygons) != len(dont_care):
        raise ValueError(
            f"got {len(polygons)} polygons but {len(dont_care)} don't-care flags; give one flag per polygon"
        )
    for name, value in (("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"image {name} must be a positive integer, got {value!r}")


def _as_points(points: np.ndarray, index: int) -> np.ndarray:
    array = np.asarray(points, dtype=np.float64)
    if array.ndim != 2 or array.shape[1] != 2:
        raise ValueError(f"polygon {index}: expected (K, 2) points, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"polygon {index}: coordinates must be finite numbers")
    return array


def _clip_and_orient(points: np.ndarray, height: int, width: int) -> tuple[np.ndarray, bool]:
    """Reference validation: clip into the image, reverse by the sign of the ordered sum.

    Returns a new (K, 2) array and whether the polygon is degenerate (|sum| < 1). The sum runs
    in point order on Python floats (IEEE doubles, like the reference's loop), so its sign and
    size agree bit for bit.
    """
    polygon = np.clip(points, 0.0, (width - 1, height - 1))
    if len(polygon) == 0:
        return polygon, True
    coords = polygon.tolist()
    signed = 0.0
    for (x0, y0), (x1, y1) in zip(coords, coords[1:] + coords[:1]):
        signed += (x1 - x0) * (y1 + y0)
    signed /= 2.0
    if signed > 0:
        polygon = polygon[::-1]
    return polygon, abs(signed) < 1


def _smaller_side(polygon: np.ndarray) -> float:
    """min(height, width) of the polygon's bounds (0 for an empty polygon)."""
    if len(polygon) == 0:
        return 0.0
    extent = polygon.max(axis=0) - polygon.min(axis=0)
    return float(min(extent[0], extent[1]))


def _area_and_perimeter(polygon: np.ndarray) -> tuple[float, float]:
    """Area and perimeter exactly as GEOS computes them for shapely's Polygon(polygon).

    GEOS closes the ring, sums x[i] - x[0] times (y[i-1] - y[i+1]) over the inner ring points
    and adds the edge lengths sqrt(dx*dx + dy*dy), both in ring order and in doubles; the loops
    below keep those operations and their order.
    """
    ring = polygon.tolist()
    ring.append(ring[0])
    first_x = ring[0][0]
    twice_area = 0.0
    for before, here, after in zip(ring, ring[1:], ring[2:]):
        twice_area += (here[0] - first_x) * (before[1] - after[1])
    perimeter = 0.0
    for (xa, ya), (xb, yb) in zip(ring, ring[1:]):
        dx = xb - xa
        dy = yb - ya
        perimeter += math.sqrt(dx * dx + dy * dy)
    return abs(twice_area / 2.0), perimeter


def _offset(polygon: np.ndarray, delta: float) -> np.ndarray | None:
    """First path of pyclipper's round offset of the closed polygon by ``delta``, or None if empty.

    pyclipper truncates the float coordinates to integers and returns integer points.
    """
    offsetter = pyclipper.PyclipperOffset()
    offsetter.AddPath(polygon.tolist(), pyclipper.JT_ROUND, pyclipper.ET_CLOSEDPOLYGON)
    paths = offsetter.Execute(delta)
    if not paths:
        return None
    return np.array(paths[0], dtype=np.int32).reshape(-1, 2)


def _fill(target: np.ndarray, polygon: np.ndarray, value: int) -> None:
    """cv2.fillPoly with the points truncated to int32, as the reference does."""
    if len(polygon) == 0:
        return
    cv2.fillPoly(target, [polygon.astype(np.int32)], value)


def _draw_border(
    canvas: np.ndarray, thresh_mask: np.ndarray, polygon: np.ndarray, distance: float
) -> Box | None:
    """Add one kept polygon's dilated region to ``thresh_mask`` and its border field to ``canvas``.

    Returns the canvas box written, (y0, y1, x0, x1) inclusive, or None.
    """
    padded = _offset(polygon, distance)
    if padded is None:
        return None
    cv2.fillPoly(thresh_mask, [padded], 1)
    height, width = canvas.shape
    xmin, ymin = padded.min(axis=0).tolist()
    xmax, ymax = padded.max(axis=0).tolist()
    x0, x1 = min(max(xmin, 0), width - 1), min(max(xmax, 0), width - 1)
    y0, y1 = min(max(ymin, 0), height - 1), min(max(ymax, 0), height - 1)
    if x0 > x1 or y0 > y1:
        return None
    # The reference's frame: coordinates relative to the dilated bounding box's corner.
    local = polygon - np.array([xmin, ymin], dtype=np.float64)
    xs = np.arange(x0 - xmin, x1 - xmin + 1, dtype=np.float64)
    ys = np.arange(y0 - ymin, y1 - ymin + 1, dtype=np.float64)
    scaled = _distance_to_outline(local, xs, ys)
    scaled /= distance
    np.minimum(scaled, 1.0, out=scaled)
    # Stored as float32 first, then 1 - value in float32, as the reference's float32 maps do.
    nearness = np.subtract(np.float32(1), scaled, dtype=np.float32)
    region = canvas[y0 : y1 + 1, x0 : x1 + 1]
    np.maximum(region, nearness, out=region)
    return y0, y1, x0, x1


def _union(first: Box, second: Box) -> Box:
    return min(first[0], second[0]), max(first[1], second[1]), min(first[2], second[2]), max(first[3], second[3])


def _threshold_map(canvas: np.ndarray, touched: Box | None, config: TargetConfig) -> np.ndarray:
    """float16 of canvas * (thresh_max - thresh_min) + thresh_min, computed in float32 as the reference does.

    Outside ``touched`` the canvas is 0, where that expression is exactly float32(thresh_min).
    """
    lowest = np.float32(config.thresh_min)
    thresh_map = np.full(canvas.shape, lowest.astype(np.float16), dtype=np.float16)
    if touched is not None:
        y0, y1, x0, x1 = touched
        region = canvas[y0 : y1 + 1, x0 : x1 + 1]
        region *= config.thresh_max - config.thresh_min
        region += config.thresh_min
        thresh_map[y0 : y1 + 1, x0 : x1 + 1] = _to_float16(region, config.thresh_min)
    return thresh_map


def _distance_to_outline(polygon: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """(len(ys), len(xs)) float64: distance from each grid point to the closed polygon outline.

    Per edge A->B the projection parameter t = ((P - A) . (B - A)) / |B - A|^2 is clamped to
    [0, 1] (t = 0 for a zero-length edge) and the distance is |P - A - t (B - A)|. The minimum
    is taken over squared distances and rooted once; rooting is monotone, so this equals the
    minimum of the distances. Edges are evaluated together in (edges, rows, cols) blocks.
    """
    deltas = np.concatenate([polygon[1:], polygon[:1]]) - polygon
    lengths2 = deltas[:, 0] * deltas[:, 0] + deltas[:, 1] * deltas[:, 1]
    lengths2[lengths2 <= 0] = 1.0
    block = max(1, _DISTANCE_BLOCK_ELEMENTS // (len(ys) * len(xs)))
    nearest2 = None
    for first in range(0, len(polygon), block):
        edges = slice(first, first + block)
        dx = deltas[edges, 0, None, None]
        dy = deltas[edges, 1, None, None]
        rel_x = (xs[None, :] - polygon[edges, 0, None])[:, None, :]  # (E, 1, cols)
        rel_y = (ys[None, :] - polygon[edges, 1, None])[:, :, None]  # (E, rows, 1)
        t = rel_x * dx + rel_y * dy
        t /= lengths2[edges, None, None]
        np.maximum(t, 0.0, out=t)
        np.minimum(t, 1.0, out=t)
        off_x = t * dx
        np.subtract(rel_x, off_x, out=off_x)
        t *= dy
        np.subtract(rel_y, t, out=t)
        off_x *= off_x
        t *= t
        off_x += t
        block_nearest2 = off_x.min(axis=0)
        nearest2 = block_nearest2 if nearest2 is None else np.minimum(nearest2, block_nearest2)
    return np.sqrt(nearest2)


def _to_float16(values: np.ndarray, lowest: float) -> np.ndarray:
    """float32 -> float16, rounding to nearest even exactly like ``astype(np.float16)``.

    When every value is a positive normal float16 (``lowest`` is the smallest value present; the
    largest here is at most 1, far below float16's 65504), the rounding is done on the bit pattern: add half a float16 step (minus one unless the kept last
    bit is odd: ties go to even), drop the 13 extra mantissa bits and rebias the exponent
    (127 -> 15). Several times faster than numpy's generic cast on a full image.
    """
    if not lowest >= _FLOAT16_MIN_NORMAL:
        return values.astype(np.float16)
    bits = values.view(np.uint32)
    rounded = (bits >> 13) & 1
    rounded += bits
    rounded += 0x0FFF
    rounded >>= 13
    rounded -= (127 - 15) << 10
    return rounded.astype(np.uint16).view(np.float16)
