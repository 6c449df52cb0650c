"""``wds-ocr report``: one offline HTML page that shows where a trained detector fails.

The page (``index.html`` plus PNG files beside it, relative links, no scripts and nothing
fetched from elsewhere) holds the run's learning curves, the table of its validations from
``metrics.jsonl``, the final precision / recall / H-mean of a checkpoint on validation data and
the worst images by H-mean with overlays of ground truth and detections.

*Same numbers as evaluate.* The counts come from evaluate's own run (``infer.detect.run_detection``):
the same batches (the shard loader, or the live path's), content windows, post-processing workers
and scorer, so P/R/H equal evaluate's for the same checkpoint, data and settings. The pictures of
the worst images are made afterwards: each record image is read again (by key from the shards, or
through the live path by name) and its detections made again on its batch's window by the
functions the scoring workers call.

*Per image.* P = matched / detections and R = matched / ground truth (words that are not
don't-care), H = 2 matched / (ground truth + detections): the harmonic mean of the two; an image
with neither ground truth nor detections counts as H 1.0. Images are ranked worst first: lowest H,
then most missed words, then most false detections, then name.

*Bounded memory.* Only the counts and ground truth of every image are kept; pixels are read again
for the ``worst`` images only (the valid region of the record image, as the model saw it).
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wds_ocr.data.paths import write_atomic
from wds_ocr.errors import CheckpointError, UsageError, WdsOcrError
from wds_ocr.report.images import (DET_COLOR, DONT_CARE_COLOR, GT_COLOR, ImageResult, Progress, batches_from_shards,
                                    batches_from_source, draw_overlay, evaluate_images)
from wds_ocr.report.page import curves, render_page, validation_table

RUN_FILE = "run.json"  # written by `train` (where the run's data came from), read here
INDEX_NAME = "index.html"
REPORT_JSON = "report.json"
OVERLAY_PREFIX = "worst-"

@dataclass(frozen=True)
class Report:
    index: Path  # the page
    score: Any  # DetectionScore over all images (evaluate's)
    images: tuple[ImageResult, ...]  # every image, worst first
    worst: tuple[ImageResult, ...]
    overlays: tuple[Path, ...]
    skipped: tuple[str, ...]
    checkpoint: Path
    data: str  # "shards ..." or "source ... split ..."
    curves: str  # what the page shows for the curves
    validations: int  # eval records of metrics.jsonl


# ---------------------------------------------------------------- inputs


def run_metrics(run_dir: Path) -> list[dict[str, Any]]:
    from wds_ocr.train.log import METRICS_NAME, read_metrics

    if not (run_dir / METRICS_NAME).is_file():
        raise WdsOcrError(f"{run_dir} holds no {METRICS_NAME}: give the --out folder of a training run")
    return read_metrics(run_dir)


def run_checkpoint(run_dir: Path, checkpoint: Path | None) -> Path:
    """``checkpoint``, else RUN_DIR/best.pt, else RUN_DIR/last.pt."""
    from wds_ocr.run.checkpoint import BEST_NAME, LAST_NAME

    if checkpoint is not None:
        return Path(checkpoint)
    for name in (BEST_NAME, LAST_NAME):
        if (run_dir / name).is_file():
            return run_dir / name
    raise CheckpointError(f"{run_dir} holds neither {BEST_NAME} nor {LAST_NAME}: pass --checkpoint")


def run_val_shards(run_dir: Path) -> str:
    """The validation shards the run was trained with, from RUN_DIR/run.json (written by train)."""
    hint = "pass --shards VAL_SHARDS or --source DIR --split val"
    path = run_dir / RUN_FILE
    if not path.is_file():
        raise UsageError(f"no validation data given and {path} does not exist to name the run's: {hint}")
    try:
        body = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"{path} cannot be read as JSON ({exc}): {hint}") from None
    value = body.get("val_shards") if isinstance(body, dict) else None
    if not isinstance(value, str) or not value:
        raise UsageError(f"{path} names no validation shards (val_shards is {value!r}): {hint}")
    return value


# ---------------------------------------------------------------- the command's work


def write_report(run_dir: str | Path, out: str | Path | None = None, *, checkpoint: str | Path | None = None,
                 shards: str | None = None, source: str | Path | None = None, split: str = "val", worst: int = 12,
                 device: str = "auto", batch_size: int | None = None, workers: int | None = None,
                 precision: str | None = None, overrides: Sequence[str] = (),
                 progress: Progress | None = None) -> Report:
    """Evaluate ``checkpoint`` (default RUN_DIR/best.pt, else last.pt) on validation data (``shards``,
    ``source``/``split``, else run.json's val_shards) and write ``out`` (default RUN_DIR/report)."""
    from wds_ocr import __version__
    from wds_ocr.eval.metric import DetectionMetric
    from wds_ocr.infer.detect import resolve_post_workers
    from wds_ocr.run.checkpoint import open_checkpoint
    from wds_ocr.run.runtime import check_precision, resolve_precision, start_runtime, stop_runtime

    run_dir = Path(run_dir)
    out = Path(out) if out is not None else run_dir / "report"
    if worst < 0:
        raise UsageError(f"--worst must be 0 or more, got {worst}")
    if shards is not None and source is not None:
        raise UsageError("give at most one of --shards or --source")
    records = run_metrics(run_dir)
    checkpoint_path = run_checkpoint(run_dir, Path(checkpoint) if checkpoint is not None else None)
    if shards is None and source is None:
        shards = run_val_shards(run_dir)
    opened = open_checkpoint(checkpoint_path)
    config = opened.configured(tuple(overrides))
    precision = precision or config.train.precision
    check_precision(precision)
    loader = config.loader.changed(batch_size=batch_size, workers=workers)
    skipped: list[str] = []
    fingerprints = [("record settings fingerprint (checkpoint)", config.fingerprint())]
    if shards is not None:
        from wds_ocr.storage.location import open_location

        manifest, _ = open_location(shards)
        fingerprints.append(("shards fingerprint", manifest.fingerprint
                             + ("" if manifest.fingerprint == config.fingerprint() else
                                "  (differs from the checkpoint's record settings)")))
        data = f"shards {shards}"
    else:
        data = f"source {source}, split {split} (live path)"
    runtime = start_runtime(device)
    try:
        precision = resolve_precision(precision, runtime.device)
        if shards is not None:
            batches, total, fetch = batches_from_shards(str(shards), loader, skipped)
        else:
            batches, total, fetch = batches_from_source(Path(source), split, config, loader, skipped)
        post_workers = resolve_post_workers(config.evaluation.post_workers, loader.workers, runtime)
        results, kept = evaluate_images(opened, batches, config, precision, runtime.device, worst, fetch,
                                        post_workers=post_workers, capacity=loader.batch_size, progress=progress,
                                        total=total)
    finally:
        stop_runtime(runtime)
    metric = DetectionMetric()
    for r in results:
        metric.matched += r.matched
        metric.gt_care += r.gt_care
        metric.det_care += r.det_care
        metric.images += 1
    score = metric.score()

    from wds_ocr.report.draw import write_png

    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob(f"{OVERLAY_PREFIX}*.png"):  # a previous report's pictures
        old.unlink()
    overlays = []
    for rank, entry in enumerate(kept, start=1):
        path = out / f"{OVERLAY_PREFIX}{rank:03d}.png"
        write_png(path, draw_overlay(entry))
        overlays.append(path)
    curves_file, curves_note = curves(run_dir, out, records)
    validation_html, validations = validation_table(records)
    post = config.postprocess
    generated = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    details = [("run", str(run_dir)), ("checkpoint", str(checkpoint_path)), ("validation data", data),
               ("images evaluated", str(len(results))), ("skipped samples", str(len(skipped))),
               ("precision mode", precision),
               ("post-processing", f"mode {post.mode}, thresh {post.thresh}, box_thresh {post.box_thresh}, "
                                   f"unclip_ratio {post.unclip_ratio}, min_size {post.min_size}"),
               ("record size", f"{config.transform.size} px"), *fingerprints,
               ("generated", f"{generated} by wds-ocr {__version__}")]
    ranked = sorted(results, key=ImageResult.rank_key)
    worst_results = [k.result for k in kept]
    page = render_page(title=f"wds-ocr report: {run_dir.name or run_dir}", score=score, images=len(results),
                       worst=worst_results, overlays=[p.name for p in overlays], details=details,
                       summary=f"Checkpoint {checkpoint_path} on {data}: {len(results)} images, {generated}.",
                       skipped=skipped,
                       curves_file=curves_file, curves_note=curves_note, validation_html=validation_html)
    index = out / INDEX_NAME
    write_atomic(index, page.encode("utf-8"), durable=False)
    summary = {"precision": score.precision, "recall": score.recall, "hmean": score.hmean, "matched": score.matched,
               "gt_care": score.gt_care, "det_care": score.det_care, "images": score.images,
               "checkpoint": str(checkpoint_path), "data": data, "precision_mode": precision,
               "skipped": skipped, "generated": generated,
               "worst": [dict(r.as_dict(), overlay=p.name) for r, p in zip(worst_results, overlays)],
               "per_image": [r.as_dict() for r in ranked]}
    write_atomic(out / REPORT_JSON, json.dumps(summary, indent=1, sort_keys=True).encode("utf-8"), durable=False)
    return Report(index, score, tuple(ranked), tuple(worst_results), tuple(overlays), tuple(skipped),
                  checkpoint_path, data, curves_note, validations)


__all__ = ["DET_COLOR", "DONT_CARE_COLOR", "GT_COLOR", "RUN_FILE", "ImageResult", "Report", "draw_overlay",
           "evaluate_images", "render_page", "write_report"]
