"""The deterministic resize + pad transform and its exact inverse.

The longest side goes to ``size`` with cv2 INTER_LINEAR on uint8, the other side to the nearest
integer of the same scale (halves round up, at least 1 pixel); the result is zero-padded to
``size x size`` at the top-left (default) or centred (offset ``(size - new) // 2``).

Points use continuous pixel coordinates: pixel (col, row) covers [col, col+1) x [row, row+1), its
centre is (col + 0.5, row + 0.5), and an image of width W spans [0, W]. In that frame cv2's resize
maps x to ``x * new_w / W`` exactly (it samples destination pixel j at source position
``(j + 0.5) * W / new_w - 0.5`` in pixel-index units), so polygons are scaled by the very same
per-axis factors the pixels were, and the 3x3 matrices below are exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from wds_ocr.config import TransformConfig


@dataclass(frozen=True)
class ResizePlan:
    source_size: tuple[int, int]  # (width, height) of the canonical image
    size: int  # side of the square output
    resized_size: tuple[int, int]  # (width, height) after resizing, before padding
    offset: tuple[int, int]  # (x, y) of the resized image inside the padded square

    @property
    def scale(self) -> tuple[float, float]:
        """Per-axis factors (sx, sy) actually applied to the pixels."""
        return (
            self.resized_size[0] / self.source_size[0],
            self.resized_size[1] / self.source_size[1],
        )

    def matrix(self) -> np.ndarray:
        """3x3 float64 map from canonical-image coordinates to transformed coordinates."""
        sx, sy = self.scale
        return np.array([[sx, 0.0, self.offset[0]], [0.0, sy, self.offset[1]], [0.0, 0.0, 1.0]])

    def inverse(self) -> np.ndarray:
        """3x3 float64 map from transformed coordinates back to canonical-image coordinates."""
        sx, sy = self.scale
        ox, oy = self.offset
        return np.array([[1.0 / sx, 0.0, -ox / sx], [0.0, 1.0 / sy, -oy / sy], [0.0, 0.0, 1.0]])


def _scaled_round_half_up(side: int, size: int, longest: int) -> int:
    """round_half_up(side * size / longest) in exact integer arithmetic (no float ties to misjudge)."""
    return (2 * side * size + longest) // (2 * longest)


def plan_resize(width: int, height: int, config: TransformConfig) -> ResizePlan:
    """Plan the transform for a canonical image of ``width x height`` pixels."""
    if int(width) != width or int(height) != height:
        raise ValueError(f"image size must be whole pixels, got {width!r}x{height!r}")
    width, height = int(width), int(height)
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    size = config.size
    if width >= height:
        new_w, new_h = size, max(1, min(size, _scaled_round_half_up(height, size, width)))
    else:
        new_w, new_h = max(1, min(size, _scaled_round_half_up(width, size, height))), size
    if config.pad == "center":
        offset = ((size - new_w) // 2, (size - new_h) // 2)
    else:
        offset = (0, 0)
    return ResizePlan((width, height), size, (new_w, new_h), offset)


def resize_and_pad(pixels: np.ndarray, plan: ResizePlan, reduction: int = 1) -> np.ndarray:
    """(size, size, 3) uint8: the image resized with INTER_LINEAR and zero-padded. ``reduction``:
    ``pixels`` is the plan's source decoded at 1/reduction (ceil(width / reduction) wide)."""
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) uint8 image, got {pixels.dtype} {pixels.shape}")
    expected = tuple(-(-side // reduction) for side in plan.source_size)
    if (pixels.shape[1], pixels.shape[0]) != expected:
        raise ValueError(f"image is {pixels.shape[1]}x{pixels.shape[0]}, plan is for {plan.source_size}"
                         + (f" at 1/{reduction}" if reduction > 1 else ""))
    resized = cv2.resize(pixels, plan.resized_size, interpolation=cv2.INTER_LINEAR)
    out = np.zeros((plan.size, plan.size, 3), dtype=np.uint8)
    ox, oy = plan.offset
    out[oy : oy + plan.resized_size[1], ox : ox + plan.resized_size[0]] = resized
    return out


def apply_matrix(points: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Apply a 3x3 (affine or projective) matrix to (N, 2) points; float64 result."""
    pts = np.asarray(points, dtype=np.float64)
    homogeneous = pts @ matrix[:2, :2].T + matrix[:2, 2]
    w = pts @ matrix[2, :2] + matrix[2, 2]
    return homogeneous / w[:, None]


def valid_region(inverse_matrix: np.ndarray, original_size: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
    """((x, y) offset, (width, height)) of the resized image inside the padded square.

    The inverse matrix is ``[[1/sx, 0, -ox/sx], [0, 1/sy, -oy/sy], [0, 0, 1]]``: the offset is
    ``-m02/m00`` and the resized width ``original_width / m00``, both whole numbers by construction.
    """
    matrix = np.asarray(inverse_matrix, dtype=np.float64)
    width, height = original_size
    offset = (int(round(-matrix[0, 2] / matrix[0, 0])), int(round(-matrix[1, 2] / matrix[1, 1])))
    size = (int(round(width / matrix[0, 0])), int(round(height / matrix[1, 1])))
    return offset, size
