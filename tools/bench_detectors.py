"""wds-ocr checkpoints beside the off-the-shelf PP-OCRv4 detector, on the same images, scored the same way.

    .venv/bin/python tools/bench_detectors.py ../shared/data/sroie-dev --split val \
        --checkpoint runs/sroie-ppocr/last.pt [--checkpoint other.pt ...] [--no-peer] [--json out.json]

Every detector gets each image of the split decoded once by wds-ocr (EXIF orientation applied,
RGB uint8, the frame the annotations use) and returns polygons in that frame; each image's polygons
are matched against the same ground truth (the live path's, exactly what ``wds-ocr evaluate``
scores) with wds-ocr's ICDAR 2015 IoU metric, and the counts are summed over the split.

- **PP-OCRv4** (the peer): ``rapidocr_onnxruntime.RapidOCR()`` as the wheel ships it, called with
  ``use_det=True, use_cls=False, use_rec=False`` and default settings, on the image as BGR (what
  the wheel expects of an array). Install it without its dependencies, which would replace
  opencv-python-headless's cv2 with the GUI build: ``pip install --no-deps rapidocr-onnxruntime==1.4.4``
  plus ``pip install onnxruntime six`` (the rest it needs is already wds-ocr's).
- **a checkpoint**: resize and pad per ``transform`` (the checkpoint's settings, ``--set`` on top),
  one forward pass (on the image's part of the record with ``evaluation.crop_to_content``), DB
  post-processing, boxes mapped back through the inverse matrix: what ``wds-ocr predict`` does for
  one image. With ``transform.jpeg_reduction=auto`` (the default) the checkpoint decodes the file
  again at the reduced scale its records use, inside its clock.

images/s and CPU-s per image cover only the detector's own work on the decoded image (its resize,
normalization, network and post-processing; decoding and ground truth are outside the clock), one
image at a time, on the same threads (torch and onnxruntime each use the machine's cores).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from wds_ocr.config import Config, load_config
from wds_ocr.data.geometry import plan_resize, resize_and_pad
from wds_ocr.data.images import decode_canonical, read_image_bytes
from wds_ocr.data.pipeline import decode_for_record
from wds_ocr.data.pipeline import process_sample
from wds_ocr.data.sources import list_source
from wds_ocr.errors import SampleError
from wds_ocr.eval.metric import DetectionMetric
from wds_ocr.infer.detect import ImageTruth, content_window, detect, probability_maps
from wds_ocr.run.checkpoint import open_checkpoint

Detector = Callable[[np.ndarray, bytes], list[np.ndarray]]  # (canonical RGB image, file bytes) -> polygons


@dataclass
class Row:
    name: str
    precision: float
    recall: float
    hmean: float
    matched: int
    gt_care: int
    det_care: int
    images: int
    seconds: float
    cpu_seconds: float

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds else 0.0

    @property
    def cpu_per_image(self) -> float:
        return self.cpu_seconds / self.images if self.images else 0.0


def ppocr_detector() -> Detector:
    from rapidocr_onnxruntime import RapidOCR

    engine = RapidOCR()

    def run(pixels: np.ndarray, data: bytes) -> list[np.ndarray]:
        result, _ = engine(np.ascontiguousarray(pixels[:, :, ::-1]), use_det=True, use_cls=False, use_rec=False)
        return [np.asarray(box, dtype=np.float64).reshape(-1, 2) for box in (result or [])]

    return run


def checkpoint_detector(path: Path, overrides: list[str]) -> tuple[Detector, Config]:
    checkpoint = open_checkpoint(path)
    config = checkpoint.configured(overrides)
    device = torch.device("cpu")
    model = checkpoint.model(device)

    def run(pixels: np.ndarray, data: bytes) -> list[np.ndarray]:
        height, width = pixels.shape[:2]
        plan = plan_resize(width, height, config.transform)
        reduction = 1
        if config.transform.jpeg_reduction != "off":  # as predict and the records do: timed here, the
            canonical = decode_for_record(data, "", config)  # peer's decode is not
            pixels, reduction = canonical.pixels, canonical.reduction
        image = resize_and_pad(pixels, plan, reduction)
        window = None
        if config.evaluation.crop_to_content:
            window = content_window([ImageTruth("", (width, height), plan.inverse(), (), np.zeros(0, bool),
                                                np.zeros(0, np.uint8))], config.transform.size)
        prob = probability_maps(model, torch.from_numpy(image[None]), device, "32", window)[0]
        return [d.polygon for d in detect(prob, plan.inverse(), (width, height), config.postprocess)]

    return run, config


def score(name: str, detector: Detector, samples: list[tuple[np.ndarray, bytes, object]]) -> Row:
    metric = DetectionMetric()
    wall = cpu = 0.0
    for pixels, data, meta in samples:
        wall_start, cpu_start = time.perf_counter(), time.process_time()
        polygons = detector(pixels, data)
        wall += time.perf_counter() - wall_start
        cpu += time.process_time() - cpu_start
        metric.update(meta.polygons_original, meta.dont_care, polygons)
    result = metric.score()
    return Row(name, result.precision, result.recall, result.hmean, result.matched, result.gt_care, result.det_care,
               result.images, wall, cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path)
    parser.add_argument("--split", default="val")
    parser.add_argument("--checkpoint", type=Path, action="append", default=[])
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="setting applied to every checkpoint's config (e.g. transform.size=1280)")
    parser.add_argument("--no-peer", action="store_true", help="skip PP-OCRv4")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()

    detectors: list[tuple[str, Detector]] = []
    truth_config = load_config(None, args.overrides) if not args.checkpoint else None
    for path in args.checkpoint:
        detector, config = checkpoint_detector(path, args.overrides)
        detectors.append((f"wds-ocr {path} (size {config.transform.size})", detector))
        truth_config = truth_config or config
    if not args.no_peer:
        detectors.insert(0, ("PP-OCRv4 det (rapidocr-onnxruntime 1.4.4, defaults)", ppocr_detector()))
    listing = list_source(args.source, args.split, truth_config.source)
    # Ground truth as the live path makes it; the transform size does not change the original-frame
    # polygons, so the cheapest size serves.
    truth_settings = truth_config.model_copy(update={"transform": truth_config.transform.model_copy(update={"size": 320})})
    samples = []
    skipped = [f"{reject.name}: {reject.reason}" for reject in listing.rejects]
    for sample in listing.samples:
        try:
            data = read_image_bytes(sample.image_path, sample.name, truth_config.source.max_file_bytes)
            pixels = decode_canonical(data, sample.name, truth_config.source.max_pixels).pixels
            meta = process_sample(sample, truth_settings, data).meta
        except SampleError as exc:
            skipped.append(str(exc))
            continue
        samples.append((pixels, data, meta))
    print(f"{args.source} split {args.split}: {len(samples)} images ({len(skipped)} skipped); "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores")
    rows = [score(name, detector, samples) for name, detector in detectors]
    print(f"{'detector':64s} {'P':>7s} {'R':>7s} {'H-mean':>7s} {'images/s':>9s} {'CPU-s/img':>9s}")
    for row in rows:
        print(f"{row.name:64s} {row.precision:7.4f} {row.recall:7.4f} {row.hmean:7.4f} {row.images_per_s:9.2f} "
              f"{row.cpu_per_image:9.2f}")
    for item in skipped:
        print(f"skipped {item}")
    if args.json:
        args.json.write_text(json.dumps([{**asdict(r), "images_per_s": r.images_per_s} for r in rows], indent=1) + "\n")


if __name__ == "__main__":
    main()
