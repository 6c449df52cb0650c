"""DBNet targets: pixel equality with a re-implementation of MhLiao/DB, hand-computed maps, properties.

The oracle below follows the reference's training steps one by one (validate_polygons, then
MakeSegDetectionData, then MakeBorderMap) with its own tools: shapely for area and perimeter,
pyclipper for the offsets, cv2.fillPoly on float32 maps, per-edge distance fields over the
dilated polygon's bounding box. Its distance function comes in two versions: the reference's
("flawed": endpoint distance wherever the angle at the pixel is acute) and the true
point-to-segment distance that make_targets documents. gt, mask and thresh_mask must equal the
oracle pixel for pixel; thresh_map must equal the corrected oracle bit for bit after float16
quantisation, and may exceed (never fall below) the flawed one.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pyclipper
import pytest
from shapely.geometry import Polygon

from wds_ocr.config import TargetConfig
from wds_ocr.data.targets import Targets, _area_and_perimeter, _clip_and_orient, _to_float16, make_targets

# MhLiao/DB's own settings (the package defaults are tuned for receipts: shrink 0.6, min size 3)
CONFIG = TargetConfig(shrink_ratio=0.4, min_text_size=8.0)  # thresh 0.3..0.7
REPO_ROOT = Path(__file__).resolve().parents[2]
# 476 and 500 carry EXIF rotations; 463 is 4961 x 7016; 479 has pixels where the reference gets NaN.
RECEIPTS = ("sroie_463.jpg", "sroie_469.jpg", "sroie_476.jpg", "sroie_479.jpg", "sroie_500.jpg")
LOW = np.float16(np.float32(0.3))  # thresh_min as stored: 0.2998046875
HIGH = np.float16(np.float32(0.4) + np.float32(0.3))  # canvas 1 -> 0.7001953125


# ----------------------------------------------------------------------------------------------
# Oracle: MhLiao/DB's steps, written out plainly.


def _reference_distance(xs, ys, start, end):
    """The reference's point-to-segment distance (law of cosines, wrong branch test).

    Besides the branch test it yields NaN on an edge's own line when rounding pushes the cosine
    past 1 (square root of a negative) and on a repeated vertex (0 / 0); fmax then skips the pixel.
    """
    d1 = np.square(xs - start[0]) + np.square(ys - start[1])
    d2 = np.square(xs - end[0]) + np.square(ys - end[1])
    d12 = np.square(start[0] - end[0]) + np.square(start[1] - end[1])
    with np.errstate(divide="ignore", invalid="ignore"):
        cosin = (d12 - d1 - d2) / (2 * np.sqrt(d1 * d2))
        square_sin = np.nan_to_num(1 - np.square(cosin))
        result = np.sqrt(d1 * d2 * square_sin / d12)
    result[cosin < 0] = np.sqrt(np.fmin(d1, d2))[cosin < 0]
    return result


def _segment_distance(xs, ys, start, end):
    """True distance from each (xs, ys) to the segment start-end (projection clamped)."""
    dx, dy = end[0] - start[0], end[1] - start[1]
    length2 = dx * dx + dy * dy
    if length2 > 0:
        t = np.clip(((xs - start[0]) * dx + (ys - start[1]) * dy) / length2, 0.0, 1.0)
    else:
        t = np.zeros_like(xs)
    off_x = (xs - start[0]) - t * dx
    off_y = (ys - start[1]) - t * dy
    return np.sqrt(off_x * off_x + off_y * off_y)


def _reference_distance_without_nan(xs, ys, start, end):
    """The reference's distance with only its NaN pixels replaced: isolates the branch-test flaw."""
    result = _reference_distance(xs, ys, start, end)
    invalid = np.isnan(result)
    result[invalid] = _segment_distance(xs, ys, start, end)[invalid]
    return result


def _oracle(polygons, dont_care, height, width, config=CONFIG, distance_fn=_segment_distance):
    polygons = [np.array(p, dtype=np.float64).reshape(-1, 2) for p in polygons]
    ignore = [bool(flag) for flag in dont_care]
    # validate_polygons
    for polygon in polygons:
        polygon[:, 0] = np.clip(polygon[:, 0], 0, width - 1)
        polygon[:, 1] = np.clip(polygon[:, 1], 0, height - 1)
    for i, polygon in enumerate(polygons):
        area = 0
        for j in range(polygon.shape[0]):
            k = (j + 1) % polygon.shape[0]
            area += (polygon[k, 0] - polygon[j, 0]) * (polygon[k, 1] + polygon[j, 1])
        area = area / 2.0
        if abs(area) < 1:
            ignore[i] = True
        if area > 0:
            polygons[i] = polygon[::-1, :]
    # MakeSegDetectionData
    gt = np.zeros((height, width), dtype=np.float32)
    mask = np.ones((height, width), dtype=np.float32)
    for i, polygon in enumerate(polygons):
        h = max(polygon[:, 1]) - min(polygon[:, 1])
        w = max(polygon[:, 0]) - min(polygon[:, 0])
        if ignore[i] or min(h, w) < config.min_text_size:
            cv2.fillPoly(mask, polygon.astype(np.int32)[np.newaxis, :, :], 0)
            ignore[i] = True
            continue
        shape = Polygon(polygon)
        distance = shape.area * (1 - np.power(config.shrink_ratio, 2)) / shape.length
        offsetter = pyclipper.PyclipperOffset()
        offsetter.AddPath([tuple(point) for point in polygon], pyclipper.JT_ROUND, pyclipper.ET_CLOSEDPOLYGON)
        shrunk = offsetter.Execute(-distance)
        if shrunk == []:
            cv2.fillPoly(mask, polygon.astype(np.int32)[np.newaxis, :, :], 0)
            ignore[i] = True
            continue
        cv2.fillPoly(gt, [np.array(shrunk[0]).reshape(-1, 2).astype(np.int32)], 1)
    # MakeBorderMap
    canvas = np.zeros((height, width), dtype=np.float32)
    thresh_mask = np.zeros((height, width), dtype=np.float32)
    for i, polygon in enumerate(polygons):
        if not ignore[i]:
            _oracle_border(polygon.copy(), canvas, thresh_mask, config, distance_fn)
    thresh = canvas * (config.thresh_max - config.thresh_min) + config.thresh_min
    return gt, mask, thresh, thresh_mask, np.array(ignore)


def _oracle_border(polygon, canvas, thresh_mask, config, distance_fn):
    shape = Polygon(polygon)
    distance = shape.area * (1 - np.power(config.shrink_ratio, 2)) / shape.length
    offsetter = pyclipper.PyclipperOffset()
    offsetter.AddPath([tuple(point) for point in polygon], pyclipper.JT_ROUND, pyclipper.ET_CLOSEDPOLYGON)
    padded = np.array(offsetter.Execute(distance)[0])
    cv2.fillPoly(thresh_mask, [padded.astype(np.int32)], 1.0)
    xmin, xmax = padded[:, 0].min(), padded[:, 0].max()
    ymin, ymax = padded[:, 1].min(), padded[:, 1].max()
    box_w, box_h = xmax - xmin + 1, ymax - ymin + 1
    polygon[:, 0] = polygon[:, 0] - xmin
    polygon[:, 1] = polygon[:, 1] - ymin
    xs = np.broadcast_to(np.linspace(0, box_w - 1, num=box_w).reshape(1, box_w), (box_h, box_w))
    ys = np.broadcast_to(np.linspace(0, box_h - 1, num=box_h).reshape(box_h, 1), (box_h, box_w))
    distance_map = np.zeros((polygon.shape[0], box_h, box_w), dtype=np.float32)
    for i in range(polygon.shape[0]):
        j = (i + 1) % polygon.shape[0]
        distance_map[i] = np.clip(distance_fn(xs, ys, polygon[i], polygon[j]) / distance, 0, 1)
    distance_map = distance_map.min(axis=0)
    x0 = min(max(0, xmin), canvas.shape[1] - 1)
    x1 = min(max(0, xmax), canvas.shape[1] - 1)
    y0 = min(max(0, ymin), canvas.shape[0] - 1)
    y1 = min(max(0, ymax), canvas.shape[0] - 1)
    canvas[y0 : y1 + 1, x0 : x1 + 1] = np.fmax(
        1 - distance_map[y0 - ymin : y1 - ymax + box_h, x0 - xmin : x1 - xmax + box_w],
        canvas[y0 : y1 + 1, x0 : x1 + 1],
    )


def _assert_matches_oracle(polygons, dont_care, height, width, config=CONFIG) -> Targets:
    """Exact equality with the corrected oracle; the reference's own thresh never exceeds ours."""
    targets = make_targets(polygons, dont_care, height, width, config)
    gt, mask, thresh, thresh_mask, ignored = _oracle(polygons, dont_care, height, width, config)
    np.testing.assert_array_equal(targets.gt, gt.astype(np.uint8))
    np.testing.assert_array_equal(targets.mask, mask.astype(np.uint8))
    np.testing.assert_array_equal(targets.thresh_mask, thresh_mask.astype(np.uint8))
    np.testing.assert_array_equal(targets.ignored, ignored)
    np.testing.assert_array_equal(targets.thresh_map.view(np.uint16), thresh.astype(np.float16).view(np.uint16))
    flawed = _oracle(polygons, dont_care, height, width, config, _reference_distance)[2].astype(np.float16)
    assert (flawed <= targets.thresh_map).all()
    return targets


def _assert_form(targets: Targets, count: int, height: int, width: int) -> None:
    for name in ("gt", "mask", "thresh_mask"):
        array = getattr(targets, name)
        assert array.dtype == np.uint8 and array.shape == (height, width), name
        assert set(np.unique(array).tolist()) <= {0, 1}, name
    assert targets.thresh_map.dtype == np.float16 and targets.thresh_map.shape == (height, width)
    assert targets.ignored.dtype == np.bool_ and targets.ignored.shape == (count,)


def _rectangle(cx, cy, w, h, angle_degrees):
    angle = np.deg2rad(angle_degrees)
    corners = np.array([[-w / 2, -h / 2], [w / 2, -h / 2], [w / 2, h / 2], [-w / 2, h / 2]])
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    return corners @ rotation.T + [cx, cy]


# ----------------------------------------------------------------------------------------------
# Hand-computed values.

# Axis-aligned rectangle x 10..110, y 20..50: area 3000, perimeter 260, so
# D = 3000 * (1 - 0.4^2) / 260 = 9.6923...; Clipper rounds offset vertices to the nearest integer.
RECT = np.array([[10.0, 20.0], [110.0, 20.0], [110.0, 50.0], [10.0, 50.0]])
RECT_D = 3000 * (1 - 0.4**2) / 260


def test_rectangle_gt_is_its_shrunk_rectangle():
    targets = make_targets([RECT], [False], 80, 160, CONFIG)

    # Shrunk: x 10 + D = 19.69 -> 20 .. 110 - D = 100.31 -> 100; y 29.69 -> 30 .. 40.31 -> 40.
    assert (round(10 + RECT_D), round(110 - RECT_D), round(20 + RECT_D), round(50 - RECT_D)) == (20, 100, 30, 40)
    expected = np.zeros((80, 160), dtype=np.uint8)
    expected[30:41, 20:101] = 1
    np.testing.assert_array_equal(targets.gt, expected)
    np.testing.assert_array_equal(targets.mask, np.ones((80, 160), dtype=np.uint8))
    assert targets.ignored.tolist() == [False]


def test_rectangle_thresh_mask_covers_the_dilated_rectangle():
    targets = make_targets([RECT], [False], 80, 160, CONFIG)
    # Dilated by D with round corners: x 0.31 -> 0 .. 119.69 -> 120, y 10.31 -> 10 .. 59.69 -> 60.
    assert (round(10 - RECT_D), round(110 + RECT_D), round(20 - RECT_D), round(50 + RECT_D)) == (0, 120, 10, 60)
    thresh_mask = targets.thresh_mask

    assert thresh_mask[20:51, 0:121].all()  # the rectangle widened left and right
    assert thresh_mask[10:61, 10:111].all()  # the rectangle widened up and down
    outside = np.ones((80, 160), dtype=bool)
    outside[10:61, 0:121] = False
    assert not thresh_mask[outside].any()
    # Round corners: the bounding box's corners are D * sqrt(2) = 13.7 from the rectangle.
    assert thresh_mask[10, 0] == thresh_mask[10, 120] == thresh_mask[60, 0] == thresh_mask[60, 120] == 0


def test_rectangle_thresh_map_is_high_on_edges_and_low_away_from_text():
    thresh = make_targets([RECT], [False], 80, 160, CONFIG).thresh_map

    assert HIGH == np.float16(0.7) and LOW == np.float16(0.3)
    assert (thresh[20, 10:111] == HIGH).all() and (thresh[50, 10:111] == HIGH).all()
    assert (thresh[20:51, 10] == HIGH).all() and (thresh[20:51, 110] == HIGH).all()
    # One pixel off an edge: canvas = 1 - float32(1 / D), then the float32 affine map.
    one_off = np.float16((1 - np.float32(1 / RECT_D)) * np.float32(0.4) + np.float32(0.3))
    assert one_off == np.float16(0.65869140625)
    assert thresh[19, 60] == thresh[21, 60] == thresh[35, 9] == thresh[35, 111] == one_off
    # The centre is 15 > D from every edge; far pixels see no text at all.
    assert thresh[35, 60] == LOW
    assert thresh[5, 150] == thresh[79, 0] == thresh[0, 159] == LOW
    assert thresh.min() == LOW and thresh.max() == HIGH


def test_empty_polygon_list():
    targets = make_targets([], [], 48, 64, CONFIG)

    _assert_form(targets, 0, 48, 64)
    assert not targets.gt.any()
    assert targets.mask.all()
    assert (targets.thresh_map == LOW).all()
    assert not targets.thresh_mask.any()


def test_dont_care_and_small_text_are_masked_out_only():
    polygons = [RECT, RECT + [0, 40], _rectangle(130, 60, 20, 6, 0)]  # the last one is 6 px high
    targets = make_targets(polygons, [False, True, False], 120, 160, CONFIG)

    assert targets.ignored.tolist() == [False, True, True]
    expected_mask = np.ones((120, 160), dtype=np.uint8)
    expected_mask[60:91, 10:111] = 0  # the don't-care rectangle, its corners included
    expected_mask[57:64, 120:141] = 0  # x 120..140, y 57..63
    # The kept rectangle's shrunk region (rows 30..40) does not reach the don't-care one.
    np.testing.assert_array_equal(targets.mask, expected_mask)
    assert not targets.gt[50:].any()
    _assert_matches_oracle(polygons, [False, True, False], 120, 160)


# ----------------------------------------------------------------------------------------------
# Equality with the oracle.

HAND_MADE = {
    "octagon": [np.array([[30, 10], [50, 10], [62, 22], [62, 42], [50, 54], [30, 54], [18, 42], [18, 22]], float)],
    "curved_text": [
        np.concatenate(
            [
                np.stack([np.linspace(10, 110, 7), 30 + 12 * np.sin(np.linspace(0, np.pi, 7))], 1),
                np.stack([np.linspace(110, 10, 7), 50 + 12 * np.sin(np.linspace(np.pi, 0, 7))], 1),
            ]
        )
    ],
    # Shrinking by D = 5.82 cuts the 10 px bottom bar: two parts, the reference keeps the first.
    "u_shape_splits": [
        np.array([[0, 0], [20, 0], [20, 30], [40, 30], [40, 0], [60, 0], [60, 40], [0, 40]], float) + 5
    ],
    "bow_tie": [np.array([[10, 10], [90, 60], [90, 10], [10, 30]], float)],  # lobes of unequal area
    "symmetric_bow_tie": [np.array([[10, 10], [60, 50], [60, 10], [10, 50]], float)],  # signed area 0
    "repeated_vertex": [np.array([[10, 10], [60, 10], [60, 10], [60, 40], [10, 40]], float)],
    "clockwise_and_counter": [RECT * 0.5 + 3, (RECT * 0.5 + [60, 3])[::-1]],
    "crosses_every_border": [np.array([[-20, -15], [140, -10], [150, 90], [-30, 95]], float)],
    "partly_outside": [np.array([[-12.5, 30.2], [40.7, 28.9], [41.3, 52.6], [-11.8, 55.1]], float)],
    "wholly_outside": [np.array([[200, 10], [260, 10], [260, 40], [200, 40]], float)],
    "all_points_equal": [np.full((4, 2), 33.3)],
    "collinear": [np.array([[10, 10], [40, 25], [70, 40], [100, 55]], float)],
    "two_points": [np.array([[10, 10], [50, 40]], float)],
    # Area 0.56 < 1 while its int corners (10,10), (20,19), (20,20) would still shrink to something.
    "area_below_one": [np.array([[10.99, 10.01], [20.01, 19.99], [20.99, 20.95]])],
    "sliver_vanishes": [np.array([[0.2, 0.2], [100.3, 8.1], [100.4, 8.9]], float)],
    "overlapping": [
        _rectangle(60, 40, 80, 24, 15),
        _rectangle(70, 45, 70, 20, -20),
        _rectangle(40, 30, 30, 30, 45),
    ],
    "subpixel_coordinates": [np.array([[10.49, 10.51], [70.5, 11.49], [69.51, 39.5], [11.5, 38.49]])],
}


@pytest.mark.parametrize("name", sorted(HAND_MADE))
def test_hand_made_cases_match_reference(name):
    polygons = HAND_MADE[name]
    targets = _assert_matches_oracle(polygons, [False] * len(polygons), 80, 120)
    _assert_form(targets, len(polygons), 80, 120)


def test_hand_made_outcomes():
    def ignored(name):
        polygons = HAND_MADE[name]
        return make_targets(polygons, [False] * len(polygons), 80, 120, CONFIG).ignored.tolist()

    assert ignored("wholly_outside") == [True]  # clipped onto the right border: no area
    assert ignored("all_points_equal") == ignored("collinear") == ignored("two_points") == [True]
    assert ignored("symmetric_bow_tie") == ignored("area_below_one") == [True]
    # Area 39.6 and 8.7 px high, but its int corners (0,0), (100,8), (100,8) leave nothing to shrink.
    assert ignored("sliver_vanishes") == [True]
    assert ignored("u_shape_splits") == ignored("bow_tie") == ignored("crosses_every_border") == [False]
    gt = make_targets(HAND_MADE["u_shape_splits"], [False], 80, 120, CONFIG).gt
    # Only one arm survives in gt (the first path), the other stays 0.
    assert gt[10:30, 10:20].any() != gt[10:30, 50:60].any()


def test_points_are_clipped_and_reordered_like_the_reference():
    # Sum of (x[i+1] - x[i]) * (y[i+1] + y[i]) / 2 over RECT is -3000: order kept; reversed it is +3000.
    clipped = [[0, 20], [90, 20], [90, 50], [0, 50]]
    for points, expected in ((RECT, RECT), (RECT[::-1], RECT), (RECT + [-20, 0], clipped)):
        polygon, degenerate = _clip_and_orient(np.asarray(points, dtype=np.float64), 80, 120)
        np.testing.assert_array_equal(polygon, np.array(expected, dtype=np.float64))
        assert not degenerate


def test_area_and_perimeter_are_bit_identical_to_shapely():
    # D feeds pyclipper's rounding, so it must equal the reference's (shapely/GEOS) to the last bit.
    rng = np.random.default_rng(7)
    for trial in range(3000):
        scale = (1.0, 10.0, 640.0, 7000.0)[trial % 4]
        polygon = rng.uniform(0, scale, (int(rng.integers(3, 14)), 2))
        if trial % 3 == 0:
            polygon = np.round(polygon, 1)
        shape = Polygon(polygon)
        assert _area_and_perimeter(polygon) == (shape.area, shape.length)


def test_other_settings_match_reference():
    config = TargetConfig(shrink_ratio=0.6, thresh_min=0.0, thresh_max=1.0, min_text_size=0)
    polygons = [_rectangle(40, 30, 50, 6, 0), _rectangle(80, 50, 30, 20, -30), HAND_MADE["sliver_vanishes"][0]]
    targets = _assert_matches_oracle(polygons, [False, False, False], 80, 120, config)
    assert targets.ignored.tolist() == [False, False, True]
    assert targets.thresh_map.min() == 0.0 and targets.thresh_map.max() == 1.0


@pytest.mark.parametrize("seed", range(6))
def test_random_quads_and_rotated_rectangles_match_reference(seed):
    rng = np.random.default_rng(seed)
    height, width = int(rng.integers(60, 160)), int(rng.integers(60, 160))
    polygons = []
    for _ in range(12):
        cx, cy = rng.uniform(-10, width + 10), rng.uniform(-10, height + 10)  # some cross the border
        if rng.random() < 0.5:
            polygons.append(_rectangle(cx, cy, rng.uniform(4, 80), rng.uniform(4, 30), rng.uniform(-90, 90)))
        else:
            angles = np.sort(rng.uniform(0, 2 * np.pi, 4))
            radii = rng.uniform(5, 35, 4)
            polygons.append(np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], 1))
    dont_care = (rng.random(len(polygons)) < 0.2).tolist()
    targets = _assert_matches_oracle(polygons, dont_care, height, width)
    _assert_form(targets, len(polygons), height, width)


# ----------------------------------------------------------------------------------------------
# Properties on random inputs: one polygon per 64 x 64 cell, so cells can be checked apart.


def _cells(seed):
    rng = np.random.default_rng(100 + seed)
    polygons, dont_care, cells = [], [], []
    for row in range(4):
        for col in range(4):
            # Half-diagonal <= 22.4 and D <= 8.4: the dilated polygon stays inside its cell.
            w, h = rng.uniform(4, 40), rng.uniform(4, 20)
            polygons.append(_rectangle(col * 64 + 32, row * 64 + 32, w, h, rng.uniform(-90, 90)))
            dont_care.append(bool(rng.random() < 0.3))
            cells.append((slice(row * 64, row * 64 + 64), slice(col * 64, col * 64 + 64)))
    return polygons, dont_care, cells


@pytest.mark.parametrize("seed", range(4))
def test_properties_on_random_rectangles(seed):
    polygons, dont_care, cells = _cells(seed)
    targets = make_targets(polygons, dont_care, 256, 256, CONFIG)
    _assert_form(targets, 16, 256, 256)

    assert LOW <= targets.thresh_map.min() and targets.thresh_map.max() <= HIGH
    for polygon, flag, cell, ignored in zip(polygons, dont_care, cells, targets.ignored):
        extent = polygon.max(axis=0) - polygon.min(axis=0)
        assert ignored == (flag or extent.min() < CONFIG.min_text_size)
        region = np.zeros((256, 256), dtype=np.uint8)
        cv2.fillPoly(region, [polygon.astype(np.int32)], 1)
        inside = region[cell].astype(bool)
        if ignored:
            np.testing.assert_array_equal(targets.mask[cell], 1 - region[cell])
            assert not targets.gt[cell].any()
            assert not targets.thresh_mask[cell].any()
            assert (targets.thresh_map[cell] == LOW).all()
        else:
            assert targets.mask[cell].all()
            assert targets.gt[cell].any()
            assert not targets.gt[cell][~inside].any()  # gt lies inside the text polygon
            assert targets.thresh_mask[cell][inside].all()  # the dilation covers the polygon
            # Some pixel lies within sqrt(2)/2 of the outline, and D >= 1.5 here: canvas > 0.5.
            assert targets.thresh_map[cell].max() > 0.5


# ----------------------------------------------------------------------------------------------
# Real receipts at 640 x 640.


def _receipt(root: Path, name: str):
    words = json.loads((root / "jsons" / "val.json").read_text())["images"][name]["words"].values()
    # cv2 applies the EXIF orientation: this is the displayed frame the points refer to.
    shown_height, shown_width = cv2.imread(str(root / "images" / "val" / name), cv2.IMREAD_GRAYSCALE).shape
    scale = 640 / max(shown_height, shown_width)
    polygons = [np.array(word["points"], dtype=np.float64) * scale for word in words]
    return polygons, [word["transcription"] == "###" for word in words]


@pytest.mark.parametrize("name", RECEIPTS)
def test_real_receipts_match_reference(sroie_root, name):
    polygons, dont_care = _receipt(sroie_root, name)
    targets = _assert_matches_oracle(polygons, dont_care, 640, 640)
    _assert_form(targets, len(polygons), 640, 640)
    assert (~targets.ignored).sum() >= 10 and targets.gt.any()
    # the receipt defaults (shrink 0.6, min_text_size 3) match the reference's definitions too
    receipt = _assert_matches_oracle(polygons, dont_care, 640, 640, TargetConfig())
    assert (~receipt.ignored).sum() >= (~targets.ignored).sum()

    # Apart from its NaN pixels (on the outline itself, where ours is thresh_max), the reference's
    # map is lower than ours only by the branch-test flaw: at most 0.032 over all 150 receipts.
    thresh = targets.thresh_map.astype(np.float32)
    flawed = _oracle(polygons, dont_care, 640, 640, CONFIG, _reference_distance)[2].astype(np.float16)
    branch_only = _oracle(polygons, dont_care, 640, 640, CONFIG, _reference_distance_without_nan)[2]
    branch_gap = thresh - branch_only.astype(np.float16).astype(np.float32)
    assert 0.0 <= branch_gap.min() and 0.015 < branch_gap.max() <= 0.035
    nan_pixels = branch_only.astype(np.float16) != flawed
    assert nan_pixels.any() == (name == "sroie_479.jpg")
    assert (thresh[nan_pixels] == np.float32(HIGH)).all()


# ----------------------------------------------------------------------------------------------
# Quantisation, arguments, imports.


def test_fast_float16_rounding_equals_numpy_cast():
    # Every float32 in [0.25, 1) (all ties included), then random ones down to the smallest normal.
    every = np.arange(np.float32(0.25).view(np.uint32), np.float32(1.0).view(np.uint32), dtype=np.uint32)
    values = every.view(np.float32).reshape(2048, -1)
    np.testing.assert_array_equal(_to_float16(values, 0.25), values.astype(np.float16))
    rng = np.random.default_rng(0)
    low, high = np.float32(2.0**-14).view(np.uint32), np.float32(60000.0).view(np.uint32)
    sample = rng.integers(low, high, 1 << 20, dtype=np.uint32).view(np.float32)
    np.testing.assert_array_equal(_to_float16(sample, 2.0**-14), sample.astype(np.float16))
    zero_low = np.array([0.0, 1e-6, 0.3], dtype=np.float32)  # below the normal range: numpy's cast
    np.testing.assert_array_equal(_to_float16(zero_low, 0.0), zero_low.astype(np.float16))


def test_inputs_are_not_modified():
    polygon = np.array([[-5.0, 10.0], [50.0, 10.0], [50.0, 40.0], [-5.0, 40.0]])
    before = polygon.copy()
    make_targets([polygon], [False], 64, 64, CONFIG)
    np.testing.assert_array_equal(polygon, before)


@pytest.mark.parametrize(
    ("polygons", "dont_care", "height", "width", "message"),
    [
        ([RECT], [], 80, 160, "got 1 polygons but 0 don't-care flags; give one flag per polygon"),
        ([RECT.ravel()], [False], 80, 160, "polygon 0: expected (K, 2) points, got shape (8,)"),
        ([RECT, np.zeros((3, 3))], [False, False], 80, 160, "polygon 1: expected (K, 2) points, got shape (3, 3)"),
        ([RECT * np.nan], [False], 80, 160, "polygon 0: coordinates must be finite numbers"),
        ([RECT], [False], 0, 160, "image height must be a positive integer, got 0"),
        ([RECT], [False], 80, 160.0, "image width must be a positive integer, got 160.0"),
    ],
)
def test_malformed_arguments_raise_value_error(polygons, dont_care, height, width, message):
    with pytest.raises(ValueError) as raised:
        make_targets(polygons, dont_care, height, width, CONFIG)
    assert str(raised.value) == message


def test_module_does_not_import_torch():
    code = "import sys, wds_ocr.data.targets; print('torch' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, check=True
    )
    assert result.stdout.strip() == "False"
