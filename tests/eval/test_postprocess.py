"""DB post-processing on synthetic probability maps, with expected boxes computed by hand.

A filled block of pixels covering columns x0..x1 and rows y0..y1 (inclusive) has the contour
rectangle [x0, x1] x [y0, y1] (cv2: a pixel's index is its coordinate), so width w = x1 - x0 and
height h = y1 - y0. Unclipping grows it by d = (w * h) * 1.5 / (2 * (w + h)) on every side.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from wds_ocr.config import PostprocessConfig
from wds_ocr.eval.postprocess import Detection, boxes_from_prob, map_polygons

CONFIG = PostprocessConfig(thresh=0.3, box_thresh=0.6, unclip_ratio=1.5, min_size=3, max_candidates=1000)

# Block A: rows 20..39, columns 30..89 -> w = 59, h = 19, area 1121, perimeter 156.
D_A = 1121 * 1.5 / 156  # 10.778846...
# Block B: rows 80..99, columns 20..49 -> w = 29, h = 19, area 551, perimeter 96.
D_B = 551 * 1.5 / 96  # 8.609375


def _two_blocks() -> np.ndarray:
    prob = np.zeros((128, 160), dtype=np.float32)
    prob[20:40, 30:90] = 0.9
    prob[80:100, 20:50] = 0.9
    return prob


def _bounds(detection: Detection) -> tuple[float, float, float, float]:
    xs, ys = detection.polygon[:, 0], detection.polygon[:, 1]
    return float(xs.min()), float(ys.min()), float(xs.max()), float(ys.max())


def _by_top(detections: list[Detection]) -> list[Detection]:
    return sorted(detections, key=lambda det: det.polygon[:, 1].min())


def test_two_blocks_give_two_boxes_grown_by_the_unclip_distance():
    detections = _by_top(boxes_from_prob(_two_blocks(), CONFIG))

    assert len(detections) == 2
    expected = [
        (30 - D_A, 20 - D_A, 89 + D_A, 39 + D_A),  # (19.22, 9.22, 99.78, 49.78)
        (20 - D_B, 80 - D_B, 49 + D_B, 99 + D_B),  # (11.39, 71.39, 57.61, 107.61)
    ]
    for detection, bounds in zip(detections, expected):
        assert _bounds(detection) == pytest.approx(bounds, abs=0.01)
        assert detection.score == pytest.approx(0.9, abs=1e-6)


def test_box_is_float64_clockwise_from_top_left_and_read_only():
    detection = _by_top(boxes_from_prob(_two_blocks(), CONFIG))[0]
    polygon = detection.polygon
    x_min, y_min, x_max, y_max = _bounds(detection)

    assert polygon.shape == (4, 2)
    assert polygon.dtype == np.float64
    assert polygon.tolist() == [[x_min, y_min], [x_max, y_min], [x_max, y_max], [x_min, y_max]]
    with pytest.raises(ValueError):
        polygon[0, 0] = 0.0


def test_rotated_block_keeps_its_orientation():
    prob = np.zeros((200, 200), dtype=np.float32)
    corners = np.array([[60, 40], [160, 100], [140, 133], [40, 73]], dtype=np.int32)
    cv2.fillPoly(prob, [corners], 0.95)
    (detection,) = boxes_from_prob(prob, CONFIG)
    top_left, top_right, bottom_right, bottom_left = detection.polygon

    # Long side runs down-right at about atan(60 / 100) = 31 degrees.
    angle = np.degrees(np.arctan2(top_right[1] - top_left[1], top_right[0] - top_left[0]))
    assert angle == pytest.approx(31.0, abs=2.0)
    assert top_left[0] < top_right[0] and bottom_left[0] < bottom_right[0]
    assert top_left[1] < bottom_left[1] and top_right[1] < bottom_right[1]


def test_low_score_blob_is_dropped_by_box_thresh():
    prob = _two_blocks()
    prob[50:70, 100:150] = 0.5  # above thresh 0.3, below box_thresh 0.6

    assert len(boxes_from_prob(prob, CONFIG)) == 2
    lenient = boxes_from_prob(prob, CONFIG.model_copy(update={"box_thresh": 0.45}))
    assert len(lenient) == 3


def test_tiny_blob_is_dropped_by_min_size():
    prob = _two_blocks()
    prob[5:7, 140:142] = 0.9  # 2x2 pixels: contour rectangle 1 x 1, short side 1 < 3
    prob[110:125, 140:142] = 0.9  # 2x15 pixels: short side 1 < 3

    assert len(boxes_from_prob(prob, CONFIG)) == 2
    # min_size 0: the strip (1 x 14, d = 14 * 1.5 / 30 = 0.7) grows to 2.4 wide >= 0 + 2 and stays;
    # the blob (1 x 1, d = 1 * 1.5 / 4 = 0.375) grows to 1.75 < 2 and is still dropped.
    kept = boxes_from_prob(prob, CONFIG.model_copy(update={"min_size": 0.0}))
    assert len(kept) == 3


def test_max_candidates_limits_the_contours_considered():
    limited = boxes_from_prob(_two_blocks(), CONFIG.model_copy(update={"max_candidates": 1}))
    assert len(limited) == 1


def test_padding_is_ignored_and_boxes_are_clipped_to_the_valid_region():
    prob = np.zeros((128, 160), dtype=np.float32)
    prob[100:120, 120:150] = 0.9  # entirely in the padding
    prob[20:40, 70:130] = 0.9  # straddles the valid edge at x = 100

    assert len(boxes_from_prob(prob, CONFIG)) == 2
    (detection,) = boxes_from_prob(prob, CONFIG, valid=(100, 90))

    # Only columns 70..99 remain: w = 29, h = 19, d = 8.609375; the right side is clipped to 100.
    assert _bounds(detection) == pytest.approx((70 - D_B, 20 - D_B, 100.0, 39 + D_B), abs=0.01)
    assert _bounds(detection)[2] == 100.0
    assert prob[100, 120] == pytest.approx(0.9)  # the caller's map is not modified


def test_boxes_are_clipped_to_the_map():
    prob = np.zeros((64, 64), dtype=np.float32)
    prob[0:20, 0:30] = 0.9

    (detection,) = boxes_from_prob(prob, CONFIG)
    x_min, y_min, x_max, y_max = _bounds(detection)
    d = 29 * 19 * 1.5 / 96
    assert (x_min, y_min) == (0.0, 0.0)
    assert (x_max, y_max) == pytest.approx((29 + d, 19 + d), abs=0.01)


def test_empty_map_gives_no_detections():
    assert boxes_from_prob(np.zeros((32, 32), dtype=np.float32), CONFIG) == []


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match=r"2-D \(H, W\) map, got shape \(1, 32, 32\)"):
        boxes_from_prob(np.zeros((1, 32, 32), dtype=np.float32), CONFIG)
    message = r"valid region \(40, 33\) does not fit a map of width 32, height 32"
    with pytest.raises(ValueError, match=message):
        boxes_from_prob(np.zeros((32, 32), dtype=np.float32), CONFIG, valid=(40, 33))


def test_map_polygons_applies_scale_and_offset_inverse():
    # Forward: x' = 0.5 x + 10, y' = 0.5 y + 20; the inverse maps the map frame back.
    forward = np.array([[0.5, 0.0, 10.0], [0.0, 0.5, 20.0], [0.0, 0.0, 1.0]])
    inverse = np.array([[2.0, 0.0, -20.0], [0.0, 2.0, -40.0], [0.0, 0.0, 1.0]])
    square = np.array([[30, 40], [50, 40], [50, 60], [30, 60]])

    (mapped,) = map_polygons([square], inverse)
    assert mapped.dtype == np.float64
    assert mapped.tolist() == [[40.0, 40.0], [80.0, 40.0], [80.0, 80.0], [40.0, 80.0]]
    (back,) = map_polygons([mapped], forward)
    assert back.tolist() == square.tolist()


def test_map_polygons_divides_by_the_projective_weight():
    doubled_weight = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 2.0]])
    (mapped,) = map_polygons([np.array([[4.0, 6.0], [8.0, 2.0]])], doubled_weight)
    assert mapped.tolist() == [[2.0, 3.0], [4.0, 1.0]]
    assert map_polygons([], doubled_weight) == []
    with pytest.raises(ValueError, match=r"matrix must be 3x3, got shape \(2, 3\)"):
        map_polygons([np.zeros((4, 2))], np.zeros((2, 3)))


# ---------------------------------------------------------------- mode "db": MhLiao/DB's definitions
#
# DB (SegDetectorRepresenter.boxes_from_bitmap): get_mini_boxes orders cv2.boxPoints (float32) by x
# and takes, of each pair, the lower-indexed one as the top corner only when its y is strictly
# smaller; box_score_fast fills its mask from the corners minus (floor x, floor y) *truncated* to
# int32; unclip offsets the corners as pyclipper receives them (truncated to integers) by
# area * ratio / perimeter, returning integer points; the final corners are scaled by
# dest / map size, rounded and clipped to [0, dest].

DB = CONFIG.model_copy(update={"mode": "db"})


def test_db_mode_gives_db_boxes_for_two_blocks():
    # Block A: corners (30, 20)..(89, 39) exactly, d = 10.778846: the integer offset path has its
    # straight edges at round(30 - d) = 19, round(89 + d) = 100, round(20 - d) = 9, round(39 + d) = 50.
    # Block B: (20, 80)..(49, 99), d = 8.609375: edges 11, 58, 71, 108.
    detections = _by_top(boxes_from_prob(_two_blocks(), DB))
    assert [d.polygon.tolist() for d in detections] == [
        [[19.0, 9.0], [100.0, 9.0], [100.0, 50.0], [19.0, 50.0]],
        [[11.0, 71.0], [58.0, 71.0], [58.0, 108.0], [11.0, 108.0]],
    ]
    # cv2.mean of float32 0.9 (0.89999998), summed in float64
    assert [d.score for d in detections] == [pytest.approx(float(np.float32(0.9)), abs=1e-12)] * 2
    assert all(d.polygon.dtype == np.float64 and not d.polygon.flags.writeable for d in detections)


def test_db_mode_scales_to_dest_before_rounding():
    (first, _) = _by_top(boxes_from_prob(_two_blocks(), DB, dest=(320, 256)))
    assert first.polygon.tolist() == [[38.0, 18.0], [200.0, 18.0], [200.0, 100.0], [38.0, 100.0]]
    with pytest.raises(ValueError, match="dest applies to postprocess.mode 'db' only"):
        boxes_from_prob(_two_blocks(), CONFIG, dest=(320, 256))


def test_box_score_truncates_in_db_mode_and_rounds_in_wds_mode():
    from wds_ocr.eval.postprocess import _db_score, _mean_inside

    # prob[y, x] = x / 10. The box spans x 2.7..7.9, y 1.2..4.8: its bounding rectangle starts at
    # (2, 1), so the mask corners are (0.7, 0.2)..(5.9, 3.8) relative to it. DB truncates them to
    # (0, 0)..(5, 3): columns x = 2..7, mean 0.45; wds rounds them to (1, 0)..(6, 4): x = 3..8, 0.55.
    ramp = np.tile((np.arange(12) / 10).astype(np.float32), (8, 1))
    box = np.array([[2.7, 1.2], [7.9, 1.2], [7.9, 4.8], [2.7, 4.8]], dtype=np.float32)
    assert _db_score(ramp, box) == pytest.approx(0.45, abs=1e-7)
    assert _mean_inside(ramp, box.astype(np.float64)) == pytest.approx(0.55, abs=1e-7)


def test_unclip_truncates_to_whole_pixels_in_db_mode_and_keeps_fractions_in_wds_mode():
    from wds_ocr.eval.postprocess import _db_mini_box, _db_unclip, _min_area_box, _unclip

    # A 20 x 10 box at (10.6, 10.6): d = 200 * 1.5 / 60 = 5. DB offsets the truncated corners
    # (10, 10)..(30, 20) to (5, 5)..(35, 25); wds offsets the exact ones to 5.6..35.6 (at 1/256 px).
    box = np.array([[10.6, 10.6], [30.6, 10.6], [30.6, 20.6], [10.6, 20.6]], dtype=np.float32)
    grown, short_side = _db_mini_box(_db_unclip(box, 1.5))
    assert grown.tolist() == [[5.0, 5.0], [35.0, 5.0], [35.0, 25.0], [5.0, 25.0]] and short_side == 20.0
    exact, _ = _min_area_box(_unclip(box.astype(np.float64), 1.5))
    assert exact[0].tolist() == pytest.approx([5.6, 5.6], abs=0.01)
    assert exact[2].tolist() == pytest.approx([35.6, 25.6], abs=0.01)


def test_db_corner_order_follows_db_tie_rule():
    from wds_ocr.eval.postprocess import _db_mini_box

    # A 45-degree square: sorted by x the corners are (0, 10), then (10, 0) and (10, 20) (stable
    # order of cv2.boxPoints), then (20, 10).
    diamond = np.array([[10, 0], [20, 10], [10, 20], [0, 10]], dtype=np.int32).reshape(-1, 1, 2)
    corners, side = _db_mini_box(diamond)
    assert side == pytest.approx(np.hypot(10, 10), abs=1e-4)
    top_left, top_right, bottom_right, bottom_left = corners.tolist()
    assert top_left[1] < bottom_left[1] and top_right[1] < bottom_right[1]
    # A degenerate (zero-height) box: the two left corners share y, and DB then takes the second.
    flat = np.array([[3, 5], [9, 5]], dtype=np.int32).reshape(-1, 1, 2)
    corners, side = _db_mini_box(flat)
    assert side == 0.0 and corners[:, 1].tolist() == [5.0, 5.0, 5.0, 5.0]


def test_db_and_wds_modes_drop_the_same_small_and_faint_regions():
    prob = _two_blocks()
    prob[50:70, 100:150] = 0.5  # above thresh, below box_thresh
    prob[5:7, 140:142] = 0.9  # short side 1 < min_size
    assert len(boxes_from_prob(prob, DB)) == len(boxes_from_prob(prob, CONFIG)) == 2
    assert boxes_from_prob(np.zeros((32, 32), dtype=np.float32), DB) == []


def test_valid_region_is_a_view_not_a_copy_and_empty_regions_give_nothing():
    prob = _two_blocks()
    assert boxes_from_prob(prob, CONFIG, valid=(0, 0)) == []
    (kept,) = boxes_from_prob(prob, DB, valid=(100, 60))  # block A only, right edge clipped to 100
    assert kept.polygon.tolist() == [[19.0, 9.0], [100.0, 9.0], [100.0, 50.0], [19.0, 50.0]]


def test_min_unclip_gives_a_single_glyph_kernel_a_box_its_word_can_match() -> None:
    """A 3 x 6 px kernel (a "1" at 1600 px; its contour through the pixel centres is 2 x 5): DB's
    distance (area * 1.3 / perimeter = 0.93 px) leaves a 3.9 px wide box, under min_size + 2;
    min_unclip=4 grows it to 10 x 13."""
    prob = np.zeros((40, 40), dtype=np.float32)
    prob[17:23, 19:22] = 0.9  # 3 wide, 6 high
    db_rule = PostprocessConfig(thresh=0.3, box_thresh=0.5, unclip_ratio=1.3, min_size=2)
    assert boxes_from_prob(prob, db_rule) == []
    grown = boxes_from_prob(prob, db_rule.model_copy(update={"min_unclip": 4.0}))
    assert len(grown) == 1
    xs, ys = grown[0].polygon[:, 0], grown[0].polygon[:, 1]
    assert xs.max() - xs.min() == pytest.approx(2 + 8, abs=0.1) and ys.max() - ys.min() == pytest.approx(5 + 8, abs=0.1)
    assert grown[0].score == pytest.approx(0.9)
    line = np.zeros((40, 200), dtype=np.float32)
    line[15:25, 20:180] = 0.9  # a text line: DB's distance (about 5.9 px) is above min_unclip, nothing changes
    same = [d.polygon.tolist() for d in boxes_from_prob(line, db_rule)]
    assert [d.polygon.tolist() for d in boxes_from_prob(line, db_rule.model_copy(update={"min_unclip": 4.0}))] == same


def test_min_unclip_is_refused_with_db_mode() -> None:
    with pytest.raises(ValueError, match="postprocess.min_unclip applies to mode 'wds' only"):
        PostprocessConfig(mode="db", min_unclip=2.0)


def _lines_and_a_glyph(lines: int) -> np.ndarray:
    """``lines`` text-line kernels 10 px high and 140 wide, and a lone 4 x 8 px glyph kernel below."""
    prob = np.zeros((130, 200), dtype=np.float32)
    for i in range(lines):
        prob[10 + 30 * i : 20 + 30 * i, 40:180] = 0.9
    prob[104:112, 20:24] = 0.9
    return prob


def _extent(polygon: np.ndarray) -> tuple[float, float, float, float]:
    xs, ys = polygon[:, 0], polygon[:, 1]
    return float(xs.max() - xs.min()), float(ys.max() - ys.min()), float(xs.mean()), float(ys.mean())


def test_glyph_height_grows_a_lone_glyph_to_the_text_height_and_leaves_lines_alone() -> None:
    rule = PostprocessConfig(thresh=0.3, box_thresh=0.5, unclip_ratio=1.5, min_size=2)
    prob = _lines_and_a_glyph(3)
    plain = boxes_from_prob(prob, rule)
    grown = boxes_from_prob(prob, rule.model_copy(update={"glyph_height": 0.9}))
    assert len(plain) == len(grown) == 4
    glyph = min(range(4), key=lambda i: _extent(plain[i].polygon)[0])
    line_height = _extent(plain[(glyph + 1) % 4].polygon)[1]
    assert line_height == pytest.approx(9 + 2 * 139 * 9 * 1.5 / (2 * 148), abs=0.1)  # DB's unclip of a line
    width, high, cx, cy = _extent(plain[glyph].polygon)
    assert high < 0.6 * line_height  # DB's box of the glyph: half the line's height
    new_width, new_high, new_cx, new_cy = _extent(grown[glyph].polygon)
    assert new_high == pytest.approx(0.9 * line_height, abs=1e-6)
    assert (new_width, new_cx, new_cy) == pytest.approx((width, cx, cy), abs=1e-6)
    assert grown[glyph].score == plain[glyph].score
    for i in range(4):
        if i != glyph:
            assert grown[i].polygon.tolist() == plain[i].polygon.tolist()
    # A box counts as a glyph only under glyph_size x the text height; a box already as high is kept.
    assert boxes_from_prob(prob, rule.model_copy(update={"glyph_height": 0.9, "glyph_size": 0.4}))[glyph].polygon.tolist() \
        == plain[glyph].polygon.tolist()
    assert boxes_from_prob(prob, rule.model_copy(update={"glyph_height": 0.3}))[glyph].polygon.tolist() \
        == plain[glyph].polygon.tolist()


def test_glyph_height_needs_three_text_lines_and_mode_wds() -> None:
    rule = PostprocessConfig(thresh=0.3, box_thresh=0.5, unclip_ratio=1.5, min_size=2)
    prob = _lines_and_a_glyph(2)  # two lines: no text height to trust
    same = [d.polygon.tolist() for d in boxes_from_prob(prob, rule)]
    assert [d.polygon.tolist() for d in boxes_from_prob(prob, rule.model_copy(update={"glyph_height": 0.9}))] == same
    with pytest.raises(ValueError, match="postprocess.glyph_height applies to mode 'wds' only"):
        PostprocessConfig(mode="db", glyph_height=0.8)


def test_glyph_height_grows_across_the_text_direction_on_a_rotated_receipt() -> None:
    rule = PostprocessConfig(thresh=0.3, box_thresh=0.5, unclip_ratio=1.5, min_size=2)
    upright = np.zeros((260, 260), dtype=np.float32)
    upright[65:195, 30:230] = _lines_and_a_glyph(3)
    turn = cv2.getRotationMatrix2D((130.0, 130.0), 20.0, 1.0)
    prob = cv2.warpAffine(upright, turn, (260, 260), flags=cv2.INTER_NEAREST)
    plain = boxes_from_prob(prob, rule)
    grown = boxes_from_prob(prob, rule.model_copy(update={"glyph_height": 0.9}))
    assert len(plain) == len(grown) == 4
    sides = [np.linalg.norm(np.diff(np.vstack([d.polygon, d.polygon[:1]]), axis=0), axis=1) for d in plain]
    glyph = int(np.argmin([s.max() for s in sides]))
    line = (glyph + 1) % 4
    edges = np.diff(np.vstack([plain[line].polygon, plain[line].polygon[:1]]), axis=0)
    along = edges[int(np.argmax(sides[line]))] / sides[line].max()
    across = np.array([-along[1], along[0]])
    text_height = float(np.median([s.min() for i, s in enumerate(sides) if i != glyph]))
    before, after = plain[glyph].polygon @ across, grown[glyph].polygon @ across
    assert before.max() - before.min() < 0.6 * text_height
    assert after.max() - after.min() == pytest.approx(0.9 * text_height, abs=0.1)
    assert after.mean() == pytest.approx(before.mean(), abs=0.1)  # centred where the glyph is
    width_before, width_after = plain[glyph].polygon @ along, grown[glyph].polygon @ along
    assert width_after.max() - width_after.min() == pytest.approx(width_before.max() - width_before.min(), abs=0.5)
