"""DBNet (Liao et al., "Real-time Scene Text Detection with Differentiable Binarization").

Backbone (``model.backbones``) -> feature-pyramid neck (``model.necks``) fused at stride 4 -> two heads (probability and threshold), each
upsampled x4 by two transposed convolutions back to the input resolution. The heads return
LOGITS: sigmoid is applied by the loss (in float32) and by post-processing, so mixed-precision
training never squashes a saturated probability into exactly 0 or 1.
"""

from __future__ import annotations

import torch
from torch import nn

from wds_ocr.config import ModelConfig
from wds_ocr.data.pipeline import Normalization
from wds_ocr.model.backbones import build_backbone, normalization_of
from wds_ocr.model.init import kaiming_init
from wds_ocr.model.necks import FeatureNeck

# The coarsest feature map (C5) is at stride 32: input sides must divide by it.
STRIDE = 32


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

    ``forward(images)`` takes (N, 3, H, W) images normalized with ``self.normalization``, H and W
    multiples of 32, in either memory format, and returns ``{"prob_logits": (N, 1, H, W)}``, plus
    ``"thresh_logits"`` of the same shape in training mode or when ``with_thresh=True``.
    ``k`` is the differentiable-binarization amplification factor the loss uses.
    ``load_weights=False`` builds the backbone without reading ``backbone_weights`` or downloading
    ``pretrained`` ones (for a model whose weights come from a checkpoint).
    """

    def __init__(self, config: ModelConfig, load_weights: bool = True):
        super().__init__()
        self.k = float(config.k)
        self.normalization: Normalization = normalization_of(config)
        self.backbone = build_backbone(config, load_weights=load_weights)
        self.neck = FeatureNeck(config.neck, tuple(self.backbone.out_channels), config.neck_channels)
        self.prob_head = _head(config.neck_channels)
        self.thresh_head = _head(config.neck_channels)
        kaiming_init(self.prob_head)
        kaiming_init(self.thresh_head)

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
