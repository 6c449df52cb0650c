"""Synthetic receipts: the built-in demo data set and the tests' default data.

``synthesize`` writes the same layout as the real receipts (``images/<split>/*.jpg`` plus
``jsons/<split>.json``). Every word is drawn with ``cv2.putText`` into its own patch, so its quad is
the exact box of its ink pixels; a small page rotation moves pixels and quads by one matrix. Every
fourth image is stored rotated or mirrored with an EXIF Orientation tag (values 2..8 in turn) while
the polygons stay in the displayed, upright frame, as in the real data.

Determinism: image ``i`` draws only from ``SeedSequence(seed).spawn(...)[i]``, so the same seed
gives byte-identical files, and image ``i`` does not depend on ``n``.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from wds_ocr.data.paths import write_atomic
from wds_ocr.data.orientation import inverse_orientation, orient_array

SPLITS = ("train", "val")
DONT_CARE = "###"
EXIF_ORIENTATION_TAG = 0x0112
JPEG_QUALITY = 95
MIN_SIDE_LIMIT = 160  # below this a receipt line of readable text no longer fits
MAX_ANGLE_DEG = 3.0
DONT_CARE_SHARE = 0.1
TAG_EVERY = 4  # every 4th image (index 3, 7, ...) is stored with an orientation tag
SMUDGE_CUTOFF = 0.12  # blurred ink below this opacity is dropped, so the quad holds all the ink

_BODY_FONTS = (
    cv2.FONT_HERSHEY_SIMPLEX,
    cv2.FONT_HERSHEY_DUPLEX,
    cv2.FONT_HERSHEY_COMPLEX,
    cv2.FONT_HERSHEY_TRIPLEX,
    cv2.FONT_HERSHEY_PLAIN,
)
_HEADER_FONTS = _BODY_FONTS + (
    cv2.FONT_HERSHEY_SIMPLEX | cv2.FONT_ITALIC,
    cv2.FONT_HERSHEY_COMPLEX | cv2.FONT_ITALIC,
    cv2.FONT_HERSHEY_SCRIPT_SIMPLEX,
)

_STORE = ("OLD", "TOWN", "WHITE", "COFFEE", "KEDAI", "MAKAN", "MINI", "MART", "SDN", "BHD", "BAKERY",
          "HARDWARE", "TRADING", "ENTERPRISE", "RESTORAN", "CAFE", "FRESH", "MARKET", "BOOK", "STORE")
_STREET = ("JALAN", "LORONG", "TAMAN", "BANDAR", "SRI", "INDAH", "JAYA", "BARU", "UTAMA", "MERDEKA",
           "KUALA", "LUMPUR", "SELANGOR", "JOHOR", "PETALING", "KLANG", "DAMANSARA")
_ITEMS = ("NASI", "LEMAK", "TEH", "TARIK", "KOPI", "AIS", "ROTI", "CANAI", "MEE", "GORENG", "AYAM",
          "SUSU", "BREAD", "MILK", "EGG", "RICE", "SUGAR", "PAPER", "PEN", "BATTERY", "SOAP", "WATER",
          "BOTTLE", "TAPE", "GLUE", "SCREW", "PAINT", "BRUSH")
_TOTALS = (("TOTAL",), ("SUBTOTAL",), ("ROUNDING",), ("CASH",), ("CHANGE",), ("GST", "6%"),
           ("TAX",), ("DISCOUNT",), ("AMOUNT", "DUE"), ("TOTAL", "QTY:"))
_FOOTERS = (("THANK", "YOU"), ("PLEASE", "COME", "AGAIN"), ("GOODS", "SOLD", "ARE", "NOT", "RETURNABLE"),
            ("HAVE", "A", "NICE", "DAY"), ("TQ", "&", "WELCOME"))
_META_LABELS = ("DATE:", "TIME:", "INVOICE:", "CASHIER:", "TABLE:", "RECEIPT", "BILL", "NO:")


@dataclass(frozen=True)
class SynthSummary:
    root: Path
    counts: dict[str, int]  # images per split
    words: int  # total words written
    exif_tagged: int  # images stored with an EXIF orientation tag != 1


@dataclass(frozen=True)
class _Word:
    quad: np.ndarray  # (4, 2) float64, TL TR BR BL in the displayed frame
    transcription: str


@dataclass(frozen=True)
class _Line:
    align: str  # "left", "center", "right" or "split" (left words, right words flush right)
    left: tuple[str, ...]
    right: tuple[str, ...] = ()


@dataclass(frozen=True)
class _Style:
    font: int
    scale: float
    thickness: int


def synthesize(out: Path, n: int, seed: int, *, val_fraction: float = 0.25, min_side: int = 320,
               max_side: int = 960) -> SynthSummary:
    """Write ``n`` synthetic receipts under ``out`` and return what was written."""
    out = Path(out)
    _check_arguments(out, n, seed, val_fraction, min_side, max_side)
    split_seq, *image_seqs = np.random.SeedSequence(seed).spawn(n + 1)
    splits = _assign_splits(np.random.default_rng(split_seq), n, val_fraction)
    annotations: dict[str, dict[str, dict]] = {split: {} for split in SPLITS}
    for split in SPLITS:
        (out / "images" / split).mkdir(parents=True, exist_ok=False)
    total_words = 0
    tagged = 0
    for index, (split, image_seq) in enumerate(zip(splits, image_seqs)):
        rng = np.random.default_rng(image_seq)
        upright, words = _render_receipt(rng, min_side, max_side)
        orientation = _orientation_for(index)
        name = f"synth_{index:04d}.jpg"
        write_atomic(out / "images" / split / name, _encode_jpeg(upright, orientation), durable=False)
        annotations[split][name] = {"words": _words_json(words)}
        total_words += len(words)
        tagged += orientation != 1
    (out / "jsons").mkdir()
    for split in SPLITS:
        text = json.dumps({"images": annotations[split]}, sort_keys=True, indent=1) + "\n"
        write_atomic(out / "jsons" / f"{split}.json", text.encode("utf-8"), durable=False)
    counts = {split: len(annotations[split]) for split in SPLITS}
    return SynthSummary(root=out, counts=counts, words=total_words, exif_tagged=tagged)


def _check_arguments(out: Path, n: int, seed: int, val_fraction: float, min_side: int, max_side: int) -> None:
    if n < 1:
        raise ValueError(f"synthesize: n must be at least 1 image, got {n}")
    if seed < 0:
        raise ValueError(f"synthesize: seed must be a non-negative integer, got {seed}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"synthesize: val_fraction must be in [0, 1), got {val_fraction}")
    if min_side < MIN_SIDE_LIMIT or max_side < min_side:
        raise ValueError(
            f"synthesize: need {MIN_SIDE_LIMIT} <= min_side <= max_side, got min_side={min_side}, max_side={max_side}"
        )
    if out.exists() and not out.is_dir():
        raise ValueError(f"synthesize: output path {out} exists and is not a folder")
    present = [part for part in ("images", "jsons") if (out / part).exists()]
    if present:
        raise ValueError(
            f"synthesize: {out} already holds a dataset ({' and '.join(present)} present); "
            "choose a new or empty folder, or delete the old data first"
        )


def _assign_splits(rng: np.random.Generator, n: int, val_fraction: float) -> list[str]:
    """round(n * val_fraction) images to val (at least 1 when n >= 2, never all), chosen at random."""
    n_val = round(n * val_fraction)
    if n >= 2:
        n_val = min(max(n_val, 1), n - 1)
    else:
        n_val = 0
    val = set(rng.permutation(n)[:n_val].tolist())
    return ["val" if index in val else "train" for index in range(n)]


def _orientation_for(index: int) -> int:
    """1 for most images; every TAG_EVERY-th image cycles through 2..8."""
    if index % TAG_EVERY != TAG_EVERY - 1:
        return 1
    return 2 + (index // TAG_EVERY) % 7


def _render_receipt(rng: np.random.Generator, min_side: int, max_side: int) -> tuple[np.ndarray, list[_Word]]:
    """One upright receipt page (H, W, 3) uint8 RGB and its words with exact quads."""
    height = int(rng.integers(min_side, max_side + 1))
    width = int(np.clip(round(height * rng.uniform(0.45, 0.8)), min_side, height))
    angle = float(rng.uniform(-MAX_ANGLE_DEG, MAX_ANGLE_DEG)) if rng.random() < 0.5 else 0.0
    page, paper = _paper_page(rng, width, height)
    # Room so that the rotated text stays inside the image: |shift| <= |sin| * half the other side.
    sin = abs(np.sin(np.deg2rad(angle)))
    base_margin = max(6, round(0.04 * width))
    x_lo = paper[0] + base_margin + int(np.ceil(sin * height / 2)) + 1
    x_hi = paper[2] - base_margin - int(np.ceil(sin * height / 2)) - 1
    y_lo = paper[1] + base_margin + int(np.ceil(sin * width / 2)) + 1
    y_hi = paper[3] - base_margin - int(np.ceil(sin * width / 2)) - 1
    words = _draw_lines(rng, page, (x_lo, y_lo, x_hi, y_hi))
    if angle:
        page, words = _rotate(page, words, angle)
    page += rng.normal(0.0, rng.uniform(1.0, 3.5), size=(height, width, 1)).astype(np.float32)
    return np.clip(np.rint(page), 0, 255).astype(np.uint8), words


def _paper_page(rng: np.random.Generator, width: int, height: int) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """Off-white paper with gradient and texture, sometimes on a darker table; returns the paper box."""
    level = rng.uniform(228, 250)
    paper_rgb = np.array([level, level - rng.uniform(0, 6), level - rng.uniform(2, 12)], dtype=np.float32)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    gradient = 1.0 + rng.uniform(-0.06, 0.06) * (xs / width - 0.5) + rng.uniform(-0.06, 0.06) * (ys / height - 0.5)
    coarse = rng.normal(size=(height // 24 + 2, width // 24 + 2)).astype(np.float32)
    texture = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC) * rng.uniform(1.0, 4.0)
    page = paper_rgb[None, None, :] * gradient[..., None] + texture[..., None]
    paper = (0, 0, width, height)
    if rng.random() < 0.35:
        x0 = int(rng.integers(4, max(5, width // 20)))
        x1 = width - int(rng.integers(4, max(5, width // 20)))
        y0 = int(rng.integers(4, max(5, height // 25)))
        y1 = height - int(rng.integers(4, max(5, height // 25)))
        table_level = rng.uniform(50, 140)
        table = np.array([table_level, table_level * 0.85, table_level * 0.7], dtype=np.float32)
        inside = np.zeros((height, width), dtype=bool)
        inside[y0:y1, x0:x1] = True
        page[~inside] = table + texture[~inside][:, None] * 2.0
        paper = (x0, y0, x1, y1)
    return page.astype(np.float32), paper


def _receipt_script(rng: np.random.Generator) -> list[tuple[str, _Line]]:
    """The lines of one receipt, top to bottom, each with its role (header lines are larger)."""
    script = [("header", _Line("center", _pick(rng, _STORE, 1, 4))) for _ in range(rng.integers(1, 3))]
    for _ in range(rng.integers(1, 4)):
        choice = rng.integers(3)
        if choice == 0:
            words = (f"NO.{rng.integers(1, 300)},",) + _pick(rng, _STREET, 1, 3)
        elif choice == 1:
            words = ("TEL:", f"0{rng.integers(3, 10)}-{rng.integers(1000, 9999)}", f"{rng.integers(1000, 9999)}")
        else:
            words = ("GST", "ID:", f"{rng.integers(10**9, 10**10):010d}")
        script.append(("body", _Line("center", words)))
    for _ in range(rng.integers(1, 4)):
        label = str(rng.choice(_META_LABELS))
        date = f"{rng.integers(1, 29):02d}/{rng.integers(1, 13):02d}/{rng.integers(2015, 2025)}"
        value = date if rng.random() < 0.5 else f"CS{rng.integers(10**6, 10**7)}"
        clock = f"{rng.integers(0, 24):02d}:{rng.integers(0, 60):02d}"
        line = _Line("split", (label, value), (clock,)) if rng.random() < 0.5 else _Line("left", (label, value))
        script.append(("body", line))
    for _ in range(rng.integers(5, 40)):
        item = _pick(rng, _ITEMS, 1, 3)
        qty = int(rng.integers(1, 6))
        left = (f"{qty}", "X") + item if rng.random() < 0.5 else item
        script.append(("body", _Line("split", left, (_price(rng),))))
    for _ in range(rng.integers(2, 5)):
        label = _TOTALS[int(rng.integers(len(_TOTALS)))]
        if rng.random() < 0.7:
            script.append(("body", _Line("split", label, (_price(rng),))))
        else:
            script.append(("body", _Line(str(rng.choice(("left", "right"))), label + (_price(rng),))))
    for _ in range(rng.integers(1, 3)):
        script.append(("body", _Line("center", _FOOTERS[int(rng.integers(len(_FOOTERS)))])))
    return script


def _pick(rng: np.random.Generator, vocabulary: tuple[str, ...], low: int, high: int) -> tuple[str, ...]:
    count = int(rng.integers(low, high + 1))
    return tuple(vocabulary[int(i)] for i in rng.integers(len(vocabulary), size=count))


def _price(rng: np.random.Generator) -> str:
    amount = f"{int(rng.integers(10, 50000)) / 100:.2f}"
    return f"RM{amount}" if rng.random() < 0.2 else amount


def _draw_lines(rng: np.random.Generator, page: np.ndarray, box: tuple[int, int, int, int]) -> list[_Word]:
    """Lay out the receipt script inside ``box`` (x0, y0, x1, y1) until the page is full."""
    x_lo, y_lo, x_hi, y_hi = box
    width = page.shape[1]
    body_height = rng.uniform(16.0, float(np.clip(width / 14, 22.0, 30.0)))
    body_font = int(rng.choice(_BODY_FONTS))
    header_font = int(rng.choice(_HEADER_FONTS))
    ink = rng.uniform(15, 70) + np.array([0.0, 0.0, rng.uniform(0, 40)]) * (rng.random() < 0.3)
    words: list[_Word] = []
    y = y_lo
    for role, line in _receipt_script(rng):
        header = role == "header"
        text_height = min(40.0, body_height * (rng.uniform(1.2, 1.45) if header else rng.uniform(0.9, 1.1)))
        style = _style(header_font if header else body_font, text_height, rng)
        placed = _place_line(line, style, x_lo, x_hi)
        if not placed:
            continue
        (_, cap), descent = cv2.getTextSize("H0", style.font, style.scale, style.thickness)
        baseline = y + cap
        if baseline + descent + style.thickness > y_hi:
            break
        for text, x in placed:
            smudged = rng.random() < DONT_CARE_SHARE
            color = np.clip(ink + rng.uniform(-8, 8), 0, 255).astype(np.float32)
            quad = _draw_word(rng, page, text, style, (x, baseline), color, smudged)
            if quad is not None:
                words.append(_Word(quad, DONT_CARE if smudged else text))
        y = baseline + descent + int(round(cap * rng.uniform(0.35, 0.9)))
    return words


def _style(font: int, text_height: float, rng: np.random.Generator) -> _Style:
    """Font scale whose capitals' ink is ``text_height`` px tall; stroke width grows with size."""
    thickness = int(np.clip(round(text_height * rng.uniform(0.06, 0.11)), 1, 4))
    scale = (text_height - thickness) / _unit_cap_ink(font)
    return _Style(font, scale, thickness)


def _unit_cap_ink(font: int) -> float:
    """Ink height of capitals at scale 1 (getTextSize's height includes blank space above them)."""
    probe = np.zeros((120, 200), dtype=np.uint8)
    cv2.putText(probe, "H0", (20, 80), font, 2.0, 255, 1, cv2.LINE_8)
    rows = np.flatnonzero(probe.any(axis=1))
    return (rows[-1] - rows[0]) / 2.0


def _place_line(line: _Line, style: _Style, x_lo: int, x_hi: int) -> list[tuple[str, int]]:
    """(word, x of its origin) for the words of ``line`` that fit between x_lo and x_hi."""
    def width_of(text: str) -> int:
        return cv2.getTextSize(text, style.font, style.scale, style.thickness)[0][0]

    space = max(width_of(" "), int(0.4 * width_of("H")))
    left, right = list(line.left), list(line.right)
    available = x_hi - x_lo

    def span(group: list[str]) -> int:
        return sum(width_of(w) for w in group) + space * max(0, len(group) - 1)

    while left and span(left) + span(right) + (2 * space if right else 0) > available:
        left.pop()
    if not left or span(right) > available:
        return []
    if line.align == "split":
        return _run(left, x_lo, space, width_of) + _run(right, x_hi - span(right), space, width_of)
    start = {"left": x_lo, "center": x_lo + (available - span(left)) // 2, "right": x_hi - span(left)}[line.align]
    return _run(left, start, space, width_of)


def _run(group: list[str], start: int, space: int, width_of) -> list[tuple[str, int]]:
    placed = []
    x = start
    for text in group:
        placed.append((text, x))
        x += width_of(text) + space
    return placed


def _draw_word(rng: np.random.Generator, page: np.ndarray, text: str, style: _Style, origin: tuple[int, int],
               color: np.ndarray, smudged: bool) -> np.ndarray | None:
    """Blend one word into ``page``; return the (4, 2) box of exactly the ink it added."""
    (text_width, cap), descent = cv2.getTextSize(text, style.font, style.scale, style.thickness)
    blur = rng.uniform(1.2, 2.5) if smudged else 0.0
    pad = style.thickness + cap // 2 + int(np.ceil(3 * blur)) + 2
    patch = np.zeros((cap + descent + 2 * pad, text_width + 2 * pad), dtype=np.uint8)
    cv2.putText(patch, text, (pad, pad + cap), style.font, style.scale, 255, style.thickness, cv2.LINE_AA)
    alpha = patch.astype(np.float32) / 255.0
    if smudged:
        alpha = cv2.GaussianBlur(alpha, (0, 0), blur) * rng.uniform(0.75, 0.95)
        alpha[alpha < SMUDGE_CUTOFF] = 0.0
    left, top = origin[0] - pad, origin[1] - cap - pad
    # Clip the patch to the page (italic ink may reach past the layout box near an edge).
    px0, py0 = max(0, -left), max(0, -top)
    px1 = min(alpha.shape[1], page.shape[1] - left)
    py1 = min(alpha.shape[0], page.shape[0] - top)
    alpha = alpha[py0:py1, px0:px1]
    rows = np.flatnonzero(alpha.any(axis=1))
    cols = np.flatnonzero(alpha.any(axis=0))
    if rows.size == 0:
        return None
    region = page[top + py0:top + py1, left + px0:left + px1]
    region *= 1.0 - alpha[..., None]
    region += alpha[..., None] * color
    x0, x1 = left + px0 + cols[0], left + px0 + cols[-1] + 1
    y0, y1 = top + py0 + rows[0], top + py0 + rows[-1] + 1
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], dtype=np.float64)


def _rotate(page: np.ndarray, words: list[_Word], angle: float) -> tuple[np.ndarray, list[_Word]]:
    """Rotate the page about its centre; quads move by the same map in continuous coordinates.

    In continuous coordinates (pixel c spans [c, c+1)) the map is p -> R (p - centre) + centre.
    cv2 addresses pixel centres (c + 0.5), so its matrix is that map conjugated by a half-pixel shift.
    """
    height, width = page.shape[:2]
    theta = np.deg2rad(angle)
    rotation = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    centre = np.array([width / 2.0, height / 2.0])
    offset = centre - rotation @ centre
    pixel_offset = offset + rotation @ np.array([0.5, 0.5]) - 0.5
    matrix = np.hstack([rotation, pixel_offset[:, None]])
    rotated = cv2.warpAffine(page, matrix, (width, height), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    moved = [_Word(word.quad @ rotation.T + offset, word.transcription) for word in words]
    return rotated, moved


def _encode_jpeg(upright: np.ndarray, orientation: int) -> bytes:
    """JPEG bytes; tagged images store the pixels that the tag turns back into ``upright``."""
    buffer = io.BytesIO()
    if orientation == 1:
        Image.fromarray(upright).save(buffer, format="JPEG", quality=JPEG_QUALITY)
    else:
        stored = orient_array(upright, inverse_orientation(orientation))
        exif = Image.Exif()
        exif[EXIF_ORIENTATION_TAG] = orientation
        Image.fromarray(stored).save(buffer, format="JPEG", quality=JPEG_QUALITY, exif=exif.tobytes())
    return buffer.getvalue()


def _words_json(words: list[_Word]) -> dict[str, dict]:
    return {
        f"{number:04d}": {
            "points": [[round(float(x), 2), round(float(y), 2)] for x, y in word.quad],
            "transcription": word.transcription,
        }
        for number, word in enumerate(words, start=1)
    }


