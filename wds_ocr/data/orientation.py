"""The eight EXIF orientations as exact array operations and point maps.

Orientation ``o`` says how to turn the *stored* pixel array into the *displayed* image:

    1 as stored            5 transpose (mirror across the main diagonal)
    2 mirror left-right    6 rotate 90 degrees clockwise
    3 rotate 180           7 transverse (mirror across the anti-diagonal)
    4 mirror top-bottom    8 rotate 90 degrees counter-clockwise

Points use continuous pixel coordinates: pixel (col, row) covers [col, col+1) x [row, row+1),
so an image of width W spans x in [0, W]. Under that convention the array operation and the point
map below agree exactly: a point inside stored pixel (c, r) lands inside the displayed pixel the
array operation moves (c, r) to.
"""

from __future__ import annotations

import cv2
import numpy as np

ORIENTATIONS = (1, 2, 3, 4, 5, 6, 7, 8)

# Orientation that undoes each orientation (6 and 8 undo each other; the rest undo themselves).
_INVERSE = {1: 1, 2: 2, 3: 3, 4: 4, 5: 5, 6: 8, 7: 7, 8: 6}


def _check(orientation: int) -> None:
    try:
        known = orientation in _INVERSE
    except TypeError:  # unhashable: a list, an array
        known = False
    if not known:
        raise ValueError(f"EXIF orientation must be one of 1..8, got {orientation!r}")


def inverse_orientation(orientation: int) -> int:
    """The orientation whose operation undoes ``orientation``."""
    _check(orientation)
    return _INVERSE[orientation]


def swaps_axes(orientation: int) -> bool:
    """True where the displayed image is the stored one with width and height exchanged."""
    _check(orientation)
    return orientation >= 5


def displayed_size(stored_width: int, stored_height: int, orientation: int) -> tuple[int, int]:
    """(width, height) of the displayed image."""
    if swaps_axes(orientation):
        return stored_height, stored_width
    return stored_width, stored_height


def _orient_numpy(stored: np.ndarray, orientation: int) -> np.ndarray:
    if orientation == 2:
        out = stored[:, ::-1]
    elif orientation == 3:
        out = stored[::-1, ::-1]
    elif orientation == 4:
        out = stored[::-1, :]
    elif orientation == 5:
        out = np.swapaxes(stored, 0, 1)
    elif orientation == 6:
        out = np.rot90(stored, k=-1)
    elif orientation == 7:
        out = np.swapaxes(stored[::-1, ::-1], 0, 1)
    else:
        out = np.rot90(stored, k=1)
    return np.ascontiguousarray(out)


def _orient_cv2(stored: np.ndarray, orientation: int) -> np.ndarray:
    if orientation == 2:
        return cv2.flip(stored, 1)
    if orientation == 3:
        return cv2.flip(stored, -1)
    if orientation == 4:
        return cv2.flip(stored, 0)
    if orientation == 5:
        return cv2.transpose(stored)
    if orientation == 6:
        return cv2.rotate(stored, cv2.ROTATE_90_CLOCKWISE)
    if orientation == 7:
        return cv2.flip(cv2.rotate(stored, cv2.ROTATE_90_CLOCKWISE), 0)
    return cv2.rotate(stored, cv2.ROTATE_90_COUNTERCLOCKWISE)


def orient_array(stored: np.ndarray, orientation: int) -> np.ndarray:
    """Displayed image of a stored (H, W[, C]) array; a contiguous copy unless orientation is 1.

    OpenCV's flip/rotate/transpose do the common uint8 1- and 3-channel cases (several times
    faster than numpy's strided copies on 5000x7000 receipts); numpy does everything else.
    Both give identical arrays.
    """
    _check(orientation)
    if orientation == 1:
        return stored
    if stored.dtype == np.uint8 and (stored.ndim == 2 or (stored.ndim == 3 and stored.shape[2] in (1, 3, 4))):
        out = _orient_cv2(np.ascontiguousarray(stored), orientation)
        return out.reshape(out.shape[:2] + stored.shape[2:])
    return _orient_numpy(stored, orientation)


def orient_points(points: np.ndarray, orientation: int, stored_width: float, stored_height: float) -> np.ndarray:
    """Map (N, 2) points from the stored frame of a W x H image into the displayed frame."""
    _check(orientation)
    pts = np.asarray(points, dtype=np.float64)
    x, y = pts[:, 0], pts[:, 1]
    w, h = float(stored_width), float(stored_height)
    if orientation == 1:
        mapped = (x, y)
    elif orientation == 2:
        mapped = (w - x, y)
    elif orientation == 3:
        mapped = (w - x, h - y)
    elif orientation == 4:
        mapped = (x, h - y)
    elif orientation == 5:
        mapped = (y, x)
    elif orientation == 6:
        mapped = (h - y, x)
    elif orientation == 7:
        mapped = (h - y, w - x)
    else:
        mapped = (y, w - x)
    return np.stack(mapped, axis=1)
