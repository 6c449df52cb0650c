"""Target coverage: how many annotated words made it into the training targets, and why the rest did not.

A word that reaches the target step is either in the targets (``gt`` holds its shrunk polygon) or
left out of them, for one of three reasons (``LeftOut`` codes stored per polygon in every record):
marked don't-care in the annotations, too small for ``targets.min_text_size`` (or under a pixel
of area once clipped), or its shrunk polygon vanished (``targets.shrink_ratio``). Words left out
for size are still ground truth to evaluation, so they cap the recall a model can reach: the
build reports them and warns when they are more than ``SIZE_WARNING_SHARE`` of the words that
are not don't-care.

Words skipped before the target step (bad geometry in the annotations) are not counted here;
they are in ``rejects.jsonl`` with their reasons.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, fields
from enum import IntEnum
from typing import Any

import numpy as np


class LeftOut(IntEnum):
    """Why a polygon is not in the training targets (0: it is). Stored per polygon in records."""

    KEPT = 0
    DONT_CARE = 1  # marked don't-care in the annotations
    TOO_SMALL = 2  # smaller side below targets.min_text_size, or (clipped) area below 1 pixel
    SHRINK_VANISHED = 3  # the shrink offset left nothing (targets.shrink_ratio)

# Warn when more than this share of the (not don't-care) words is left out for size.
SIZE_WARNING_SHARE = 0.10


@dataclass(frozen=True)
class Coverage:
    """Word counts of a sample, a shard or a whole build."""

    words: int = 0  # words that reached the target step
    in_targets: int = 0
    dont_care: int = 0
    too_small: int = 0
    shrink_vanished: int = 0

    @classmethod
    def from_codes(cls, codes: Iterable[int] | np.ndarray) -> "Coverage":
        """Counts of one record's ``left_out`` codes. Raises ValueError on an unknown code."""
        values = np.asarray(codes, dtype=np.int64).reshape(-1)
        if values.size and (values.min() < 0 or values.max() >= len(LeftOut)):
            raise ValueError(f"left_out codes must be 0..{len(LeftOut) - 1}, got {sorted(set(values.tolist()))}")
        counts = np.bincount(values, minlength=len(LeftOut))
        return cls(
            words=int(values.size),
            in_targets=int(counts[LeftOut.KEPT]),
            dont_care=int(counts[LeftOut.DONT_CARE]),
            too_small=int(counts[LeftOut.TOO_SMALL]),
            shrink_vanished=int(counts[LeftOut.SHRINK_VANISHED]),
        )

    @classmethod
    def from_dict(cls, body: Mapping[str, Any], where: str = "coverage") -> "Coverage":
        """From its manifest/journal form; ValueError names the field that is wrong."""
        if not isinstance(body, Mapping):
            raise ValueError(f"{where} must be a mapping of word counts")
        values = {}
        for spec in fields(cls):
            value = body.get(spec.name)
            if type(value) is not int or value < 0:
                raise ValueError(f"{where}.{spec.name} must be a non-negative integer, got {value!r}")
            values[spec.name] = value
        coverage = cls(**values)
        if coverage.in_targets + coverage.left_out != coverage.words:
            raise ValueError(f"{where}: in_targets + dont_care + too_small + shrink_vanished != words")
        return coverage

    def as_dict(self) -> dict[str, int]:
        return asdict(self)

    def __add__(self, other: "Coverage") -> "Coverage":
        return Coverage(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    @property
    def left_out(self) -> int:
        return self.dont_care + self.too_small + self.shrink_vanished

    @property
    def trainable(self) -> int:
        """Words that are not don't-care: what recall is measured against."""
        return self.words - self.dont_care

    @property
    def left_out_for_size(self) -> int:
        return self.too_small + self.shrink_vanished

    @property
    def size_share(self) -> float:
        """Share of the not-don't-care words left out for size (0 when there are none)."""
        return self.left_out_for_size / self.trainable if self.trainable else 0.0

    def summary(self) -> str:
        """One line: in targets, and each reason with its share of all words."""

        def share(n: int) -> str:
            return f"{n} ({n / self.words:.1%})" if self.words else str(n)

        return (f"words in the targets {share(self.in_targets)} of {self.words}; left out: "
                f"don't-care {share(self.dont_care)}, too small {share(self.too_small)}, "
                f"shrink vanished {share(self.shrink_vanished)}")

    def size_warning(self, min_text_size: float, size: int, shrink_ratio: float) -> str | None:
        """A warning naming the settings to change, when too much text is left out for size."""
        if self.size_share <= SIZE_WARNING_SHARE:
            return None
        return (f"warning: {self.size_share:.1%} of the {self.trainable} words that are not don't-care are left "
                f"out of the training targets for size ({self.too_small} too small, {self.shrink_vanished} "
                f"vanished when shrunk); evaluation still counts them. Lower targets.min_text_size (now "
                f"{min_text_size:g}), raise transform.size (now {size}) or raise targets.shrink_ratio (now "
                f"{shrink_ratio:g})")
