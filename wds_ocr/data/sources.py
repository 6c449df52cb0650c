"""Read detection datasets: the receipt project's JSON layout and ICDAR-2015 text ground truth.

Both layouts keep images in ``ROOT/images/<split>/``:

* ``json``:  ``ROOT/jsons/<split>.json`` =
  ``{"images": {name: {"words": {id: {"points": [[x, y], ...], "transcription": "..."}}}}}``
* ``icdar``: ``ROOT/gts/<split>/gt_<stem>.txt``, one ``x1,y1,...,x4,y4,transcription`` per line.

Reading checks structure only (point counts, numbers, NaN/inf); checks that need the image
(zero area, points outside the image) happen in ``pipeline``. Problems with one word are
recorded as ``Skip`` entries and the word is left out; problems with a whole sample are
rejects; an annotation file that is ambiguous (duplicate names) or unreadable is a
``SourceError``. Nothing is dropped without a recorded reason.

Annotation files are read like images (``images.read_image_bytes``): regular files only, opened
without blocking, at most ``MAX_ANNOTATION_BYTES`` (JSON) or ``MAX_GROUND_TRUTH_BYTES`` (one ICDAR
file), and JSON nested deeper than Python can parse is an error, not a RecursionError. Every
entry of the image folder with an image suffix is listed (a FIFO or a link to a device too, so
that it becomes a reject with its reason rather than vanishing); folders are not.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from wds_ocr.data.paths import link_escape, read_at_most
from wds_ocr.config import SourceConfig
from wds_ocr.errors import SourceError, UsageError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
_UTF8_BOM = b"\xef\xbb\xbf"
MAX_ANNOTATION_BYTES = 1 << 30
MAX_GROUND_TRUTH_BYTES = 16 << 20
# The limits on strings, words and polygon points are settings (source.max_*, config.sections).


def read_regular_file(path: Path, max_bytes: int) -> bytes:
    """The bytes of a regular file of at most ``max_bytes``. Raises OSError (FileNotFoundError for a
    missing file) or ValueError with the reason a file is refused (not regular, too large, a link
    out of its folder)."""
    escape = link_escape(path)
    if escape is not None:
        raise ValueError(escape.removeprefix(f"{path} "))
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ValueError("is not a regular file")
        if info.st_size > max_bytes:
            raise ValueError(f"is {info.st_size} bytes, over the {max_bytes}-byte limit")
        data = read_at_most(fd, max_bytes)
        if data is None:
            raise ValueError(f"grew past the {max_bytes}-byte limit while it was read")
        return data
    finally:
        os.close(fd)


def listed_images(folder: Path) -> list[str]:
    """Names in ``folder`` with an image suffix that are not folders (special files included)."""
    return sorted(p.name for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.is_dir())


@dataclass(frozen=True)
class Word:
    word_id: str
    points: np.ndarray  # (K, 2) float64, K >= 3, in the frame named by SourceConfig.annotation_frame
    text: str | None
    dont_care: bool


@dataclass(frozen=True)
class SourceSample:
    index: int  # position in the sorted listing; keys and shard order derive from it
    name: str  # file name as in the dataset (may hold several dots)
    image_path: Path
    words: tuple[Word, ...]
    skips: tuple["Skip", ...] = ()  # words left out while reading, with reasons


@dataclass(frozen=True)
class Skip:
    """A word or sample left out, and why. ``word_id`` is None for a whole sample."""

    name: str
    reason: str
    word_id: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "word_id": self.word_id, "reason": self.reason}


@dataclass
class SourceListing:
    root: Path
    split: str
    format: str
    annotation_sha256: str  # digest of the annotation file(s), in listing order
    samples: list[SourceSample] = field(default_factory=list)
    rejects: list[Skip] = field(default_factory=list)  # samples that cannot be read at all

    @property
    def total(self) -> int:
        """Samples in: listed samples plus samples rejected while listing."""
        return len(self.samples) + len(self.rejects)


def reject_duplicates(pairs: list[tuple[str, Any]], where: str) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise SourceError(f"{where}: key {key!r} appears twice; remove or rename one of them")
        seen[key] = value
    return seen


def check_name(name: str, where: str, max_chars: int) -> str | None:
    """Reason a file name is unusable (``max_chars``: source.max_name_chars), or None."""
    problem = text_problem(name, "image name", max_chars, "source.max_name_chars")
    if problem is not None:
        return f"{problem} (in {where})"
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\x00" in name:
        return f"image name {name!r} in {where} is not a plain file name"
    return None


def text_problem(value: str, what: str, limit: int, setting: str) -> str | None:
    """Why ``value`` cannot be written into records, rejects and manifests (UTF-8 text of at
    most ``limit`` characters, the value of ``setting``), or None."""
    if len(value) > limit:
        return (f"{what} of {len(value):,} characters, over the limit of {limit:,} ({setting}): "
                f"{printable(value, 60)}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        return (f"{what} {printable(value, 60)} is not valid text: character {exc.start} is "
                f"{value[exc.start]!r}{' (a byte that is not UTF-8, in a file name)' if 0xDC80 <= ord(value[exc.start]) <= 0xDCFF else ' (a lone surrogate)'}; "
                "rename it in UTF-8")
    return None


def printable(value: str, limit: int = 200) -> str:
    """``value`` as text every file the build writes can hold: characters that are not UTF-8
    (lone surrogates, undecodable file-name bytes) as backslash escapes, cut to ``limit``."""
    text = value.encode("utf-8", "backslashreplace").decode("utf-8")
    return text if len(text) <= limit else f"{text[:limit]}... ({len(value):,} characters)"


def is_coordinate(value: Any) -> bool:
    # bool is an int subclass; JSON true/false is never a coordinate. Strings are not either,
    # even numeric ones: a quoted number is a sign of a broken export.
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


JSON_NUMBERS = (int, float)  # exact types: bool, a subclass of int, is not a coordinate


def shown(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def parse_points(raw: Any, max_points: int) -> tuple[np.ndarray | None, str | None]:
    """(points, None) for a valid polygon of at most ``max_points`` (source.max_polygon_points),
    else (None, reason).

    ``raw`` is a list of [x, y] pairs of JSON numbers, or a numeric (K, 2) array.
    """
    if isinstance(raw, (list, tuple, np.ndarray)) and len(raw) > max_points:
        return None, f"polygon of {len(raw):,} points, over the limit of {max_points:,} (source.max_polygon_points)"
    if isinstance(raw, np.ndarray):
        if raw.dtype.kind not in "iuf":
            return None, f"points are not numbers (array of {raw.dtype})"
        pts = raw.astype(np.float64)
        if pts.ndim != 2 or pts.shape[1] != 2:
            return None, f"points must be a list of [x, y] pairs, got shape {list(pts.shape)}"
    elif type(raw) is list and all(type(point) is list and len(point) == 2 and type(point[0]) in JSON_NUMBERS
                                   and type(point[1]) in JSON_NUMBERS for point in raw):
        # What JSON gives for a good polygon, checked in one pass (listing a large dataset spends
        # its time here); anything else takes the checks below, which say what is wrong.
        try:
            pts = np.array(raw, dtype=np.float64).reshape(-1, 2)
        except OverflowError:
            return None, "points contain numbers too large for float64"
    else:
        if not isinstance(raw, (list, tuple)) or not all(isinstance(point, (list, tuple)) for point in raw):
            return None, f"points must be a list of [x, y] pairs, got {shown(raw)}"
        for point in raw:
            for value in point:
                if not is_coordinate(value):
                    return None, f"points are not numbers: {shown(value)} in {shown(list(point))}"
        for point in raw:
            if len(point) != 2:
                return None, f"points must be [x, y] pairs, got a point with {len(point)} values: {shown(list(point))}"
        try:
            pts = np.array(raw, dtype=np.float64).reshape(-1, 2)
        except OverflowError:
            return None, "points contain numbers too large for float64"
    if pts.shape[0] < 3:
        return None, f"polygon has {pts.shape[0]} points, need at least 3"
    if not np.isfinite(pts).all():
        return None, "points contain NaN or infinity"
    return pts, None


def images_dir(root: Path, split: str) -> Path:
    folder = root / "images" / split
    if not folder.is_dir():
        raise SourceError(f"{folder} does not exist: expected images in ROOT/images/{split}/")
    return folder


def decode_utf8(raw_bytes: bytes) -> str:
    """UTF-8 text without its optional byte-order mark; a decode error's positions are file offsets."""
    skip = len(_UTF8_BOM) if raw_bytes.startswith(_UTF8_BOM) else 0
    try:
        return raw_bytes[skip:].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UnicodeDecodeError(exc.encoding, raw_bytes, exc.start + skip, exc.end + skip, exc.reason) from None


def undecodable_at(raw_bytes: bytes, exc: UnicodeDecodeError) -> str:
    """Where the first undecodable byte is, as line and column (both from 1, column in bytes)."""
    line = raw_bytes.count(b"\n", 0, exc.start) + 1
    column = exc.start - (raw_bytes.rfind(b"\n", 0, exc.start) + 1) + 1
    return f"byte 0x{raw_bytes[exc.start]:02x} at line {line} column {column} ({exc.reason}); save the file as UTF-8"


def is_dont_care(text: str | None, config: SourceConfig) -> bool:
    return text is not None and text.strip() in config.dont_care


def available_splits(root: Path, format: str) -> list[str]:
    """The splits a source folder names: an image folder or annotations for it (json:
    images/<split>/ or jsons/<split>.json; icdar: images/<split>/ or gts/<split>/). A split with
    only one of the two is listed, and its listing says which part is missing."""
    images = root / "images"
    try:
        folders = {p.name for p in images.iterdir() if p.is_dir()} if images.is_dir() else set()
        if format == "json":
            jsons = root / "jsons"
            named = {p.stem for p in jsons.iterdir() if p.suffix == ".json" and p.is_file()} if jsons.is_dir() else set()
        else:
            gts = root / "gts"
            named = {p.name for p in gts.iterdir() if p.is_dir()} if gts.is_dir() else set()
    except OSError:
        return []
    return sorted(folders | named)


def list_source(root: str | Path, split: str, config: SourceConfig) -> SourceListing:
    """List every sample of a split, sorted by file name, with reading problems recorded."""
    root = Path(root)
    if not root.is_dir():
        raise SourceError(f"source folder {root} does not exist")
    if not split or "/" in split or "\\" in split or "\x00" in split or split in (".", ".."):
        raise UsageError(f"split {split!r} must be a plain folder name such as train or val")
    splits = available_splits(root, config.format)
    if split not in splits:
        layout = "ROOT/jsons/<split>.json and ROOT/images/<split>/" if config.format == "json" else \
            "ROOT/images/<split>/ and ROOT/gts/<split>/"
        have = f"the splits it has: {', '.join(splits)}" if splits else f"it has none ({layout} expected)"
        raise UsageError(f"{root} has no split {split!r} (source.format {config.format}); {have}")
    from wds_ocr.data.source_formats import list_icdar, list_json  # they build on the helpers above

    if config.format == "json":
        return list_json(root, split, config)
    return list_icdar(root, split, config)
