"""Feature pyramid necks: four backbone maps (strides 4..32) -> one fused map at stride 4.

Both necks follow the same plan: a lateral conv per level to ``channels``, a top-down pass
(nearest x2 upsampling plus addition, coarsest first), a conv per level down to ``channels / 4``,
each upsampled to stride 4, and the four concatenated coarsest first (P5, P4, P3, P2), so the
fused map has ``channels`` channels.

- ``fpn``: MhLiao/DB's neck: 1x1 lateral and 3x3 smoothing convs, no bias.
- ``rsefpn``: PaddleOCR's RSEFPN (PP-OCRv3/v4 mobile detectors): each of those convs is followed
  by a residual squeeze-excite (``x + x * gate``, hard sigmoid with Paddle's slope 0.2).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from wds_ocr.model.init import kaiming_init
from wds_ocr.model.lcnet import SqueezeExcite

NeckName = Literal["fpn", "rsefpn"]
NECKS: tuple[str, ...] = ("fpn", "rsefpn")
# PaddleOCR's hard sigmoid default (``F.hardsigmoid`` there is clamp(0.2 x + 0.5, 0, 1)).
PADDLE_HARDSIGMOID_SLOPE = 0.2


class _ConvSE(nn.Module):
    """Conv without bias -> residual squeeze-excite (PaddleOCR's RSELayer)."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel, padding=kernel // 2, bias=False)
        self.se = SqueezeExcite(out_channels, slope=PADDLE_HARDSIGMOID_SLOPE, residual=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.se(self.conv(x))


class FeatureNeck(nn.Module):
    """``forward(features)``: (C2, C3, C4, C5) -> (N, channels, H/4, W/4)."""

    def __init__(self, kind: NeckName, in_channels: tuple[int, ...], channels: int):
        super().__init__()
        if channels % 4:
            raise ValueError(f"neck_channels must be a multiple of 4, got {channels}")
        if len(in_channels) != 4:
            raise ValueError(f"the neck needs 4 feature maps (strides 4, 8, 16, 32), got {len(in_channels)}")
        if kind == "fpn":
            self.lateral = nn.ModuleList(nn.Conv2d(c, channels, 1, bias=False) for c in in_channels)
            self.smooth = nn.ModuleList(
                nn.Conv2d(channels, channels // 4, 3, padding=1, bias=False) for _ in in_channels
            )
        elif kind == "rsefpn":
            self.lateral = nn.ModuleList(_ConvSE(c, channels, 1) for c in in_channels)
            self.smooth = nn.ModuleList(_ConvSE(channels, channels // 4, 3) for _ in in_channels)
        else:
            raise ValueError(f"unknown neck {kind!r}; known: {', '.join(NECKS)}")
        self.out_channels = channels
        kaiming_init(self)

    def forward(self, features: tuple[torch.Tensor, ...]) -> torch.Tensor:
        # Coarsest level first throughout (the order PaddleOCR's graph runs, which the importer
        # of its weights relies on).
        laterals = [conv(feature) for conv, feature in zip(reversed(self.lateral), reversed(features))]
        merged = [laterals[0]]
        for lateral in laterals[1:]:
            merged.append(lateral + F.interpolate(merged[-1], scale_factor=2.0, mode="nearest"))
        fused = []
        for conv, feature, level in zip(reversed(self.smooth), merged, (3, 2, 1, 0)):
            smoothed = conv(feature)
            if level:
                smoothed = F.interpolate(smoothed, scale_factor=float(2**level), mode="nearest")
            fused.append(smoothed)
        return torch.cat(fused, dim=1)  # P5, P4, P3, P2
