"""curves.png: a run's learning curves, drawn from its metrics.jsonl.

Three panels against the optimizer step: the loss and its parts (BCE, L1, dice, unweighted, log
scale), the learning rate, and validation precision / recall / H-mean. matplotlib is an optional
extra (``pip install 'wds-ocr[plot]'``); without it the trainer skips the picture (a warning,
once) and ``wds-ocr plot`` says what to install.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from wds_ocr.errors import WdsOcrError
from wds_ocr.train.log import METRICS_NAME, read_metrics

CURVES_NAME = "curves.png"
log = logging.getLogger(__name__)
_warned = False


class PlotUnavailable(WdsOcrError):
    """matplotlib is not installed."""


def _series(records: list[dict[str, Any]], event: str, name: str) -> tuple[list[int], list[float]]:
    steps, values = [], []
    for record in records:
        value = record.get(name)
        if record.get("event") == event and isinstance(value, (int, float)) and math.isfinite(value):
            steps.append(int(record["step"]))
            values.append(float(value))
    return steps, values


def draw_curves(records: list[dict[str, Any]], path: Path, title: str = "") -> Path:
    """Draw ``records`` (metrics.jsonl lines) into ``path``. Raises PlotUnavailable without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)  # no display: files only
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotUnavailable("drawing curves needs matplotlib: pip install 'wds-ocr[plot]'") from None
    figure, (losses, rates, scores) = plt.subplots(3, 1, figsize=(8, 9), sharex=True, constrained_layout=True)
    try:
        for name, label in (("loss", "total (weighted)"), ("bce", "BCE"), ("l1", "L1"), ("dice", "dice")):
            steps, values = _series(records, "train", name)
            if steps and all(v > 0 for v in values):
                losses.plot(steps, values, label=label, linewidth=1.2)
        losses.set_ylabel("training loss")
        if losses.lines:
            losses.set_yscale("log")
            losses.legend(loc="upper right", fontsize="small")
        steps, values = _series(records, "train", "lr")
        rates.plot(steps, values, color="tab:gray", linewidth=1.2)
        rates.set_ylabel("learning rate")
        for name, style in (("precision", "tab:blue"), ("recall", "tab:orange"), ("hmean", "tab:green")):
            steps, values = _series(records, "eval", name)
            scores.plot(steps, values, marker="o", markersize=3, color=style, label=name.replace("hmean", "H-mean"))
        best_steps, best = _series(records, "eval", "hmean")
        if best:
            top = max(range(len(best)), key=best.__getitem__)
            scores.annotate(f"best {best[top]:.3f}", (best_steps[top], best[top]), textcoords="offset points",
                            xytext=(0, 6), ha="center", fontsize="small")
        scores.set_ylim(0.0, 1.0)
        scores.set_ylabel("validation")
        scores.set_xlabel("optimizer step")
        if best:
            scores.legend(loc="lower right", fontsize="small")
        for axis in (losses, rates, scores):
            axis.grid(alpha=0.3)
        if title:
            losses.set_title(title)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.stem}.tmp.png")
        figure.savefig(temporary, dpi=100)
        temporary.replace(path)
    finally:
        plt.close(figure)
    return path


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Redraw ``RUN_DIR/curves.png`` (or ``out``) from ``RUN_DIR/metrics.jsonl``."""
    run_dir = Path(run_dir)
    metrics = run_dir / METRICS_NAME
    if not metrics.is_file():
        raise WdsOcrError(f"{run_dir} holds no {METRICS_NAME}: give the --out folder of a training run")
    records = read_metrics(run_dir)
    if not records:
        raise WdsOcrError(f"{metrics} holds no records yet")
    return draw_curves(records, Path(out) if out is not None else run_dir / CURVES_NAME, title=run_dir.name)


def draw_run_curves(run_dir: Path) -> Path | None:
    """What the trainer calls: redraw the run's curves; without matplotlib, warn once and go on."""
    global _warned
    try:
        return plot_run(run_dir)
    except PlotUnavailable as exc:
        if not _warned:
            log.warning("curves.png not drawn: %s", exc)
            _warned = True
        return None
