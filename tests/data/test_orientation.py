"""The eight EXIF orientations: arrays against Pillow and numpy references, points against arrays."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from wds_ocr.data.orientation import (
    ORIENTATIONS,
    displayed_size,
    inverse_orientation,
    orient_array,
    orient_points,
    swaps_axes,
)

# What Pillow's ImageOps.exif_transpose does for each tag value.
PILLOW_METHOD = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
HEIGHT, WIDTH = 5, 7


def _stored(channels: int | None = 3, dtype: type = np.uint8) -> np.ndarray:
    """Every pixel distinct, so any misplaced pixel shows."""
    shape = (HEIGHT, WIDTH) if channels is None else (HEIGHT, WIDTH, channels)
    return (np.arange(int(np.prod(shape))) % 251).astype(dtype).reshape(shape)


def _numpy_reference(stored: np.ndarray, orientation: int) -> np.ndarray:
    """Displayed pixel (r, c) taken from the stored pixel the EXIF definition names, one at a time."""
    h, w = stored.shape[:2]
    out_h, out_w = (w, h) if orientation >= 5 else (h, w)
    out = np.empty((out_h, out_w) + stored.shape[2:], dtype=stored.dtype)
    source = {
        1: lambda r, c: (r, c),
        2: lambda r, c: (r, w - 1 - c),
        3: lambda r, c: (h - 1 - r, w - 1 - c),
        4: lambda r, c: (h - 1 - r, c),
        5: lambda r, c: (c, r),
        6: lambda r, c: (h - 1 - c, r),
        7: lambda r, c: (h - 1 - c, w - 1 - r),
        8: lambda r, c: (c, w - 1 - r),
    }[orientation]
    for r in range(out_h):
        for c in range(out_w):
            out[r, c] = stored[source(r, c)]
    return out


@pytest.mark.parametrize("orientation", ORIENTATIONS)
def test_orient_array_matches_pillow(orientation: int) -> None:
    stored = _stored()
    image = Image.fromarray(stored)
    expected = np.asarray(image if orientation == 1 else image.transpose(PILLOW_METHOD[orientation]))
    np.testing.assert_array_equal(orient_array(stored, orientation), expected)


@pytest.mark.parametrize("orientation", ORIENTATIONS)
@pytest.mark.parametrize(
    "channels, dtype",
    [(3, np.uint8), (None, np.uint8), (1, np.uint8), (4, np.uint8), (2, np.uint8), (3, np.uint16), (None, np.float32),
     (3, np.int64)],
)
def test_orient_array_matches_the_definition_on_both_paths(orientation: int, channels: int | None, dtype: type) -> None:
    stored = _stored(channels, dtype)
    out = orient_array(stored, orientation)
    expected = _numpy_reference(stored, orientation)
    assert out.shape == expected.shape and out.dtype == stored.dtype
    np.testing.assert_array_equal(out, expected)
    assert out.flags.c_contiguous


def test_orient_array_one_returns_the_input_and_others_copy() -> None:
    stored = _stored()
    assert orient_array(stored, 1) is stored
    out = orient_array(stored, 3)
    assert not np.shares_memory(out, stored)


def test_orient_array_accepts_non_contiguous_input() -> None:
    stored = _stored(3)[:, ::2]  # a strided view
    np.testing.assert_array_equal(orient_array(stored, 6), _numpy_reference(np.ascontiguousarray(stored), 6))


@pytest.mark.parametrize("orientation", ORIENTATIONS)
def test_orient_points_follows_the_pixels(orientation: int) -> None:
    stored = np.arange(HEIGHT * WIDTH).reshape(HEIGHT, WIDTH)
    displayed = orient_array(stored, orientation)
    rows, cols = np.indices(stored.shape)
    for dx, dy in [(0.5, 0.5), (0.01, 0.01), (0.99, 0.01), (0.01, 0.99), (0.99, 0.99)]:
        points = np.stack([cols.ravel() + dx, rows.ravel() + dy], axis=1)
        mapped = orient_points(points, orientation, WIDTH, HEIGHT)
        landed = displayed[np.floor(mapped[:, 1]).astype(int), np.floor(mapped[:, 0]).astype(int)]
        np.testing.assert_array_equal(landed, stored.ravel())
    corners = np.array([[0.0, 0.0], [WIDTH, 0.0], [WIDTH, HEIGHT], [0.0, HEIGHT]])
    mapped = orient_points(corners, orientation, WIDTH, HEIGHT)
    out_w, out_h = displayed_size(WIDTH, HEIGHT, orientation)
    assert sorted(map(tuple, mapped.tolist())) == sorted([(0, 0), (out_w, 0), (out_w, out_h), (0, out_h)])


@pytest.mark.parametrize("orientation", ORIENTATIONS)
def test_inverse_orientation_round_trips(orientation: int) -> None:
    back = inverse_orientation(orientation)
    stored = _stored()
    np.testing.assert_array_equal(orient_array(orient_array(stored, orientation), back), stored)
    points = np.random.default_rng(orientation).uniform(0, 1, size=(20, 2)) * [WIDTH, HEIGHT]
    out_w, out_h = displayed_size(WIDTH, HEIGHT, orientation)
    there = orient_points(points, orientation, WIDTH, HEIGHT)
    np.testing.assert_allclose(orient_points(there, back, out_w, out_h), points, rtol=0, atol=1e-12)


def test_inverse_table() -> None:
    assert {o: inverse_orientation(o) for o in ORIENTATIONS} == {1: 1, 2: 2, 3: 3, 4: 4, 5: 5, 6: 8, 7: 7, 8: 6}


@pytest.mark.parametrize("orientation, size", [(1, (7, 5)), (2, (7, 5)), (3, (7, 5)), (4, (7, 5)),
                                               (5, (5, 7)), (6, (5, 7)), (7, (5, 7)), (8, (5, 7))])
def test_displayed_size(orientation: int, size: tuple[int, int]) -> None:
    assert displayed_size(7, 5, orientation) == size
    assert swaps_axes(orientation) == (orientation >= 5)
    assert orient_array(_stored(), orientation).shape[:2] == (size[1], size[0])


@pytest.mark.parametrize("bad", [0, 9, -1, None, "6", [6]])
def test_unknown_orientation_is_a_value_error(bad: object) -> None:
    message = f"EXIF orientation must be one of 1..8, got {bad!r}"
    for call in (lambda: orient_array(_stored(), bad), lambda: orient_points(np.zeros((1, 2)), bad, 3, 3),
                 lambda: inverse_orientation(bad), lambda: displayed_size(3, 3, bad)):
        with pytest.raises(ValueError) as info:
            call()
        assert str(info.value) == message
