"""Predict text boxes on image files: JSON per image plus an overlay picture.

Each image is decoded canonically (EXIF orientation applied: the frame a viewer shows), resized
and padded exactly as for training, run through the model, and its boxes mapped back to that
original frame with the transform's inverse matrix (``detect``, the code evaluation uses). For
``photo.jpg`` the outputs are ``OUT/photo.json``:

    {"image": "photo.jpg", "width": W, "height": H,
     "polygons": [{"points": [[x, y], ...], "score": s}, ...]}

and ``OUT/photo.png``, the image with the boxes drawn. A file that cannot be used raises
``SampleError`` naming it (or, with ``on_error="skip"``, is listed in ``PredictResult.failed``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from wds_ocr.data.paths import write_atomic
from wds_ocr.config import Config
from wds_ocr.data.geometry import plan_resize, resize_and_pad
from wds_ocr.data.images import decode_canonical, read_image_bytes
from wds_ocr.data.pipeline import decode_for_record
from wds_ocr.errors import ConfigError, SampleError
from wds_ocr.eval.postprocess import Detection
from wds_ocr.infer.detect import content_window, detect, probability_maps
from wds_ocr.infer.export import OnnxDetector
from wds_ocr.run.checkpoint import Checkpoint, open_checkpoint
from wds_ocr.run.runtime import check_precision, resolve_device
from wds_ocr.report.draw import draw_polygons, write_png

# Coordinates in the JSON are rounded to this many decimals (1/100 px).
DECIMALS = 2
# Overlay line width: one pixel per this many pixels of the longer side (at least 1).
PIXELS_PER_LINE_WIDTH = 500

PredictProgress = Callable[[int, int], None]  # (images done, images in total)


@dataclass(frozen=True)
class Prediction:
    image: Path
    json_path: Path
    overlay_path: Path | None
    width: int
    height: int
    polygons: int


@dataclass(frozen=True)
class PredictResult:
    predictions: tuple[Prediction, ...]
    failed: tuple[str, ...]  # "file: reason", only with on_error="skip"
    seconds: float
    images_per_s: float


@dataclass(frozen=True)
class _Prepared:
    path: Path
    pixels: np.ndarray | None  # canonical (displayed-frame) RGB image at full size, for the overlay
    original_size: tuple[int, int]  # (width, height) in the displayed frame
    image: np.ndarray  # (S, S, 3) uint8, transformed as a record is (transform.jpeg_reduction included)
    inverse_matrix: np.ndarray


def _prepare(path: Path, config: Config, overlay: bool) -> _Prepared:
    limits = config.source  # the same image limits as a build: source.max_file_bytes, source.max_pixels
    data = read_image_bytes(path, str(path), limits.max_file_bytes)
    canonical = decode_for_record(data, str(path), config)
    width, height = canonical.size
    plan = plan_resize(width, height, config.transform)
    image = resize_and_pad(canonical.pixels, plan, canonical.reduction)
    pixels = None
    if overlay:  # drawn in original coordinates: the whole image
        pixels = canonical.pixels if canonical.reduction == 1 else decode_canonical(
            data, str(path), limits.max_pixels, max_scans=limits.max_jpeg_scans).pixels
    return _Prepared(path, pixels, (width, height), image, plan.inverse())


def prediction_json(name: str, width: int, height: int, detections: list[Detection]) -> dict:
    return {
        "image": name,
        "width": width,
        "height": height,
        "polygons": [
            {"points": [[round(float(x), DECIMALS), round(float(y), DECIMALS)] for x, y in d.polygon],
             "score": round(float(d.score), 4)}
            for d in detections
        ],
    }


def _write_json(path: Path, body: dict) -> None:
    write_atomic(path, (json.dumps(body, indent=1) + "\n").encode("utf-8"), durable=False)


def _check_stems(images: list[Path]) -> None:
    seen: dict[str, Path] = {}
    for path in images:
        if path.stem in seen:
            raise ConfigError(f"{seen[path.stem]} and {path} would both write {path.stem}.json; "
                              "predict them into different output folders")
        seen[path.stem] = path


def _batches(images: list[Path], config: Config, batch_size: int, on_error: str,
             failed: list[str], overlay: bool) -> Iterator[list[_Prepared]]:
    batch: list[_Prepared] = []
    for path in images:
        try:
            batch.append(_prepare(path, config, overlay))
        except SampleError as exc:
            if on_error == "raise":
                raise
            failed.append(str(exc))
            continue
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def predict(checkpoint: str | Path | Checkpoint | OnnxDetector, images: list[Path], out_dir: str | Path,
            config: Config | None = None, precision: str = "auto", batch_size: int = 4, device: str = "auto",
            overlay: bool = True, on_error: str = "raise", progress: PredictProgress | None = None) -> PredictResult:
    """Write ``<stem>.json`` (and ``<stem>.png`` when ``overlay``) for every image into ``out_dir``.

    ``checkpoint`` is a path, an open ``Checkpoint``, or an ``OnnxDetector`` (a file from
    ``wds-ocr export``, run by onnxruntime on the CPU); ``config`` (default: the checkpoint's or
    the file's) supplies the transform and post-processing settings.
    """
    check_precision(precision)
    if on_error not in ("raise", "skip"):
        raise ConfigError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    images = [Path(p) for p in images]
    _check_stems(images)
    if isinstance(checkpoint, OnnxDetector):
        config = config or checkpoint.config
        maps_of: Callable[[np.ndarray, tuple[slice, slice] | None], np.ndarray] = checkpoint.probability_maps
    else:
        checkpoint = open_checkpoint(checkpoint)
        torch_device = resolve_device(device)
        model = checkpoint.model(torch_device)
        config = config or checkpoint.config

        def maps_of(stacked: np.ndarray, window: tuple[slice, slice] | None) -> np.ndarray:
            return probability_maps(model, torch.from_numpy(stacked), torch_device, precision, window)

    out_dir = Path(out_dir)  # made when the first result is written: a run that predicts nothing leaves none
    predictions: list[Prediction] = []
    failed: list[str] = []
    started = time.perf_counter()
    for batch in _batches(images, config, batch_size, on_error, failed, overlay):
        stacked = np.stack([p.image for p in batch])
        window = content_window(batch, stacked.shape[1]) if config.evaluation.crop_to_content else None
        prob = maps_of(stacked, window)
        out_dir.mkdir(parents=True, exist_ok=True)
        for sample_prob, prepared in zip(prob, batch):
            width, height = prepared.original_size
            detections = detect(sample_prob, prepared.inverse_matrix, (width, height), config.postprocess)
            json_path = out_dir / f"{prepared.path.stem}.json"
            _write_json(json_path, prediction_json(prepared.path.name, width, height, detections))
            overlay_path = None
            if overlay:
                overlay_path = out_dir / f"{prepared.path.stem}.png"
                line = max(1, round(max(width, height) / PIXELS_PER_LINE_WIDTH))
                write_png(overlay_path, draw_polygons(prepared.pixels, [d.polygon for d in detections], thickness=line))
            predictions.append(Prediction(prepared.path, json_path, overlay_path, width, height, len(detections)))
        if progress is not None:
            progress(len(predictions) + len(failed), len(images))
    seconds = time.perf_counter() - started
    return PredictResult(tuple(predictions), tuple(failed), seconds,
                         len(predictions) / seconds if seconds > 0 else 0.0)
