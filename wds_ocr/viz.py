"""Pictures of records for people: image with polygons, gt and thresh_map side by side."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

KEPT = (0, 200, 0)
IGNORED = (230, 40, 40)


def draw_polygons(image: np.ndarray, polygons: list[np.ndarray], ignored: np.ndarray | None = None,
                  thickness: int = 1) -> np.ndarray:
    """A copy of an RGB uint8 image with polygons drawn: green kept, red ignored."""
    canvas = np.ascontiguousarray(image).copy()
    for i, polygon in enumerate(polygons):
        color = IGNORED if ignored is not None and bool(ignored[i]) else KEPT
        points = np.round(np.asarray(polygon, dtype=np.float64)).astype(np.int32).reshape(-1, 1, 2)
        cv2.polylines(canvas, [points], isClosed=True, color=color, thickness=thickness, lineType=cv2.LINE_AA)
    return canvas


def record_panel(image: np.ndarray, polygons: list[np.ndarray], ignored: np.ndarray, gt: np.ndarray,
                 thresh_map: np.ndarray, thresh_range: tuple[float, float]) -> np.ndarray:
    """(S, 3S, 3) RGB: image + polygons | gt | thresh_map (colour-mapped over its range)."""
    left = draw_polygons(image, polygons, ignored)
    middle = np.repeat((gt.astype(np.uint8) * 255)[:, :, None], 3, axis=2)
    low, high = thresh_range
    scaled = np.clip((thresh_map.astype(np.float32) - low) / max(high - low, 1e-6), 0.0, 1.0)
    right = cv2.cvtColor(cv2.applyColorMap((scaled * 255).astype(np.uint8), cv2.COLORMAP_VIRIDIS), cv2.COLOR_BGR2RGB)
    return np.concatenate([left, middle, right], axis=1)


def write_png(path: Path, rgb: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)):
        raise OSError(f"could not write {path}")
