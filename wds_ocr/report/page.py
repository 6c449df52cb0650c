"""The report page: one offline HTML file (relative links, no scripts), its validation table and
its learning curves."""

from __future__ import annotations

import html
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from wds_ocr.report.images import DET_COLOR, DONT_CARE_COLOR, GT_COLOR, ImageResult

CURVES_FILE = "curves.png"


def curves(run_dir: Path, out: Path, records: list[dict[str, Any]]) -> tuple[str | None, str]:
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


def validation_table(records: list[dict[str, Any]]) -> tuple[str, int]:
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


__all__ = ["CURVES_FILE", "curves", "render_page", "validation_table"]
