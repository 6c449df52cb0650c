"""CLEval (wds_ocr.eval.cleval) on hand cases: axis-aligned boxes whose pseudo characters are easy to place.

A ground-truth box [0, 50] x [0, 10] transcribed "HELLO" has 5 pseudo characters whose centres lie
on its middle line at x = 5, 15, 25, 35, 45. A detection earns the characters whose centres it
contains (once matched: its area precision over the word must be at least 0.3); splitting a word
over k detections costs k - 1 in recall, merging k words into one detection k - 1 in precision; an
unmatched detection counts round(0.5 + 1 / aspect) false-positive characters (aspect = width /
height, at most 10).
"""

from __future__ import annotations

import sys

import numpy as np
import pytest

from wds_ocr.errors import ConfigError
from wds_ocr.eval.cleval import CLEvalCounts, CLEvalScore, require_cleval

pytest.importorskip("cleval", reason="the optional cleval package is not installed")

from wds_ocr.eval.cleval import cleval_image  # noqa: E402


def rect(x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], dtype=np.float64)


WORD = rect(0, 0, 50, 10)


def test_a_perfect_detection_earns_every_character():
    counts = cleval_image([WORD], [False], ["HELLO"], [WORD])
    assert counts == CLEvalCounts(char_gt=5, char_det=5, tp_recall=5, tp_precision=5)
    assert counts.score() == CLEvalScore(1.0, 1.0, 1.0, counts)


def test_a_partial_detection_earns_the_characters_it_covers():
    # [0, 30] holds the centres 5, 15, 25: recall 3/5; all its claimed characters are right.
    counts = cleval_image([WORD], [False], ["HELLO"], [rect(0, 0, 30, 10)])
    assert counts == CLEvalCounts(char_gt=5, char_det=3, tp_recall=3, tp_precision=3)
    assert (counts.score().precision, counts.score().recall) == (1.0, 0.6)


def test_a_split_word_pays_one_character_of_recall():
    counts = cleval_image([WORD], [False], ["HELLO"], [rect(0, 0, 25, 10), rect(25, 0, 50, 10)])
    assert counts == CLEvalCounts(char_gt=5, char_det=5, tp_recall=5, gran_recall=1.0, tp_precision=5, splits=1)
    score = counts.score()
    assert (score.precision, score.recall) == (1.0, 0.8) and score.hmean == pytest.approx(2 * 0.8 / 1.8)


def test_two_merged_words_pay_one_character_of_precision():
    counts = cleval_image([WORD, rect(60, 0, 90, 10)], [False, False], ["HELLO", "abc"], [rect(0, 0, 90, 10)])
    assert counts == CLEvalCounts(char_gt=8, char_det=8, tp_recall=8, tp_precision=8, gran_precision=1.0, merges=1)
    assert (counts.score().precision, counts.score().recall) == (7 / 8, 1.0)


def test_an_unmatched_detection_counts_false_positive_characters_from_its_aspect():
    # 10 wide, 30 high: aspect 1/3, round(0.5 + 3) = 3 characters (round(3.49999): 1e-5 in the formula).
    counts = cleval_image([WORD], [False], ["HELLO"], [rect(200, 0, 210, 30)])
    assert counts == CLEvalCounts(char_gt=5, char_det=3, char_fp=3)
    assert counts.score() == CLEvalScore(0.0, 0.0, 0.0, counts)


def test_detections_in_dont_care_regions_count_neither_way():
    counts = cleval_image([WORD, rect(100, 0, 130, 10)], [False, True], ["HELLO", "###"], [rect(100, 0, 130, 10)])
    assert counts == CLEvalCounts(char_gt=5)
    assert cleval_image([WORD], [False], ["HELLO"], []) == CLEvalCounts(char_gt=5)


def test_counts_add_and_survive_a_round_trip_through_a_list():
    a = cleval_image([WORD], [False], ["HELLO"], [rect(0, 0, 25, 10), rect(25, 0, 50, 10)])
    b = cleval_image([WORD], [False], ["HELLO"], [rect(0, 0, 30, 10)])
    total = a + b
    assert total == CLEvalCounts(char_gt=10, char_det=8, tp_recall=8, gran_recall=1.0, tp_precision=8, splits=1)
    assert total.score().recall == (8 - 1) / 10 and total.score().precision == 1.0
    assert CLEvalCounts.from_list(total.as_list()) == total
    with pytest.raises(ValueError, match="CLEval counts need 10 numbers, got 3"):
        CLEvalCounts.from_list([1, 2, 3])


def test_polygons_with_more_than_four_points_are_scored_as_their_minimum_rectangle():
    hexagon = np.array([[0, 0], [25, 0], [50, 0], [50, 10], [25, 10], [0, 10]], dtype=np.float64)
    assert cleval_image([hexagon], [False], ["HELLO"], [WORD]) == cleval_image([WORD], [False], ["HELLO"], [WORD])
    assert cleval_image([WORD], [False], ["HELLO"], [hexagon]).tp_recall == 5
    with pytest.raises(ValueError, match="1 ground-truth polygons, 1 don't-care flags and 2 transcriptions"):
        cleval_image([WORD], [False], ["a", "b"], [])


def test_a_missing_package_is_a_config_error_saying_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "cleval.eval_functions", None)
    with pytest.raises(ConfigError, match=r"--metric cleval needs the cleval package, which cannot be imported here "
                                          r"\(ModuleNotFoundError: .*\); install it with pip install "
                                          r"'wds-ocr\[cleval\]' \(or pip install cleval\)"):
        require_cleval()
