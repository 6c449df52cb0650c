"""Pictures of records for people: image with polygons, gt, mask and thresh_map side by side, labelled."""

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


# Polygon colours of the record picture, by LeftOut code (kept, don't-care, too small, shrink vanished).
LEFT_OUT_COLOURS = {0: KEPT, 1: (150, 150, 150), 2: IGNORED, 3: (240, 150, 0)}
LEFT_OUT_LABELS = {0: "in the targets", 1: "don't-care", 2: "too small", 3: "vanished when shrunk"}
_TITLE = 26  # pixels of a panel's title bar
_GAP = 8  # white gap between panels
_MIN_SIDE = 320  # smaller records are enlarged (nearest neighbour) so labels stay readable
_FONT = cv2.FONT_HERSHEY_SIMPLEX
_FRAME = (120, 120, 120)


def _text(canvas: np.ndarray, text: str, x: int, y: int, scale: float = 0.5, colour=(0, 0, 0)) -> None:
    cv2.putText(canvas, text, (x, y), _FONT, scale, colour, 1, cv2.LINE_AA)


def _titled(panel: np.ndarray, title: str, footer: np.ndarray) -> np.ndarray:
    """A panel with a white title bar above and a footer (legend or colour bar) below."""
    panel = panel.copy()
    cv2.rectangle(panel, (0, 0), (panel.shape[1] - 1, panel.shape[0] - 1), _FRAME, thickness=1)  # where it ends
    width = panel.shape[1]
    head = np.full((_TITLE, width, 3), 255, dtype=np.uint8)
    _text(head, title, 6, 18)
    return np.concatenate([head, panel, footer], axis=0)


def _legend(width: int, entries: list[tuple[str, tuple[int, int, int]]], height: int) -> np.ndarray:
    strip = np.full((height, width, 3), 255, dtype=np.uint8)
    x, y = 6, 18
    for label, colour in entries:
        text_width = cv2.getTextSize(label, _FONT, 0.45, 1)[0][0]
        if x + 22 + text_width > width - 4:
            x, y = 6, y + 20
        cv2.rectangle(strip, (x, y - 10), (x + 14, y + 2), colour, thickness=-1)
        cv2.rectangle(strip, (x, y - 10), (x + 14, y + 2), _FRAME, thickness=1)
        _text(strip, label, x + 20, y, 0.45)
        x += 34 + text_width
    return strip


def _colour_bar(width: int, low: float, high: float, height: int) -> np.ndarray:
    strip = np.full((height, width, 3), 255, dtype=np.uint8)
    ramp = np.linspace(0, 255, max(width - 80, 2)).astype(np.uint8)[None, :]
    bar = cv2.cvtColor(cv2.applyColorMap(np.repeat(ramp, 12, axis=0), cv2.COLORMAP_VIRIDIS), cv2.COLOR_BGR2RGB)
    strip[6:18, 40 : 40 + bar.shape[1]] = bar
    _text(strip, f"{low:.2f}", 4, 16, 0.4)
    _text(strip, f"{high:.2f}", 40 + bar.shape[1] + 4, 16, 0.4)
    return strip


def record_panel(image: np.ndarray, polygons: list[np.ndarray], left_out: np.ndarray, gt: np.ndarray,
                 mask: np.ndarray, thresh_map: np.ndarray, thresh_range: tuple[float, float]) -> np.ndarray:
    """RGB picture of a record, four labelled panels separated by white gaps: the image with its
    polygons coloured by what the targets made of them (legend below), gt, mask, and thresh_map
    colour-mapped over its range (colour bar below)."""
    side = image.shape[0]
    zoom = max(1, -(-_MIN_SIDE // max(side, 1)))

    def enlarge(rgb: np.ndarray) -> np.ndarray:
        return rgb if zoom == 1 else cv2.resize(rgb, None, fx=zoom, fy=zoom, interpolation=cv2.INTER_NEAREST)

    codes = np.asarray(left_out, dtype=np.int64)
    picture = enlarge(np.array(image, dtype=np.uint8, copy=True))
    for code, polygon in zip(codes, polygons):
        points = np.round(np.asarray(polygon, dtype=np.float64) * zoom).astype(np.int32).reshape(-1, 1, 2)
        cv2.polylines(picture, [points], isClosed=True, color=LEFT_OUT_COLOURS.get(int(code), IGNORED),
                      thickness=1, lineType=cv2.LINE_AA)
    binary = [enlarge(np.repeat((np.asarray(m).astype(np.uint8) * 255)[:, :, None], 3, axis=2)) for m in (gt, mask)]
    low, high = thresh_range
    scaled = np.clip((thresh_map.astype(np.float32) - low) / max(high - low, 1e-6), 0.0, 1.0)
    thresh = enlarge(cv2.cvtColor(cv2.applyColorMap((scaled * 255).astype(np.uint8), cv2.COLORMAP_VIRIDIS),
                                  cv2.COLOR_BGR2RGB))
    width = picture.shape[1]
    present = sorted({int(c) for c in codes}) or [0]
    entries = [(f"{LEFT_OUT_LABELS.get(c, 'other')} ({int((codes == c).sum())})", LEFT_OUT_COLOURS.get(c, IGNORED))
               for c in present]
    footer = 48
    panels = [
        _titled(picture, f"image {side}x{side} + polygons", _legend(width, entries, footer)),
        _titled(binary[0], "gt (white: text kernels)", _legend(width, [("1", (255, 255, 255)), ("0", (0, 0, 0))], footer)),
        _titled(binary[1], "mask (black: not in the loss)", _legend(width, [("1", (255, 255, 255)), ("0", (0, 0, 0))], footer)),
        _titled(thresh, "thresh_map", _colour_bar(width, low, high, footer)),
    ]
    gap = np.full((panels[0].shape[0], _GAP, 3), 255, dtype=np.uint8)
    row = [panels[0]]
    for panel in panels[1:]:
        row += [gap, panel]
    framed = np.concatenate(row, axis=1)
    border = np.full((_GAP, framed.shape[1], 3), 255, dtype=np.uint8)
    return np.concatenate([border, framed, border], axis=0)


def write_png(path: Path, rgb: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)):
        raise OSError(f"could not write {path}")
