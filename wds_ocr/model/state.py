"""How a state dict fits a model: the keys it misses, the keys it has extra, the shapes that differ.

One place for the comparison and its wording, used where weights enter a model from a file
(``model.backbone_weights``, ``train --init``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

# How many keys a message names before "(and N more)".
KEYS_SHOWN = 5
# Buffers older files lack; a missing one keeps the model's value.
OPTIONAL_SUFFIXES = ("num_batches_tracked",)


def name_keys(keys: Iterable[str], shown: int = KEYS_SHOWN) -> str:
    keys = list(keys)
    text = ", ".join(keys[:shown])
    return text + (f" (and {len(keys) - shown} more)" if len(keys) > shown else "")


@dataclass(frozen=True)
class StateFit:
    missing: tuple[str, ...]  # in the model, not in the file
    unexpected: tuple[str, ...]  # in the file, not in the model
    mismatched: tuple[str, ...]  # in both, shapes differ: "key (file (..), model (..))"
    fitting: tuple[str, ...]  # in both with the same shape

    @property
    def exact(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def problems(self) -> str:
        """``missing keys a, b; unexpected keys c; shape mismatch d (file (..), model (..))``."""
        parts = []
        if self.missing:
            parts.append(f"missing keys {name_keys(repr(k) for k in self.missing)}")
        if self.unexpected:
            parts.append(f"unexpected keys {name_keys(repr(k) for k in self.unexpected)}")
        if self.mismatched:
            parts.append(f"shape mismatch {name_keys(self.mismatched)}")
        return "; ".join(parts)


def state_fit(expected: dict[str, torch.Tensor], given: dict[str, torch.Tensor]) -> StateFit:
    missing = tuple(k for k in expected if k not in given and not k.endswith(OPTIONAL_SUFFIXES))
    unexpected = tuple(k for k in given if k not in expected)
    mismatched, fitting = [], []
    for key, value in given.items():
        if key in expected:
            if tuple(value.shape) != tuple(expected[key].shape):
                mismatched.append(f"{key} (file {tuple(value.shape)}, model {tuple(expected[key].shape)})")
            else:
                fitting.append(key)
    return StateFit(missing, unexpected, tuple(mismatched), tuple(fitting))
