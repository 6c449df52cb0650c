"""DBNet (Liao et al., "Real-time Scene Text Detection with Differentiable Binarization").

ResNet backbone -> FPN neck fused at stride 4 -> two heads (probability and threshold), each
upsampled x4 by two transposed convolutions back to the input resolution. The heads return
LOGITS: sigmoid is applied by the loss (in float32) and by post-processing, so mixed-precision
training never squashes a saturated probability into exactly 0 or 1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from wds_ocr.config import ModelConfig
from wds_ocr.model.resnet import ResNet, load_backbone_weights

# The coarsest feature map (C5) is at stride 32: input sides must divide by it.
STRIDE = 32


def _kaiming_init(module: nn.Module) -> None:
    """Kaiming-normal convolutions, unit-scale BatchNorm (as the DB reference initializes)."""
    for child in module.modules():
        if isinstance(child, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.kaiming_normal_(child.weight, nonlinearity="relu")
            if child.bias is not None:
                nn.init.zeros_(child.bias)
        elif isinstance(child, nn.BatchNorm2d):
            nn.init.ones_(child.weight)
            nn.init.constant_(child.bias, 1e-4)


class FPNNeck(nn.Module):
    """Lateral 1x1 -> top-down nearest x2 + add -> 3x3 smoothing to C/4 -> up to stride 4 -> concat."""

    def __init__(self, in_channels: tuple[int, int, int, int], channels: int):
        super().__init__()
        if channels % 4:
            raise ValueError(f"neck_channels must be a multiple of 4, got {channels}")
        self.lateral = nn.ModuleList(nn.Conv2d(c, channels, 1, bias=False) for c in in_channels)
        self.smooth = nn.ModuleList(
            nn.Conv2d(channels, channels // 4, 3, padding=1, bias=False) for _ in in_channels
        )
        self.out_channels = channels
        _kaiming_init(self)

    def forward(self, features: tuple[torch.Tensor, ...]) -> torch.Tensor:
        laterals = [conv(feature) for conv, feature in zip(self.lateral, features)]
        # Top-down: from C5 to C2, each level plus the upsampled coarser one.
        merged = [laterals[-1]]
        for lateral in reversed(laterals[:-1]):
            merged.append(lateral + F.interpolate(merged[-1], scale_factor=2.0, mode="nearest"))
        merged.reverse()
        fused = []
        for level, (conv, feature) in enumerate(zip(self.smooth, merged)):
            smoothed = conv(feature)
            if level:
                smoothed = F.interpolate(smoothed, scale_factor=float(2**level), mode="nearest")
            fused.append(smoothed)
        # Coarsest first, as in the reference (P5, P4, P3, P2).
        return torch.cat(fused[::-1], dim=1)


def _head(channels: int) -> nn.Sequential:
    """conv3x3-BN-ReLU, ConvT x2-BN-ReLU, ConvT x2 -> one logit per input pixel."""
    inner = channels // 4
    return nn.Sequential(
        nn.Conv2d(channels, inner, 3, padding=1, bias=False),
        nn.BatchNorm2d(inner),
        nn.ReLU(inplace=True),
        nn.ConvTranspose2d(inner, inner, 2, stride=2),
        nn.BatchNorm2d(inner),
        nn.ReLU(inplace=True),
        nn.ConvTranspose2d(inner, 1, 2, stride=2),
    )


class DBNet(nn.Module):
    """Text detector built from a ``ModelConfig``.

    ``forward(images)`` takes (N, 3, H, W) normalized float images, H and W multiples of 32,
    in either memory format, and returns ``{"prob_logits": (N, 1, H, W)}``, plus
    ``"thresh_logits"`` of the same shape in training mode or when ``with_thresh=True``.
    ``k`` is the differentiable-binarization amplification factor the loss uses.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.k = float(config.k)
        self.backbone = ResNet(config.backbone)
        if config.backbone_weights is not None:
            load_backbone_weights(self.backbone, config.backbone_weights)
        self.neck = FPNNeck(self.backbone.out_channels, config.neck_channels)
        self.prob_head = _head(config.neck_channels)
        self.thresh_head = _head(config.neck_channels)
        _kaiming_init(self.prob_head)
        _kaiming_init(self.thresh_head)

    def forward(self, images: torch.Tensor, with_thresh: bool = False) -> dict[str, torch.Tensor]:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"DBNet expects images of shape (N, 3, H, W), got {tuple(images.shape)}")
        height, width = images.shape[-2:]
        if height % STRIDE or width % STRIDE:
            raise ValueError(
                f"DBNet expects image sides that are multiples of {STRIDE}, got {height}x{width}; "
                "pad the images (transform.size is a multiple of 32)"
            )
        fused = self.neck(self.backbone(images))
        outputs = {"prob_logits": self.prob_head(fused)}
        if self.training or with_thresh:
            outputs["thresh_logits"] = self.thresh_head(fused)
        return outputs
