"""ICDAR 2015 IoU protocol on axis-aligned rectangles whose IoU is computed by hand."""

from __future__ import annotations

import numpy as np
import pytest

from wds_ocr.eval.metric import DetectionMetric, DetectionScore, ImageCounts, match_image


def rect(x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    """Axis-aligned rectangle, clockwise from top-left."""
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], dtype=np.float64)


def test_perfect_match():
    gts = [rect(0, 0, 10, 10), rect(20, 0, 30, 5)]
    result = match_image(gts, [False, False], [rect(20, 0, 30, 5), rect(0, 0, 10, 10)])

    assert result == ImageCounts(matched=2, gt_care=2, det_care=2, pairs=((0, 1), (1, 0)))
    metric = DetectionMetric()
    metric.update(gts, [False, False], gts)
    assert metric.score() == DetectionScore(
        precision=1.0, recall=1.0, hmean=1.0, matched=2, gt_care=2, det_care=2, images=1
    )


# GT [0,10]x[0,10], detection shifted right by s: IoU = 10(10-s) / (200 - 10(10-s)) = (10-s)/(10+s).
@pytest.mark.parametrize(
    ("shift", "iou", "matched"),
    [
        (3.3, 6.7 / 13.3, 1),  # 0.50376: just above 0.5
        (3.4, 6.6 / 13.4, 0),  # 0.49254: just below 0.5
    ],
)
def test_shifted_box_around_the_iou_threshold(shift, iou, matched):
    assert (iou > 0.5) == bool(matched)
    result = match_image([rect(0, 0, 10, 10)], [False], [rect(shift, 0, 10 + shift, 10)])
    assert (result.matched, result.gt_care, result.det_care) == (matched, 1, 1)


def test_iou_exactly_at_threshold_does_not_match():
    # Intersection 1, union 2: IoU exactly 0.5, and the rule is IoU > 0.5.
    result = match_image([rect(0, 0, 2, 1)], [False], [rect(0, 0, 1, 1)])
    assert result.matched == 0


def test_one_gt_split_into_two_halves_matches_nothing():
    # Each half: intersection 100, union 200 -> IoU 0.5, not above it.
    result = match_image([rect(0, 0, 20, 10)], [False], [rect(0, 0, 10, 10), rect(10, 0, 20, 10)])
    assert result == ImageCounts(matched=0, gt_care=1, det_care=2)


def test_greedy_matching_in_index_order_not_best_iou():
    # GT0 meets det0 first (IoU 8/12) and takes it although det1 is a perfect fit; GT1 then has
    # only det1 (IoU 6/14 = 0.43) and stays unmatched.
    gts = [rect(0, 0, 10, 10), rect(4, 0, 14, 10)]
    dets = [rect(2, 0, 12, 10), rect(0, 0, 10, 10)]
    result = match_image(gts, [False, False], dets)
    assert result == ImageCounts(matched=1, gt_care=2, det_care=2, pairs=((0, 0),))


def test_detection_mostly_inside_a_dont_care_region_is_not_counted():
    gts = [rect(0, 0, 10, 10), rect(20, 0, 40, 10)]  # the second is "###"
    dets = [
        rect(22, 0, 42, 10),  # 180 / 200 = 0.9 of it inside the ### region: don't care
        rect(15, 0, 25, 10),  # 50 / 100 = 0.5 inside: not above 0.5, a false positive
        rect(0, 0, 10, 10),  # matches the care GT
        rect(20, 0, 40, 10),  # exactly the ### region: don't care, never a match
    ]
    result = match_image(gts, [False, True], dets)

    assert result == ImageCounts(
        matched=1, gt_care=1, det_care=2, pairs=((0, 2),), gt_dont_care=(1,), det_dont_care=(0, 3)
    )


def test_area_precision_threshold_is_configurable():
    gts = [rect(0, 0, 10, 10)]
    dets = [rect(5, 0, 15, 10)]  # half inside the ### region
    assert match_image(gts, [True], dets, area_precision_threshold=0.4).det_care == 0
    assert match_image(gts, [True], dets, area_precision_threshold=0.5).det_care == 1


def test_empty_predictions():
    metric = DetectionMetric()
    counts = metric.update([rect(0, 0, 10, 10), rect(20, 0, 30, 10)], [False, False], [])

    assert counts == ImageCounts(matched=0, gt_care=2, det_care=0)
    assert metric.score() == DetectionScore(
        precision=0.0, recall=0.0, hmean=0.0, matched=0, gt_care=2, det_care=0, images=1
    )


def test_empty_ground_truth_with_detections():
    metric = DetectionMetric()
    metric.update([], [], [rect(0, 0, 10, 10), rect(20, 0, 30, 10)])
    assert metric.score() == DetectionScore(
        precision=0.0, recall=0.0, hmean=0.0, matched=0, gt_care=0, det_care=2, images=1
    )


def test_empty_ground_truth_without_detections():
    metric = DetectionMetric()
    assert metric.update([], [], []) == ImageCounts(matched=0, gt_care=0, det_care=0)
    assert metric.score() == DetectionScore(
        precision=0.0, recall=0.0, hmean=0.0, matched=0, gt_care=0, det_care=0, images=1
    )


def test_empty_metric_scores_zero():
    assert DetectionMetric().score() == DetectionScore(0.0, 0.0, 0.0, 0, 0, 0, 0)


def _images() -> list[tuple[list[np.ndarray], list[bool], list[np.ndarray]]]:
    """Image A: 1 GT, 1 det, 1 match (P = R = 1). Image B: 3 GT, 4 dets, 1 match (P 1/4, R 1/3).
    Image C: a ### region and a detection inside it only (counts nothing)."""
    image_a = ([rect(0, 0, 10, 10)], [False], [rect(0, 0, 10, 10)])
    image_b = (
        [rect(0, 0, 10, 10), rect(20, 0, 30, 10), rect(40, 0, 50, 10)],
        [False, False, False],
        [rect(0, 0, 10, 10), rect(60, 0, 70, 10), rect(80, 0, 90, 10), rect(100, 0, 110, 10)],
    )
    image_c = ([rect(0, 0, 10, 10)], [True], [rect(1, 1, 9, 9)])
    return [image_a, image_b, image_c]


def test_aggregation_is_global_not_a_mean_of_images():
    metric = DetectionMetric()
    for image in _images():
        metric.update(*image)

    precision, recall = 2 / 5, 2 / 4
    assert metric.score() == DetectionScore(
        precision=precision,
        recall=recall,
        hmean=2 * precision * recall / (precision + recall),
        matched=2,
        gt_care=4,
        det_care=5,
        images=3,
    )
    mean_of_image_precisions = (1 + 1 / 4) / 2
    assert metric.score().precision != mean_of_image_precisions


def test_merge_equals_one_accumulator_over_all_images():
    images = _images()
    whole = DetectionMetric()
    for image in images:
        whole.update(*image)
    first, second = DetectionMetric(), DetectionMetric()
    first.update(*images[0])
    for image in images[1:]:
        second.update(*image)

    first.merge(second)
    assert first == whole
    assert first.score() == whole.score()
    assert first.counts() == (2, 4, 5, 3)


def test_counts_round_trip_through_from_counts():
    metric = DetectionMetric(iou_threshold=0.7)
    for image in _images():
        metric.update(*image)
    rebuilt = DetectionMetric.from_counts(*metric.counts(), iou_threshold=0.7)
    assert rebuilt == metric
    assert DetectionMetric.from_counts(2.0, 4, 5, 3).counts() == (2, 4, 5, 3)


def test_from_counts_and_merge_reject_inconsistent_input():
    with pytest.raises(ValueError, match=r"matched \(3\) cannot exceed gt_care \(2\) or det_care \(5\)"):
        DetectionMetric.from_counts(3, 2, 5, 1)
    with pytest.raises(ValueError, match=r"images must be a non-negative whole number, got -1"):
        DetectionMetric.from_counts(0, 0, 0, -1)
    with pytest.raises(ValueError, match=r"gt_care must be a non-negative whole number, got 2.5"):
        DetectionMetric.from_counts(0, 2.5, 0, 1)
    with pytest.raises(ValueError, match=r"different thresholds: iou 0.5 vs 0.7"):
        DetectionMetric().merge(DetectionMetric(iou_threshold=0.7))


def test_rotated_quadrilaterals_match():
    diamond = np.array([[5, 0], [10, 5], [5, 10], [0, 5]], dtype=np.float64)
    result = match_image([diamond], [False], [diamond + [0.5, 0.0]])
    assert (result.matched, result.gt_care, result.det_care) == (1, 1, 1)


def test_self_intersecting_polygon_is_repaired_not_dropped():
    # Corners 2 and 3 swapped: a bow-tie of two triangles with 50 of the square's 100 area.
    bowtie = np.array([[0, 0], [10, 0], [0, 10], [10, 10]], dtype=np.float64)
    result = match_image([bowtie], [False], [rect(0, 0, 10, 10)])
    # IoU = 50 / 100 = 0.5: counted, not matched.
    assert result == ImageCounts(matched=0, gt_care=1, det_care=1)
    # Half of the detection lies in the repaired ### bow-tie: 0.5 is not above 0.5.
    assert match_image([bowtie], [True], [rect(0, 0, 10, 10)]).det_care == 1
    # 20 of this 24-area box lies in the top triangle: 0.83 inside, don't care.
    assert match_image([bowtie], [True], [rect(2, 0, 8, 4)]).det_care == 0


def test_polygons_without_area_are_dropped_from_the_counts():
    gts = [rect(0, 0, 10, 10), np.array([[0, 0], [5, 5], [10, 10], [2, 2]]), rect(3, 3, 3, 3)]
    dets = [rect(0, 0, 10, 0), rect(0, 0, 10, 10), np.array([[0, 0], [1, 1]]), np.full((4, 2), np.nan)]
    result = match_image(gts, [False, False, True], dets)
    assert result == ImageCounts(
        matched=1,
        gt_care=1,
        det_care=1,
        pairs=((0, 1),),
        gt_dropped=(1, 2),
        det_dropped=(0, 2, 3),
    )


def test_mismatched_flags_and_bad_thresholds_raise():
    with pytest.raises(ValueError, match=r"2 ground-truth polygons but 1 don't-care flags"):
        match_image([rect(0, 0, 1, 1), rect(2, 2, 3, 3)], [False], [])
    with pytest.raises(ValueError, match=r"iou_threshold must lie in \[0, 1\], got 1.5"):
        match_image([], [], [], iou_threshold=1.5)


def test_accepts_arrays_and_lists():
    gts = np.stack([rect(0, 0, 10, 10), rect(20, 0, 30, 10)])
    flags = np.array([False, True])
    dets = [rect(0, 0, 10, 10).tolist()]
    assert match_image(gts, flags, dets) == ImageCounts(
        matched=1, gt_care=1, det_care=1, pairs=((0, 0),), gt_dont_care=(1,)
    )
