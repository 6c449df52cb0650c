"""The live path: one source sample -> canonical image -> transform -> DBNet targets.

This is what ``build-shards`` runs per sample, what ``verify --against-source`` compares shards
with, and (followed by ``normalize_image``) the per-epoch baseline that ``bench`` measures.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from wds_ocr.config import Config
from wds_ocr.data.geometry import ResizePlan, apply_matrix, plan_resize, resize_and_pad
from wds_ocr.data.images import CanonicalImage, decode_canonical, read_image_bytes
from wds_ocr.data.orientation import orient_points
from wds_ocr.data.sources import Skip, SourceSample, Word
from wds_ocr.data.targets import Targets, make_targets

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Normalization:
    """A model's input normalization, per RGB channel on the 0..1 scale: ``(x / 255 - mean) / std``.

    It belongs to the model (its backbone was trained with it) and travels in the checkpoint's
    config (``model.input_mean`` / ``model.input_std``); the records stay uint8.
    """

    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        for name in ("mean", "std"):
            values = getattr(self, name)
            if len(values) != 3 or not all(np.isfinite(v) for v in values):
                raise ValueError(f"normalization {name} must be 3 finite numbers (R, G, B), got {values!r}")
        if not all(v > 0 for v in self.std):
            raise ValueError(f"normalization std must be positive, got {self.std!r}")
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))


IMAGENET = Normalization()


@dataclass(frozen=True)
class SampleMeta:
    """Everything evaluation needs about a sample, so it never reads the source image again."""

    name: str
    source_sha256: str
    orientation: int
    stored_size: tuple[int, int]  # (width, height) as stored in the file
    original_size: tuple[int, int]  # (width, height) of the canonical (displayed) image
    resized_size: tuple[int, int]
    offset: tuple[int, int]
    scale: tuple[float, float]
    inverse_matrix: np.ndarray  # (3, 3) float64: transformed -> original coordinates
    word_ids: tuple[str, ...]
    texts: tuple[str | None, ...]
    polygons_original: tuple[np.ndarray, ...]  # (K, 2) float64 each, canonical-image frame
    polygons: tuple[np.ndarray, ...]  # (K, 2) float64 each, transformed frame
    dont_care: np.ndarray  # (P,) bool: marked don't-care in the annotations
    left_out: np.ndarray  # (P,) uint8 LeftOut codes: 0 in the training targets, else why not

    @property
    def ignored(self) -> np.ndarray:
        """(P,) bool: left out of the training targets (don't-care, too small, shrink vanished)."""
        return self.left_out != 0


@dataclass(frozen=True)
class ProcessedSample:
    index: int
    image: np.ndarray  # (S, S, 3) uint8 RGB
    targets: Targets
    meta: SampleMeta
    skips: tuple[Skip, ...]  # words left out, with reasons (reading and geometry)


def polygon_area(points: np.ndarray) -> float:
    """Signed shoelace area of a closed polygon."""
    x, y = points[:, 0], points[:, 1]
    # Each vertex against the next one: the arrays np.roll(v, -1) makes, without its overhead.
    return 0.5 * float(np.dot(x, np.concatenate((y[1:], y[:1]))) - np.dot(y, np.concatenate((x[1:], x[:1]))))


def check_word_geometry(
    name: str, word: Word, points: np.ndarray, width: int, height: int, tolerance: float
) -> tuple[np.ndarray | None, Skip | None]:
    """Clip points within ``tolerance`` of the image to its bounds; reject the rest with a reason."""
    low = points.min(axis=0)
    high = points.max(axis=0)
    if low[0] < -tolerance or low[1] < -tolerance or high[0] > width + tolerance or high[1] > height + tolerance:
        return None, Skip(
            name,
            f"points outside the {width}x{height} image: x in [{low[0]:g}, {high[0]:g}], "
            f"y in [{low[1]:g}, {high[1]:g}] (check the annotation frame: source.annotation_frame)",
            word.word_id,
        )
    if polygon_area(points) == 0.0:
        return None, Skip(name, "polygon has zero area", word.word_id)
    clipped = np.clip(points, [0.0, 0.0], [float(width), float(height)])
    if polygon_area(clipped) == 0.0:
        return None, Skip(name, f"polygon has zero area once clipped to the {width}x{height} image", word.word_id)
    return clipped, None


def decode_for_record(data: bytes, name: str, config: Config) -> CanonicalImage:
    """The canonical image as the record is made from it: with ``transform.jpeg_reduction=auto`` a
    JPEG decoded at the smallest scale that still gives its resized size (``reduction`` > 1)."""
    needed = None
    if config.transform.jpeg_reduction == "auto":  # decode no more pixels than the record keeps
        def needed(width: int, height: int) -> tuple[int, int]:
            return plan_resize(width, height, config.transform).resized_size
    return decode_canonical(data, name, config.source.max_pixels, needed, config.source.max_jpeg_scans)


def process_sample(sample: SourceSample, config: Config, data: bytes | None = None) -> ProcessedSample:
    """Run the live pipeline on one sample. Raises SampleError for an unusable image.

    ``data`` is the image file's bytes when the caller has already read them.
    """
    if data is None:
        data = read_image_bytes(sample.image_path, sample.name, config.source.max_file_bytes)
    digest = hashlib.sha256(data).hexdigest()
    canonical = decode_for_record(data, sample.name, config)
    width, height = canonical.size
    stored_w, stored_h = canonical.stored_size

    skips = list(sample.skips)
    kept: list[tuple[Word, np.ndarray]] = []
    for word in sample.words:
        points = word.points
        if config.source.annotation_frame == "stored":
            points = orient_points(points, canonical.orientation, stored_w, stored_h)
        clipped, skip = check_word_geometry(sample.name, word, points, width, height, config.source.outside_tolerance)
        if skip is not None:
            skips.append(skip)
        else:
            kept.append((word, clipped))

    plan: ResizePlan = plan_resize(width, height, config.transform)
    image = resize_and_pad(canonical.pixels, plan, canonical.reduction)
    forward = plan.matrix()
    originals = tuple(points for _, points in kept)
    transformed = tuple(apply_matrix(points, forward) for points in originals)
    dont_care = np.array([word.dont_care for word, _ in kept], dtype=bool)
    targets = make_targets(transformed, dont_care, plan.size, plan.size, config.targets)
    meta = SampleMeta(
        name=sample.name,
        source_sha256=digest,
        orientation=canonical.orientation,
        stored_size=(stored_w, stored_h),
        original_size=(width, height),
        resized_size=plan.resized_size,
        offset=plan.offset,
        scale=plan.scale,
        inverse_matrix=plan.inverse(),
        word_ids=tuple(word.word_id for word, _ in kept),
        texts=tuple(word.text for word, _ in kept),
        polygons_original=originals,
        polygons=transformed,
        dont_care=dont_care,
        left_out=np.asarray(targets.left_out, dtype=np.uint8),
    )
    return ProcessedSample(sample.index, image, targets, meta, tuple(skips))


def normalize_image(image: np.ndarray, normalization: Normalization = IMAGENET) -> np.ndarray:
    """CPU normalization of the live baseline: (H, W, 3) uint8 -> (3, H, W) float32."""
    mean = np.asarray(normalization.mean, dtype=np.float32) * 255.0
    std = np.asarray(normalization.std, dtype=np.float32) * 255.0
    return np.ascontiguousarray(((image.astype(np.float32) - mean) / std).transpose(2, 0, 1))
