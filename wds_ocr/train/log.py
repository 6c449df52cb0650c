"""Run metrics: one JSON object per line in ``metrics.jsonl``, mirrored to TensorBoard when it imports.

Only the main rank writes. The file is opened in append mode so a resumed run continues it;
every line is flushed as written, so a crash loses at most the line being written.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

METRICS_NAME = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def _open_tensorboard(folder: Path) -> Any:
    """A SummaryWriter, or None where torch.utils.tensorboard (the tensorboard package) is absent."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(log_dir=str(folder))


class MetricsLog:
    def __init__(self, out_dir: Path, enabled: bool = True):
        self.path = Path(out_dir) / METRICS_NAME
        self.enabled = enabled
        self._file = None
        self._board = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("a", encoding="utf-8")
            self._board = _open_tensorboard(self.path.parent / TENSORBOARD_DIR)

    def truncate_after(self, step: int) -> None:
        """Drop the records logged after ``step`` (a resume from a checkpoint at ``step`` logs them
        again), so that metrics.jsonl holds every step once. TensorBoard events are left as written."""
        if not self.enabled or self._file is None:
            return
        self._file.close()
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                logged = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a crash
                continue
            if isinstance(logged, dict) and isinstance(logged.get("step"), int) and logged["step"] <= step:
                kept.append(line + "\n")
        temporary = self.path.with_name(f".{self.path.name}.tmp")
        temporary.write_text("".join(kept), encoding="utf-8")
        temporary.replace(self.path)
        self._file = self.path.open("a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        """Append one record; numbers also go to TensorBoard as ``<event>/<name>`` at ``step``."""
        if not self.enabled:
            return
        clean = {key: (None if isinstance(value, float) and not math.isfinite(value) else value)
                 for key, value in record.items()}
        self._file.write(json.dumps(clean, sort_keys=True) + "\n")
        self._file.flush()
        if self._board is not None:
            event = str(record.get("event", "train"))
            step = int(record.get("step", 0))
            for key, value in clean.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and key not in ("step", "epoch"):
                    self._board.add_scalar(f"{event}/{key}", value, step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._board is not None:
            self._board.close()
            self._board = None


def read_metrics(out_dir: Path) -> list[dict[str, Any]]:
    """Every record of a run's ``metrics.jsonl``, in order (a line cut short by a crash is left out)."""
    path = Path(out_dir) / METRICS_NAME
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records
