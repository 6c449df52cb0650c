"""PP-LCNetV3, the backbone of PaddleOCR's PP-OCRv4 mobile text detector, in its deployed form.

PaddleOCR trains this network with several parallel branches per convolution ("learnable
re-parameterization") and folds them, with their BatchNorms, into one biased convolution for
inference; the ONNX file that ``rapidocr-onnxruntime`` ships is that folded form. This module is
the folded form too, so ``wds_ocr.model.ppocr`` can load those weights one to one and wds-ocr can
fine-tune them (every convolution, BatchNorm and learnable affine stays a trainable parameter).

Layout (read off the ONNX graph of ``ch_PP-OCRv4_det_infer.onnx``; channels are PaddleOCR's
``det`` configuration at scale 0.75):

    stem        3x3 conv stride 2 (no bias) + BatchNorm, no activation          16 ch, stride 2
    blocks      depthwise kxk conv -> [squeeze-excite] -> pointwise 1x1 conv, each conv with a
                bias, a learnable affine (scale, bias scalars) and, except after a stride-2
                depthwise conv, hard-swish followed by another learnable affine
    outputs     after the stride-4, 8, 16 and 32 stages (48, 96, 192, 384 ch), each through a
                1x1 conv with bias to 12, 18, 42 and 360 channels (PaddleOCR's ``layer_list``)

Input: RGB, normalized as PaddleOCR trains and runs this detector: ImageNet's mean and std applied
to its BGR arrays in array order (so B is normalized with R's ImageNet figures); in RGB order that
is mean (0.406, 0.456, 0.485), std (0.225, 0.224, 0.229). The importer swaps the stem's input
channels, so wds-ocr's RGB records need no reordering. (rapidocr-onnxruntime 1.4.4 feeds the same
file mean 0.5 / std 0.5 instead; on sroie-dev val at 1600 px the detector scores H-mean 0.9504
with PaddleOCR's normalization and 0.9455 with rapidocr's: docs/BENCHMARKS.md.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# (kernel, out channels, stride, squeeze-excite) per block, by stage; the last block of stages
# 3..6 ends at stride 4, 8, 16, 32.
STAGES: tuple[tuple[tuple[int, int, int, bool], ...], ...] = (
    ((3, 32, 1, False),),
    ((3, 48, 2, False), (3, 48, 1, False)),
    ((3, 96, 2, False), (3, 96, 1, False)),
    ((3, 192, 2, False),) + ((5, 192, 1, False),) * 4,
    ((5, 384, 2, True), (5, 384, 1, True), (5, 384, 1, False), (5, 384, 1, False)),
)
STEM_CHANNELS = 16
OUTPUT_CHANNELS = (12, 18, 42, 360)
# PaddleOCR's det normalization (ImageNet's figures on BGR arrays), in RGB order.
MEAN = (0.406, 0.456, 0.485)
STD = (0.225, 0.224, 0.229)


class Affine(nn.Module):
    """``x * scale + bias`` with two learnable scalars (PaddleOCR's LearnableAffineBlock)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale + self.bias


class SqueezeExcite(nn.Module):
    """Global average -> 1x1 reduce -> ReLU -> 1x1 expand -> hard sigmoid -> scale the input.

    ``slope``: the hard sigmoid is ``clamp(slope * x + 0.5, 0, 1)`` (1/6 in the backbone, Paddle's
    default 0.2 in the neck). ``residual``: return ``x + x * gate`` instead of ``x * gate``.
    """

    def __init__(self, channels: int, slope: float, residual: bool, reduction: int = 4) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(channels, channels // reduction, 1)
        self.expand = nn.Conv2d(channels // reduction, channels, 1)
        self.slope = float(slope)
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.expand(F.relu(self.reduce(F.adaptive_avg_pool2d(x, 1))))
        gate = torch.clamp(gate * self.slope + 0.5, 0.0, 1.0)
        scaled = x * gate
        return x + scaled if self.residual else scaled


class ConvAffine(nn.Module):
    """Biased conv -> affine, then (``act``) hard-swish -> affine."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int = 1, groups: int = 1,
                 act: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel, stride, kernel // 2, groups=groups)
        self.affine = Affine()
        self.act_affine = Affine() if act else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.affine(self.conv(x))
        return x if self.act_affine is None else self.act_affine(F.hardswish(x))


class Block(nn.Module):
    """Depthwise conv (no activation when it strides) -> optional squeeze-excite -> pointwise conv."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int, se: bool) -> None:
        super().__init__()
        self.depthwise = ConvAffine(in_channels, in_channels, kernel, stride, groups=in_channels, act=stride == 1)
        self.se = SqueezeExcite(in_channels, slope=1.0 / 6.0, residual=False) if se else None
        self.pointwise = ConvAffine(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.depthwise(x)
        if self.se is not None:
            x = self.se(x)
        return self.pointwise(x)


class LCNetV3Det(nn.Module):
    """Returns the four maps at strides 4, 8, 16 and 32 (``out_channels``: 12, 18, 42, 360)."""

    out_channels = OUTPUT_CHANNELS

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, STEM_CHANNELS, 3, 2, 1, bias=False), nn.BatchNorm2d(STEM_CHANNELS))
        stages = []
        channels = STEM_CHANNELS
        stage_outputs = []
        for blocks in STAGES:
            layers = []
            for kernel, out_channels, stride, se in blocks:
                layers.append(Block(channels, out_channels, kernel, stride, se))
                channels = out_channels
            stages.append(nn.Sequential(*layers))
            stage_outputs.append(channels)
        self.stages = nn.ModuleList(stages)
        self.outputs = nn.ModuleList(nn.Conv2d(c, o, 1) for c, o in zip(stage_outputs[1:], OUTPUT_CHANNELS))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = self.stem(x)
        features = []
        for index, stage in enumerate(self.stages):
            x = stage(x)
            if index:  # the first stage stays at stride 2
                features.append(x)
        # Every stage first, then the four output convolutions: the order PaddleOCR's graph runs
        # them in, which the importer relies on.
        return tuple(conv(feature) for conv, feature in zip(self.outputs, features))
