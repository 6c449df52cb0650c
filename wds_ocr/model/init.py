"""Weight initialization shared by the necks and heads."""

from __future__ import annotations

from torch import nn


def kaiming_init(module: nn.Module) -> None:
    """Kaiming-normal convolutions, unit-scale BatchNorm (as the DB reference initializes)."""
    for child in module.modules():
        if isinstance(child, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.kaiming_normal_(child.weight, nonlinearity="relu")
            if child.bias is not None:
                nn.init.zeros_(child.bias)
        elif isinstance(child, nn.BatchNorm2d):
            nn.init.ones_(child.weight)
            nn.init.constant_(child.bias, 1e-4)
