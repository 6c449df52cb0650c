"""The resize + pad transform: planned sizes, pixels, matrices and the continuous-coordinate convention."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from wds_ocr.config import TransformConfig
from wds_ocr.data.geometry import ResizePlan, apply_matrix, plan_resize, resize_and_pad

TOP_LEFT = TransformConfig(size=640, pad="top_left")
CENTER = TransformConfig(size=640, pad="center")


@pytest.mark.parametrize(
    "width, height, resized",
    [
        (1000, 500, (640, 320)),  # landscape
        (500, 1000, (320, 640)),  # portrait
        (777, 777, (640, 640)),  # square
        (640, 480, (640, 480)),  # already the size: untouched
        (4961, 7016, (453, 640)),  # 4961 * 640 / 7016 = 452.53 -> 453
        (7016, 4961, (640, 453)),
        (10, 3, (640, 192)),  # tiny: upscaled
        (3, 10, (192, 640)),
        (1, 1, (640, 640)),
        (100000, 1, (640, 1)),  # never below one pixel
        (1, 100000, (1, 640)),
        (1280, 1, (640, 1)),  # 0.5 -> 1 (half up)
        (1280, 3, (640, 2)),  # 1.5 -> 2 (half up)
        (1280, 5, (640, 3)),  # 2.5 -> 3 (half up, not to even)
        (1280, 7, (640, 4)),  # 3.5 -> 4
        (1279, 3, (640, 2)),  # 1.5012 -> 2
        (2000, 999, (640, 320)),  # 319.68 -> 320
        (2000, 998, (640, 319)),  # 319.36 -> 319
    ],
)
def test_plan_resize_sizes(width: int, height: int, resized: tuple[int, int]) -> None:
    plan = plan_resize(width, height, TOP_LEFT)
    assert plan == ResizePlan((width, height), 640, resized, (0, 0))
    assert max(plan.resized_size) == 640


def test_plan_resize_other_side_is_round_half_up_of_the_exact_ratio() -> None:
    rng = np.random.default_rng(0)
    for width, height in rng.integers(1, 9000, size=(300, 2)):
        plan = plan_resize(int(width), int(height), TransformConfig(size=512))
        long_side, short_side = max(width, height), min(width, height)
        exact = short_side * 512 / long_side
        expected = max(1, int(np.floor(exact + 0.5)))
        assert min(plan.resized_size) == expected and max(plan.resized_size) == 512, (width, height)
        assert (plan.resized_size[0] >= plan.resized_size[1]) == (width >= height)


@pytest.mark.parametrize(
    "width, height, offset",
    [(1000, 500, (0, 160)), (500, 1000, (160, 0)), (777, 777, (0, 0)), (1000, 499, (0, 160)), (1000, 501, (0, 159))],
)
def test_center_padding_offsets(width: int, height: int, offset: tuple[int, int]) -> None:
    # 1000x499 -> 640x319 (319.36): (640 - 319) // 2 = 160; 1000x501 -> 640x321: 159.
    assert plan_resize(width, height, CENTER).offset == offset
    assert plan_resize(width, height, TOP_LEFT).offset == (0, 0)


@pytest.mark.parametrize("width, height", [(0, 5), (5, 0), (-1, 5)])
def test_plan_resize_rejects_empty_images(width: int, height: int) -> None:
    with pytest.raises(ValueError, match=f"image size must be positive, got {width}x{height}"):
        plan_resize(width, height, TOP_LEFT)


def test_plan_resize_rejects_fractional_sizes() -> None:
    with pytest.raises(ValueError, match="image size must be whole pixels, got 10.5x4"):
        plan_resize(10.5, 4, TOP_LEFT)  # type: ignore[arg-type]


def test_scale_is_what_the_pixels_got() -> None:
    plan = plan_resize(4961, 7016, TOP_LEFT)
    assert plan.scale == (453 / 4961, 640 / 7016)


@pytest.mark.parametrize("pad", ["top_left", "center"])
@pytest.mark.parametrize("width, height", [(97, 61), (61, 97), (50, 50), (13, 5), (300, 41)])
def test_resize_and_pad_is_cv2_resize_then_zeros(pad: str, width: int, height: int) -> None:
    rng = np.random.default_rng(width * 1000 + height)
    pixels = rng.integers(1, 256, size=(height, width, 3), dtype=np.uint8)  # never 0: padding is visible
    plan = plan_resize(width, height, TransformConfig(size=64, pad=pad))
    out = resize_and_pad(pixels, plan)
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    (ox, oy), (rw, rh) = plan.offset, plan.resized_size
    expected = cv2.resize(pixels, (rw, rh), interpolation=cv2.INTER_LINEAR)
    np.testing.assert_array_equal(out[oy : oy + rh, ox : ox + rw], expected)
    outside = np.ones((64, 64), dtype=bool)
    outside[oy : oy + rh, ox : ox + rw] = False
    assert (out[outside] == 0).all()
    assert outside.sum() == 64 * 64 - rw * rh


def test_resize_and_pad_rejects_wrong_input() -> None:
    plan = plan_resize(8, 4, TransformConfig(size=32))
    with pytest.raises(ValueError, match=r"expected an \(H, W, 3\) uint8 image, got float32 \(4, 8, 3\)"):
        resize_and_pad(np.zeros((4, 8, 3), dtype=np.float32), plan)
    with pytest.raises(ValueError, match=r"expected an \(H, W, 3\) uint8 image, got uint8 \(4, 8\)"):
        resize_and_pad(np.zeros((4, 8), dtype=np.uint8), plan)
    with pytest.raises(ValueError, match=r"image is 4x8, plan is for \(8, 4\)"):
        resize_and_pad(np.zeros((8, 4, 3), dtype=np.uint8), plan)


@pytest.mark.parametrize("pad", ["top_left", "center"])
def test_matrix_and_inverse_are_inverses(pad: str) -> None:
    rng = np.random.default_rng(1)
    for width, height in rng.integers(1, 8000, size=(50, 2)):
        plan = plan_resize(int(width), int(height), TransformConfig(size=640, pad=pad))
        forward, inverse = plan.matrix(), plan.inverse()
        assert forward.dtype == np.float64 and forward.shape == (3, 3)
        np.testing.assert_allclose(forward @ inverse, np.eye(3), rtol=0, atol=1e-12)
        np.testing.assert_allclose(inverse @ forward, np.eye(3), rtol=0, atol=1e-12)
        sx, sy = plan.scale
        ox, oy = plan.offset
        np.testing.assert_array_equal(forward, [[sx, 0, ox], [0, sy, oy], [0, 0, 1]])


@pytest.mark.parametrize("pad", ["top_left", "center"])
def test_inverse_maps_transformed_polygons_back(pad: str) -> None:
    rng = np.random.default_rng(2)
    worst = 0.0
    for width, height in rng.integers(1, 8000, size=(100, 2)):
        plan = plan_resize(int(width), int(height), TransformConfig(size=640, pad=pad))
        polygon = rng.uniform(0, 1, size=(7, 2)) * [width, height]
        transformed = apply_matrix(polygon, plan.matrix())
        assert (transformed >= np.array(plan.offset) - 1e-9).all()
        assert (transformed <= np.array(plan.offset) + plan.resized_size + 1e-9).all()
        back = apply_matrix(transformed, plan.inverse())
        worst = max(worst, float(np.abs(back - polygon).max()))
    assert worst < 1e-9


def test_image_corners_map_to_the_resized_corners() -> None:
    plan = plan_resize(1000, 499, CENTER)
    corners = np.array([[0, 0], [1000, 0], [1000, 499], [0, 499]], dtype=np.float64)
    np.testing.assert_allclose(
        apply_matrix(corners, plan.matrix()), [[0, 160], [640, 160], [640, 479], [0, 479]], rtol=0, atol=1e-12
    )


def test_apply_matrix_handles_projective_matrices_and_empty_input() -> None:
    matrix = np.array([[2.0, 0.0, 1.0], [0.0, 3.0, 0.0], [0.0, 1.0, 1.0]])
    np.testing.assert_allclose(apply_matrix(np.array([[1.0, 1.0], [2.0, 0.0]]), matrix), [[1.5, 1.5], [5.0, 0.0]])
    assert apply_matrix(np.zeros((0, 2)), np.eye(3)).shape == (0, 2)


def _centroid(gray: np.ndarray) -> tuple[float, float]:
    """Intensity-weighted centre in continuous coordinates (pixel j's centre is j + 0.5)."""
    weights = gray.astype(np.float64)
    rows, cols = np.indices(gray.shape)
    return float(((cols + 0.5) * weights).sum() / weights.sum()), float(((rows + 0.5) * weights).sum() / weights.sum())


@pytest.mark.parametrize("col, row", [(5, 9), (0, 0), (15, 3)])
def test_pixel_centre_lands_in_the_corresponding_upscaled_pixels(col: int, row: int) -> None:
    pixels = np.zeros((16, 16, 3), dtype=np.uint8)
    pixels[row, col] = 255
    plan = plan_resize(16, 16, TransformConfig(size=64))  # exactly 4x
    out = resize_and_pad(pixels, plan)[:, :, 0]
    centre = apply_matrix(np.array([[col + 0.5, row + 0.5]]), plan.matrix())[0]
    assert centre.tolist() == [4 * col + 2.0, 4 * row + 2.0]
    # The source pixel covers [4c, 4c+4) x [4r, 4r+4) of the output, and its brightest pixels lie there.
    brightest = {tuple(int(v) for v in p) for p in np.argwhere(out == out.max())}
    assert brightest <= {(4 * row + dy, 4 * col + dx) for dy in range(4) for dx in range(4)}
    if 0 < col < 15 and 0 < row < 15:  # away from the border (edge replication) the bilinear tent is symmetric
        assert brightest == {(4 * row + dy, 4 * col + dx) for dy in (1, 2) for dx in (1, 2)}
        assert _centroid(out) == pytest.approx(tuple(centre), abs=1e-9)


def test_two_to_one_downscale_averages_exactly_the_covered_pixels() -> None:
    pixels = np.zeros((64, 64, 3), dtype=np.uint8)
    pixels[10:12, 20:22] = 200  # source pixels 20-21 x 10-11 = output pixel (10, 5)
    plan = plan_resize(64, 64, TransformConfig(size=32))
    out = resize_and_pad(pixels, plan)[:, :, 0]
    assert np.argwhere(out > 0).tolist() == [[5, 10]]
    assert out[5, 10] == 200
    box = apply_matrix(np.array([[20.0, 10.0], [22.0, 12.0]]), plan.matrix())
    assert box.tolist() == [[10.0, 5.0], [11.0, 6.0]]


@pytest.mark.parametrize("size, pad", [(96, "top_left"), (160, "top_left"), (224, "center"), (416, "center")])
def test_smooth_blob_stays_centred_under_non_integer_scales(size: int, pad: str) -> None:
    # A pixel-index convention (x' = x * s on pixel indices) would be off by 0.5 * |1 - s| here:
    # 0.34, 0.23, 0.13 and 0.19 output pixels; the continuous convention is within 0.01.
    cx, cy = 80.0, 120.0
    rows, cols = np.indices((300, 300))
    blob = 255 * np.exp(-((cols + 0.5 - cx) ** 2 + (rows + 0.5 - cy) ** 2) / (2 * 8.0**2))
    pixels = np.repeat(np.round(blob).astype(np.uint8)[:, :, None], 3, axis=2)
    plan = plan_resize(300, 300, TransformConfig(size=size, pad=pad))
    out = resize_and_pad(pixels, plan)[:, :, 0]
    centre = apply_matrix(np.array([[cx, cy]]), plan.matrix())[0]
    assert _centroid(out) == pytest.approx(tuple(centre), abs=0.02)
