"""``wds-ocr report``: one offline HTML page that shows where a trained detector fails.

The page (``index.html`` plus PNG files beside it, relative links, no scripts and nothing
fetched from elsewhere) holds the run's learning curves, the table of its validations from
``metrics.jsonl``, the final precision / recall / H-mean of a checkpoint on validation data and
the worst images by H-mean with overlays of ground truth and detections.

*Same numbers as evaluate.* Images reach the model in the same batches as in ``wds-ocr
evaluate`` (the shard loader, or the live path's batches), their maps are computed by
``infer.detect.probability_maps`` (exactly what evaluation scores, under any precision) and each
map goes through ``infer.scoring.detect`` and ``eval.metric.match_image``: the functions the
evaluation workers call. The summed counts, so P/R/H, equal evaluate's for the same checkpoint,
data and settings.

*Per image.* P = matched / detections and R = matched / ground truth (words that are not
don't-care), H = 2 matched / (ground truth + detections): the harmonic mean of the two; an image
with neither ground truth nor detections counts as H 1.0. Images are ranked worst first: lowest H,
then most missed words, then most false detections, then name.

*Bounded memory.* Only the counts of every image are kept; pixels and polygons are kept for the
current worst ``worst`` images only (the valid region of the record image, as the model saw it).
"""

from __future__ import annotations

import bisect
import datetime
import html
import json
import math
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from wds_ocr.errors import CheckpointError, UsageError, WdsOcrError

RUN_FILE = "run.json"  # written by `train` (where the run's data came from), read here
INDEX_NAME = "index.html"
REPORT_JSON = "report.json"
OVERLAY_PREFIX = "worst-"
CURVES_FILE = "curves.png"
# Overlay colours (RGB): ground truth, don't-care ground truth, detections. Chosen to stand out
# from paper-like backgrounds and from each other; the page's legend shows the same values.
GT_COLOR = (0, 170, 0)
DONT_CARE_COLOR = (255, 140, 0)
DET_COLOR = (30, 80, 255)
# Small records are enlarged (nearest neighbour: their pixels stay visible) to at least this side.
MIN_OVERLAY_SIDE = 384

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class ImageResult:
    """One image's counts (words that are not don't-care) and its rank key."""

    index: int  # position in evaluation order
    name: str
    key: str | None  # shard record key (None through the live path)
    matched: int
    gt_care: int
    det_care: int
    detections: int  # all boxes, don't-care ones included
    dont_care_gt: int

    @property
    def missed(self) -> int:
        return self.gt_care - self.matched

    @property
    def false_detections(self) -> int:
        return self.det_care - self.matched

    @property
    def precision(self) -> float | None:
        return self.matched / self.det_care if self.det_care else None

    @property
    def recall(self) -> float | None:
        return self.matched / self.gt_care if self.gt_care else None

    @property
    def hmean(self) -> float:
        total = self.gt_care + self.det_care
        return 2.0 * self.matched / total if total else 1.0

    def rank_key(self) -> tuple[float, int, int, str, int]:
        return (self.hmean, -self.missed, -self.false_detections, self.name, self.index)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "precision": self.precision, "recall": self.recall, "hmean": self.hmean,
                "missed": self.missed, "false_detections": self.false_detections}


@dataclass(frozen=True, eq=False)
class _Kept:
    """What drawing one of the worst images needs, in the record frame of its valid region."""

    result: ImageResult
    image: np.ndarray  # (h, w, 3) uint8: the valid region of the record image
    gt: tuple[np.ndarray, ...]  # ground-truth polygons, relative to the region
    dont_care: np.ndarray  # (P,) bool
    detections: tuple[np.ndarray, ...]


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


# ---------------------------------------------------------------- evaluation


def _batches_from_shards(shards: str, loader, skipped: list[str]) -> tuple[Iterator, int]:
    from wds_ocr.infer.detect import truth_from_info
    from wds_ocr.loader.loaders import make_loader
    from wds_ocr.loader.stream import ShardStream

    stream = ShardStream(shards, loader, rank=0, world_size=1)
    total = sum(len(plan.samples) for plan in stream.plans())

    def batches() -> Iterator:
        for batch in make_loader(stream):
            skipped.extend(f"{shard} [{key}]: {reason}" for shard, key, reason in batch.skipped)
            if len(batch):
                yield batch.images, [truth_from_info(i) for i in batch.info], [i.key for i in batch.info]

    return batches(), total


def _batches_from_source(source: Path, split: str, config, loader, skipped: list[str]) -> tuple[Iterator, int]:
    from wds_ocr.data.sources import list_source
    # The live path's batches exactly as evaluate_source makes them.
    from wds_ocr.infer.evaluate import LiveSamples, live_batches

    listing = list_source(source, split, config.source)
    skipped.extend(f"{reject.name}: {reject.reason}" for reject in listing.rejects)

    def batches() -> Iterator:
        for images, truths in live_batches(LiveSamples(listing.samples, config), loader.batch_size,
                                           loader.workers, skipped):
            yield images, truths, [None] * len(truths)

    return batches(), len(listing.samples)


def _relative(polygons: Sequence[np.ndarray], forward: np.ndarray, offset: tuple[int, int]) -> tuple[np.ndarray, ...]:
    """Original-frame polygons -> the record frame (``forward``), relative to the valid region."""
    from wds_ocr.eval.postprocess import map_polygons

    shift = np.array(offset, dtype=np.float64)
    return tuple(p - shift for p in map_polygons(list(polygons), forward)) if len(polygons) else ()


def evaluate_images(checkpoint, batches: Iterator, config, precision: str, device, worst: int,
                    progress: Progress | None = None, total: int = 0) -> tuple[list[ImageResult], list[_Kept]]:
    """Every image's counts (evaluation order) and the worst ``worst`` images' pictures."""
    from wds_ocr.data.geometry import valid_region
    from wds_ocr.eval.metric import match_image
    from wds_ocr.infer.detect import content_window, probability_maps
    from wds_ocr.infer.scoring import detect

    model = checkpoint.model(device)
    results: list[ImageResult] = []
    kept: list[_Kept] = []  # sorted worst first, at most ``worst`` long
    for images, truths, keys in batches:
        window = content_window(truths, int(images.shape[1])) if config.evaluation.crop_to_content else None
        maps = probability_maps(model, images, device, precision, window)
        for row, (truth, key) in enumerate(zip(truths, keys)):
            found = detect(maps[row], truth.inverse_matrix, truth.original_size, config.postprocess)
            polygons = [d.polygon for d in found]
            counts = match_image(truth.polygons, truth.dont_care, polygons)
            result = ImageResult(len(results), truth.name, key, counts.matched, counts.gt_care, counts.det_care,
                                 len(found), int(np.count_nonzero(truth.dont_care)))
            results.append(result)
            if worst and (len(kept) < worst or result.rank_key() < kept[-1].result.rank_key()):
                (x, y), (width, height) = valid_region(truth.inverse_matrix, truth.original_size)
                forward = np.linalg.inv(truth.inverse_matrix)
                pixels = np.array(images[row].numpy()[y : y + height, x : x + width])  # a copy
                entry = _Kept(result, pixels, _relative(truth.polygons, forward, (x, y)),
                              np.asarray(truth.dont_care, dtype=bool), _relative(polygons, forward, (x, y)))
                bisect.insort(kept, entry, key=lambda k: k.result.rank_key())
                del kept[worst:]
        if progress is not None:
            progress(len(results), total)
    return results, kept


# ---------------------------------------------------------------- pictures


def draw_overlay(kept: _Kept) -> np.ndarray:
    """The record image's valid region with ground truth, don't-care ground truth and detections."""
    image = kept.image
    height, width = image.shape[:2]
    scale = max(1, math.ceil(MIN_OVERLAY_SIDE / max(height, width, 1)))
    canvas = np.ascontiguousarray(cv2.resize(image, (width * scale, height * scale), interpolation=cv2.INTER_NEAREST)
                                  if scale > 1 else image.copy())
    thick = max(2, scale // 2)

    def draw(polygons: Sequence[np.ndarray], color: tuple[int, int, int], thickness: int) -> None:
        for polygon in polygons:
            points = np.round(np.asarray(polygon, dtype=np.float64) * scale).astype(np.int32).reshape(-1, 1, 2)
            cv2.polylines(canvas, [points], isClosed=True, color=color, thickness=thickness, lineType=cv2.LINE_AA)

    draw([p for p, ignored in zip(kept.gt, kept.dont_care) if not ignored], GT_COLOR, thick)
    draw([p for p, ignored in zip(kept.gt, kept.dont_care) if ignored], DONT_CARE_COLOR, thick)
    draw(kept.detections, DET_COLOR, max(1, thick // 2))
    return canvas


def _curves(run_dir: Path, out: Path, records: list[dict[str, Any]]) -> tuple[str | None, str]:
    """(the curves' file name in ``out`` or None, a sentence for the page)."""
    from wds_ocr.train.curves import CURVES_NAME, PlotUnavailable, draw_curves

    target = out / CURVES_FILE
    drawn = run_dir / CURVES_NAME
    same = target.resolve() == drawn.resolve()  # --out RUN_DIR: never delete the run's own picture
    if not records:
        if not same:
            target.unlink(missing_ok=True)
        return None, "metrics.jsonl holds no records yet: no curves to draw."
    try:
        draw_curves(records, target, title=run_dir.name)
        return CURVES_FILE, "Drawn from metrics.jsonl for this report."
    except PlotUnavailable:
        if drawn.is_file():
            if not same:
                shutil.copyfile(drawn, target)
            return CURVES_FILE, (f"Copied from {drawn} (matplotlib is not installed here, so it was not redrawn: "
                                 "it shows the run as of its last drawing).")
    target.unlink(missing_ok=True)
    return None, ("No curves: matplotlib is not installed. Install it with pip install 'wds-ocr[plot]', then run "
                  f"wds-ocr plot {run_dir} (or this report again).")


# ---------------------------------------------------------------- the page


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _num(value: float | None, digits: int = 4) -> str:
    return "&ndash;" if value is None else f"{value:.{digits}f}"


def _validation_table(records: list[dict[str, Any]]) -> tuple[str, int]:
    rows = [r for r in records if r.get("event") == "eval" and isinstance(r.get("hmean"), (int, float))]
    if not rows:
        return ("<p>No validation records in metrics.jsonl (the run was trained without --val-shards, or "
                "has not validated yet).</p>"), 0
    best = max(range(len(rows)), key=lambda i: rows[i]["hmean"])
    body = []
    for i, r in enumerate(rows):
        cells = [_e(r.get("step", "")), _e(r.get("epoch", "")), *(_num(r.get(k)) for k in ("precision", "recall",
                                                                                            "hmean")),
                 _e(r.get("matched", "")), _e(r.get("gt_care", "")), _e(r.get("det_care", "")),
                 _e(r.get("images", ""))]
        mark = ' class="best"' if i == best else ""
        body.append(f"<tr{mark}>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    head = ("<tr><th>step</th><th>epoch</th><th>P</th><th>R</th><th>H</th><th>matched</th><th>ground truth</th>"
            "<th>detections</th><th>images</th></tr>")
    return (f"<table class=\"num\">{head}{''.join(body)}</table>"
            "<p class=\"note\">The best H-mean is highlighted.</p>"), len(rows)


_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 24px; color: #222; background: #fff; }
h1 { font-size: 1.5em; margin-bottom: 0.2em; } h2 { font-size: 1.2em; margin-top: 1.6em; }
table { border-collapse: collapse; margin: 0.5em 0; } th, td { border: 1px solid #ccc; padding: 3px 8px; }
th { background: #eef1f5; text-align: left; } table.num td { text-align: right; }
tr.best td { background: #e6f4e6; font-weight: bold; }
.score { font-size: 1.3em; } .score td { padding: 6px 14px; } .note { color: #555; font-size: 0.9em; }
.legend span.swatch { display: inline-block; width: 28px; height: 12px; margin: 0 6px 0 14px; vertical-align: middle; }
.worst img { max-width: 480px; height: auto; image-rendering: pixelated; display: block; }
.worst td { vertical-align: top; } code { background: #f4f4f4; padding: 0 3px; }
"""


def _rgb(color: tuple[int, int, int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*color)


def render_page(*, title: str, score, images: int, worst: Sequence[ImageResult], overlays: Sequence[str],
                details: list[tuple[str, str]], summary: str, skipped: Sequence[str], curves_file: str | None,
                curves_note: str, validation_html: str) -> str:
    """The page's HTML; every value from outside is escaped here. Order: the score, the worst
    images, the curves and validations, then the details and the skipped samples."""
    parts = [f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{_e(title)}</title>"
             f"<style>{_STYLE}</style></head><body>",
             f"<h1>{_e(title)}</h1>",
             "<table class=\"score num\" id=\"score\"><tr><th>precision</th><th>recall</th><th>H-mean</th>"
             "<th>matched</th><th>ground truth</th><th>detections</th><th>images</th></tr>"
             f"<tr><td id=\"precision\">{score.precision:.4f}</td><td id=\"recall\">{score.recall:.4f}</td>"
             f"<td id=\"hmean\">{score.hmean:.4f}</td><td>{score.matched}</td><td>{score.gt_care}</td>"
             f"<td>{score.det_care}</td><td>{images}</td></tr></table>",
             f"<p>{_e(summary)}"
             + (f" <strong><a href=\"#skipped\">{len(skipped)} skipped samples</a></strong>." if skipped else "")
             + "</p><p class=\"note\">ICDAR 2015 IoU protocol in original image coordinates: the numbers wds-ocr "
             "evaluate prints for this checkpoint, data and settings. Ground truth and detections count words "
             "that are not don't-care.</p>"]
    parts.append(f"<h2>Worst {len(worst)} of {images} images by H-mean</h2>")
    legend = "".join(f"<span class=\"swatch\" style=\"background:{_rgb(color)}\"></span>{_e(text)}"
                     for color, text in ((GT_COLOR, "ground truth"), (DONT_CARE_COLOR, "don't-care ground truth"),
                                         (DET_COLOR, "detections")))
    parts.append(f"<p class=\"legend\" id=\"legend\">{legend}</p>"
                 "<p class=\"note\">Drawn on the record image the model saw (its resized, unpadded region; small "
                 "records enlarged); click a picture for the full-size file. Per image: P = matched / detections, "
                 "R = matched / ground truth, H their harmonic mean (an image with neither counts as 1.0); ranked "
                 "by H, then missed words.</p>")
    if worst:
        rows = []
        for rank, (item, picture) in enumerate(zip(worst, overlays), start=1):
            name = _e(item.name) + (f"<br><span class=\"note\">{_e(item.key)}</span>" if item.key else "")
            counts = (f"{item.matched} matched / {item.gt_care} ground truth / {item.det_care} detections"
                      f"<br>{item.missed} missed, {item.false_detections} false"
                      + (f", {item.dont_care_gt} don't-care" if item.dont_care_gt else ""))
            rows.append(f"<tr><td>{rank}</td><td>{name}</td><td class=\"h\">{_num(item.hmean, 3)}</td>"
                        f"<td>{_num(item.precision, 3)}</td><td>{_num(item.recall, 3)}</td><td>{counts}</td>"
                        f"<td><a href=\"{_e(picture)}\"><img class=\"overlay\" src=\"{_e(picture)}\" "
                        f"alt=\"{_e(item.name)}\"></a></td></tr>")
        parts.append("<table class=\"worst\" id=\"worst\"><tr><th>#</th><th>image</th><th>H</th><th>P</th><th>R</th>"
                     "<th>counts</th><th>overlay</th></tr>" + "".join(rows) + "</table>")
    parts.append("<h2>Learning curves</h2>")
    if curves_file:
        parts.append(f"<img id=\"curves\" src=\"{_e(curves_file)}\" alt=\"learning curves\" width=\"640\">")
    parts.append(f"<p class=\"note\">{_e(curves_note)}</p>")
    parts.append("<h2>Validations during training</h2>" + validation_html)
    parts.append("<h2>Details</h2><table id=\"details\">"
                 + "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in details) + "</table>")
    if skipped:
        parts.append(f"<h2>Skipped samples ({len(skipped)})</h2><ul id=\"skipped\">"
                     + "".join(f"<li>{_e(s)}</li>" for s in skipped) + "</ul>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


# ---------------------------------------------------------------- the command's work


def write_report(run_dir: str | Path, out: str | Path | None = None, *, checkpoint: str | Path | None = None,
                 shards: str | None = None, source: str | Path | None = None, split: str = "val", worst: int = 12,
                 device: str = "auto", batch_size: int | None = None, workers: int | None = None,
                 precision: str | None = None, overrides: Sequence[str] = (),
                 progress: Progress | None = None) -> Report:
    """Evaluate ``checkpoint`` (default RUN_DIR/best.pt, else last.pt) on validation data (``shards``,
    ``source``/``split``, else run.json's val_shards) and write ``out`` (default RUN_DIR/report)."""
    from wds_ocr import __version__
    from wds_ocr.config import LoaderConfig
    from wds_ocr.eval.metric import DetectionMetric
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
    changes = {k: v for k, v in (("batch_size", batch_size), ("workers", workers)) if v is not None}
    loader = LoaderConfig.model_validate({**config.loader.model_dump(), **changes})
    skipped: list[str] = []
    fingerprints = [("record settings fingerprint (checkpoint)", config.fingerprint())]
    if shards is not None:
        from wds_ocr.loader.remote import open_location

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
            batches, total = _batches_from_shards(str(shards), loader, skipped)
        else:
            batches, total = _batches_from_source(Path(source), split, config, loader, skipped)
        results, kept = evaluate_images(opened, batches, config, precision, runtime.device, worst, progress, total)
    finally:
        stop_runtime(runtime)
    metric = DetectionMetric()
    for r in results:
        metric.matched += r.matched
        metric.gt_care += r.gt_care
        metric.det_care += r.det_care
        metric.images += 1
    score = metric.score()

    from wds_ocr.viz import write_png

    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob(f"{OVERLAY_PREFIX}*.png"):  # a previous report's pictures
        old.unlink()
    overlays = []
    for rank, entry in enumerate(kept, start=1):
        path = out / f"{OVERLAY_PREFIX}{rank:03d}.png"
        write_png(path, draw_overlay(entry))
        overlays.append(path)
    curves_file, curves_note = _curves(run_dir, out, records)
    validation_html, validations = _validation_table(records)
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
    temporary = out / f".{INDEX_NAME}.tmp"
    temporary.write_text(page, encoding="utf-8")
    temporary.replace(index)
    summary = {"precision": score.precision, "recall": score.recall, "hmean": score.hmean, "matched": score.matched,
               "gt_care": score.gt_care, "det_care": score.det_care, "images": score.images,
               "checkpoint": str(checkpoint_path), "data": data, "precision_mode": precision,
               "skipped": skipped, "generated": generated,
               "worst": [dict(r.as_dict(), overlay=p.name) for r, p in zip(worst_results, overlays)],
               "per_image": [r.as_dict() for r in ranked]}
    (out / REPORT_JSON).write_text(json.dumps(summary, indent=1, sort_keys=True), encoding="utf-8")
    return Report(index, score, tuple(ranked), tuple(worst_results), tuple(overlays), tuple(skipped),
                  checkpoint_path, data, curves_note, validations)


__all__ = ["ImageResult", "Report", "draw_overlay", "evaluate_images", "render_page", "write_report"]
