"""Learning rate as a pure function of the optimizer step: linear warmup, then cosine or poly decay.

Being a function of the step alone (no scheduler object with hidden state), the rate after a
resume is the rate the uninterrupted run used, and the checkpoint stores only the step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

# Cosine decays to this fraction of the base rate (nanoGPT decays to lr/10; DB's poly goes to 0).
COSINE_FLOOR = 0.01
# Exponent of DB's "poly" decay: lr * (1 - progress) ** 0.9.
POLY_POWER = 0.9


@dataclass(frozen=True)
class LrSchedule:
    base_lr: float
    warmup_steps: int
    total_steps: int
    schedule: str  # "cosine" | "poly"

    def __call__(self, step: int) -> float:
        """The rate for optimizer step ``step`` (counted from 0)."""
        if step < self.warmup_steps:
            return self.base_lr * (step + 1) / (self.warmup_steps + 1)
        # The run's last step (total_steps - 1) is the first at the minimum: the decay completes.
        span = max(1, self.total_steps - self.warmup_steps - 1)
        progress = min(1.0, (step - self.warmup_steps) / span)
        if self.schedule == "poly":
            return self.base_lr * (1.0 - progress) ** POLY_POWER
        floor = self.base_lr * COSINE_FLOOR
        return floor + 0.5 * (1.0 + math.cos(math.pi * progress)) * (self.base_lr - floor)

    def state(self, step: int) -> dict[str, Any]:
        return {"schedule": self.schedule, "base_lr": self.base_lr, "warmup_steps": self.warmup_steps,
                "total_steps": self.total_steps, "step": step}
