"""The live pipeline on one sample: shapes, metadata, word geometry checks, annotation frames, real receipts."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from wds_ocr.config import Config, load_config
from wds_ocr.data.geometry import apply_matrix, plan_resize, resize_and_pad
from wds_ocr.data.images import decode_canonical, read_orientation
from wds_ocr.data.orientation import ORIENTATIONS, inverse_orientation, orient_array
from wds_ocr.data.pipeline import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    check_word_geometry,
    normalize_image,
    polygon_area,
    process_sample,
)
from wds_ocr.data.sources import Skip, SourceSample, Word, list_source
from wds_ocr.errors import SampleError

WIDTH, HEIGHT = 200, 100


def _box(x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], dtype=np.float64)


def _page() -> np.ndarray:
    """White 200x100 page with two dark text bars."""
    pixels = np.full((HEIGHT, WIDTH, 3), 255, dtype=np.uint8)
    pixels[20:40, 20:120] = 30
    pixels[60:80, 100:190] = 30
    return pixels


def _png(pixels: np.ndarray, orientation: int | None = None) -> bytes:
    image = Image.fromarray(pixels)
    options = {}
    if orientation is not None:
        exif = image.getexif()
        exif[0x0112] = orientation
        options["exif"] = exif
    buffer = io.BytesIO()
    image.save(buffer, "PNG", **options)
    return buffer.getvalue()


def _sample(path: Path, words: list[Word], skips: tuple[Skip, ...] = (), index: int = 3) -> SourceSample:
    return SourceSample(index, path.name, path, tuple(words), skips)


@pytest.fixture
def page_file(tmp_path: Path) -> Path:
    path = tmp_path / "page.v2.png"
    path.write_bytes(_png(_page()))
    return path


def _config(*overrides: str) -> Config:
    return load_config(None, ["transform.size=128", *overrides])


# ----------------------------------------------------------------------------- one synthetic sample


def test_process_sample_shapes_and_metadata(page_file: Path) -> None:
    words = [
        Word("a", _box(20, 20, 120, 40), "TOTAL", False),
        Word("b", _box(100, 60, 190, 80), "###", True),
    ]
    reading_skip = Skip(page_file.name, "polygon has 2 points, need at least 3", "z")
    processed = process_sample(_sample(page_file, words, (reading_skip,)), _config())
    assert processed.index == 3
    assert processed.image.shape == (128, 128, 3) and processed.image.dtype == np.uint8
    targets = processed.targets
    for name in ("gt", "mask", "thresh_mask"):
        assert getattr(targets, name).shape == (128, 128) and getattr(targets, name).dtype == np.uint8, name
    assert targets.thresh_map.shape == (128, 128) and targets.thresh_map.dtype == np.float16
    assert targets.gt.max() == 1 and targets.mask.min() == 0  # one kept word, one don't-care

    meta = processed.meta
    assert meta.name == "page.v2.png"
    assert meta.source_sha256 == hashlib.sha256(page_file.read_bytes()).hexdigest()
    assert (meta.orientation, meta.stored_size, meta.original_size) == (1, (200, 100), (200, 100))
    assert (meta.resized_size, meta.offset, meta.scale) == ((128, 64), (0, 0), (0.64, 0.64))
    assert (meta.word_ids, meta.texts) == (("a", "b"), ("TOTAL", "###"))
    assert meta.dont_care.tolist() == [False, True] and meta.ignored.tolist() == [False, True]
    np.testing.assert_array_equal(meta.polygons_original[0], _box(20, 20, 120, 40))
    np.testing.assert_allclose(meta.polygons[0], _box(12.8, 12.8, 76.8, 25.6), rtol=0, atol=1e-12)
    assert meta.inverse_matrix.shape == (3, 3) and meta.inverse_matrix.dtype == np.float64
    for transformed, original in zip(meta.polygons, meta.polygons_original):
        np.testing.assert_allclose(apply_matrix(transformed, meta.inverse_matrix), original, rtol=0, atol=1e-9)
    assert processed.skips == (reading_skip,)

    expected = resize_and_pad(_page(), plan_resize(200, 100, _config().transform))
    np.testing.assert_array_equal(processed.image, expected)


def test_center_padding_moves_image_and_polygons_together(page_file: Path) -> None:
    words = [Word("a", _box(20, 20, 120, 40), "x", False)]
    processed = process_sample(_sample(page_file, words), _config("transform.pad=center"))
    meta = processed.meta
    assert meta.offset == (0, 32)
    np.testing.assert_allclose(meta.polygons[0], _box(12.8, 44.8, 76.8, 57.6), rtol=0, atol=1e-12)
    np.testing.assert_allclose(apply_matrix(meta.polygons[0], meta.inverse_matrix), _box(20, 20, 120, 40), atol=1e-9)
    assert (processed.image[:32] == 0).all() and (processed.image[96:] == 0).all()
    assert processed.image[32:96].min() > 0


def test_given_bytes_are_used_instead_of_the_file(page_file: Path, tmp_path: Path) -> None:
    words = [Word("a", _box(20, 20, 120, 40), "x", False)]
    from_file = process_sample(_sample(page_file, words), _config())
    from_bytes = process_sample(_sample(tmp_path / "elsewhere.png", words), _config(), page_file.read_bytes())
    np.testing.assert_array_equal(from_file.image, from_bytes.image)
    np.testing.assert_array_equal(from_file.targets.thresh_map, from_bytes.targets.thresh_map)
    assert from_file.meta.source_sha256 == from_bytes.meta.source_sha256


def test_bad_word_geometry_is_skipped_with_reasons_and_near_misses_are_clipped(page_file: Path) -> None:
    words = [
        Word("flat", _box(20, 20, 120, 20), "line", False),
        Word("far", _box(150, 60, 230, 80), "beyond the right edge", False),
        Word("above", _box(20, -30, 60, -10), "above the page", False),
        Word("sliver", _box(201, 10, 203, 20), "just outside, within tolerance", False),
        Word("near", _box(-3, 20, 120, 103.5), "slightly outside", False),
        Word("edge", _box(-4, -4, 204, 104), "exactly at the tolerance", False),
    ]
    processed = process_sample(_sample(page_file, words), _config())
    assert [(s.name, s.word_id, s.reason) for s in processed.skips] == [
        ("page.v2.png", "flat", "polygon has zero area"),
        ("page.v2.png", "far", "points outside the 200x100 image: x in [150, 230], y in [60, 80] "
                               "(check the annotation frame: source.annotation_frame)"),
        ("page.v2.png", "above", "points outside the 200x100 image: x in [20, 60], y in [-30, -10] "
                                 "(check the annotation frame: source.annotation_frame)"),
        ("page.v2.png", "sliver", "polygon has zero area once clipped to the 200x100 image"),
    ]
    assert processed.meta.word_ids == ("near", "edge")
    np.testing.assert_array_equal(processed.meta.polygons_original[0], _box(0, 20, 120, 100))
    np.testing.assert_array_equal(processed.meta.polygons_original[1], _box(0, 0, 200, 100))


def test_outside_tolerance_comes_from_the_config(page_file: Path) -> None:
    words = [Word("near", _box(-3, 20, 120, 40), "x", False)]
    processed = process_sample(_sample(page_file, words), _config("source.outside_tolerance=2"))
    assert [s.reason for s in processed.skips] == [
        "points outside the 200x100 image: x in [-3, 120], y in [20, 40] "
        "(check the annotation frame: source.annotation_frame)"
    ]
    assert processed.meta.word_ids == ()
    assert processed.targets.gt.max() == 0 and processed.targets.mask.min() == 1


def test_sample_without_words(page_file: Path) -> None:
    processed = process_sample(_sample(page_file, []), _config())
    meta = processed.meta
    assert (meta.word_ids, meta.texts, meta.polygons, meta.polygons_original) == ((), (), (), ())
    assert meta.dont_care.shape == (0,) and meta.ignored.shape == (0,)
    assert processed.targets.gt.max() == 0


def test_missing_and_corrupt_images_raise_sample_error(tmp_path: Path) -> None:
    missing = tmp_path / "gone.jpg"
    with pytest.raises(SampleError) as info:
        process_sample(_sample(missing, []), _config())
    assert (info.value.name, info.value.reason) == (
        "gone.jpg", f"image file not found: {missing}; check the dataset folder and the file name"
    )
    corrupt = tmp_path / "junk.jpg"
    corrupt.write_bytes(b"not an image at all")
    with pytest.raises(SampleError) as info:
        process_sample(_sample(corrupt, []), _config())
    assert info.value.name == "junk.jpg"
    assert info.value.reason.startswith("not an image: the data starts with b'not an i'")
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(_png(_page())[:200])
    with pytest.raises(SampleError, match="truncated PNG"):
        process_sample(_sample(truncated, []), _config())


# ----------------------------------------------------------------------------- annotation frames


def _dark_box(pixels: np.ndarray) -> np.ndarray:
    """Continuous-coordinate bounding box of the dark pixels, found directly in the array."""
    rows, cols = np.nonzero(pixels[:, :, 0] < 128)
    return _box(cols.min(), rows.min(), cols.max() + 1, rows.max() + 1)


def _bounds(points: np.ndarray) -> list[float]:
    return [*points.min(axis=0).tolist(), *points.max(axis=0).tolist()]


@pytest.mark.parametrize("orientation", ORIENTATIONS)
def test_stored_frame_annotations_land_on_the_same_ink(tmp_path: Path, orientation: int) -> None:
    displayed = np.full((80, 120, 3), 255, dtype=np.uint8)
    displayed[20:36, 10:41] = 0  # the only ink: x in [10, 41], y in [20, 36]
    stored = orient_array(displayed, inverse_orientation(orientation))
    path = tmp_path / "tagged.png"
    path.write_bytes(_png(stored, orientation))
    np.testing.assert_array_equal(decode_canonical(path.read_bytes(), path.name).pixels, displayed)

    in_stored_frame = [Word("w", _dark_box(stored), "ink", False)]  # what a tool on the raw pixels sees
    in_displayed_frame = [Word("w", _dark_box(displayed), "ink", False)]
    from_stored = process_sample(_sample(path, in_stored_frame), _config("source.annotation_frame=stored"))
    from_displayed = process_sample(_sample(path, in_displayed_frame), _config())

    assert from_stored.skips == () and from_displayed.skips == ()
    assert from_stored.meta.orientation == orientation
    assert _bounds(from_stored.meta.polygons_original[0]) == [10.0, 20.0, 41.0, 36.0]
    assert _bounds(from_displayed.meta.polygons_original[0]) == [10.0, 20.0, 41.0, 36.0]
    assert abs(polygon_area(from_stored.meta.polygons_original[0])) == 31 * 16
    np.testing.assert_array_equal(from_stored.image, from_displayed.image)
    np.testing.assert_array_equal(from_stored.targets.gt, from_displayed.targets.gt)
    np.testing.assert_array_equal(from_stored.targets.thresh_map, from_displayed.targets.thresh_map)
    # The transformed polygon covers the transformed ink.
    polygon = np.round(from_stored.meta.polygons[0]).astype(np.int32)
    inside = np.zeros((128, 128), dtype=np.uint8)
    cv2.fillPoly(inside, [polygon], 1)
    assert from_stored.image[inside.astype(bool), 0].mean() < 64  # ink, blended with paper along the edges
    assert from_stored.image[:64][~inside[:64].astype(bool), 0].mean() > 240  # the page around it is blank


def test_stored_frame_annotation_read_as_displayed_misses_the_ink(tmp_path: Path) -> None:
    displayed = np.full((80, 120, 3), 255, dtype=np.uint8)
    displayed[20:36, 10:41] = 0
    stored = orient_array(displayed, inverse_orientation(6))
    path = tmp_path / "tagged.png"
    path.write_bytes(_png(stored, 6))
    box = _dark_box(stored)
    assert _bounds(box) == [20.0, 79.0, 36.0, 110.0]  # stored 80 wide, 120 high: the tag turns it clockwise
    processed = process_sample(_sample(path, [Word("w", box, "ink", False)]), _config())
    assert processed.meta.word_ids == ()
    assert [s.reason for s in processed.skips] == [
        "points outside the 120x80 image: x in [20, 36], y in [79, 110] (check the annotation frame: "
        "source.annotation_frame)"
    ]


# ----------------------------------------------------------------------------- helpers


def test_polygon_area_is_signed() -> None:
    assert polygon_area(_box(0, 0, 4, 3)) == 12.0
    assert polygon_area(_box(0, 0, 4, 3)[::-1]) == -12.0
    assert polygon_area(np.array([[0.0, 0.0], [4.0, 0.0], [0.0, 3.0]])) == 6.0
    assert polygon_area(_box(0, 0, 4, 0)) == 0.0


def test_check_word_geometry_boundaries() -> None:
    word = Word("w", _box(0, 0, 1, 1), None, False)
    clipped, skip = check_word_geometry("n", word, _box(-2, -2, 12, 12), 10, 10, 2.0)
    assert skip is None and clipped.tolist() == _box(0, 0, 10, 10).tolist()
    clipped, skip = check_word_geometry("n", word, _box(-2.5, 0, 5, 5), 10, 10, 2.0)
    assert clipped is None
    assert skip == Skip("n", "points outside the 10x10 image: x in [-2.5, 5], y in [0, 5] "
                             "(check the annotation frame: source.annotation_frame)", "w")


def test_normalize_image() -> None:
    image = np.zeros((2, 3, 3), dtype=np.uint8)
    image[1, 2] = (255, 128, 0)
    out = normalize_image(image)
    assert out.shape == (3, 2, 3) and out.dtype == np.float32 and out.flags.c_contiguous
    expected = [(value / 255.0 - mean) / std for value, mean, std in zip((255, 128, 0), IMAGENET_MEAN, IMAGENET_STD)]
    np.testing.assert_allclose(out[:, 1, 2], expected, rtol=1e-6)
    np.testing.assert_allclose(out[:, 0, 0], [-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)], rtol=1e-6)


# ----------------------------------------------------------------------------- real receipts


def _ink_stats(gray: np.ndarray, polygons: tuple[np.ndarray, ...]) -> tuple[float, float, float]:
    """(mean gray inside the boxes, mean gray of the page outside them, share of boxes holding ink)."""
    union = np.zeros(gray.shape, dtype=np.uint8)
    inked = 0
    for polygon in polygons:
        one = np.zeros(gray.shape, dtype=np.uint8)
        cv2.fillPoly(one, [np.round(polygon).astype(np.int32)], 1)
        inked += int(gray[one.astype(bool)].min(initial=255) < 128)
        union |= one
    inside = union.astype(bool)
    return float(gray[inside].mean()), float(gray[~inside].mean()), inked / len(polygons)


def test_real_tagged_receipts_keep_boxes_on_ink(sroie_root: Path) -> None:
    config = Config()
    tagged = []
    for split in ("train", "val"):
        for sample in list_source(sroie_root, split, config.source).samples:
            data = sample.image_path.read_bytes()
            if (orientation := read_orientation(data)) != 1:
                tagged.append((orientation, len(data), sample, data))
    assert len(tagged) == 30
    assert {orientation for orientation, *_ in tagged} == {2, 3, 4, 5, 6, 7, 8}
    # A handful, kept fast: the smallest file of every orientation, and the largest file of all.
    chosen = {orientation: min((t for t in tagged if t[0] == orientation), key=lambda t: t[1])
              for orientation in range(2, 9)}
    picks = [*chosen.values(), max(tagged, key=lambda t: t[1])]
    for orientation, _, sample, data in picks:
        processed = process_sample(sample, config, data)
        meta = processed.meta
        assert meta.orientation == orientation and processed.skips == ()
        assert len(meta.polygons) == len(sample.words)
        width, height = meta.resized_size
        gray = cv2.cvtColor(processed.image, cv2.COLOR_RGB2GRAY)[:height, :width]
        inside, page, inked = _ink_stats(gray, meta.polygons)
        assert inked >= 0.95, (sample.name, inked)
        assert inside < page - 15, (sample.name, inside, page)
        # Wrongly placed boxes (the same boxes mirrored or flipped) sit on much less ink.
        for moved in ([np.stack([width - p[:, 0], p[:, 1]], 1) for p in meta.polygons],
                      [np.stack([p[:, 0], height - p[:, 1]], 1) for p in meta.polygons]):
            assert inside < _ink_stats(gray, tuple(moved))[0] - 5, sample.name
        for transformed, original in zip(meta.polygons, meta.polygons_original):
            np.testing.assert_allclose(apply_matrix(transformed, meta.inverse_matrix), original, rtol=0, atol=1e-9)
