"""ResNet-18/34/50 backbones that return the C2..C5 feature maps (strides 4, 8, 16, 32).

Parameter and buffer names follow torchvision's ``resnet`` state-dict keys (``conv1``, ``bn1``,
``layer1.0.conv1``, ``layer2.0.downsample.0`` ...), so ``load_backbone_weights`` reads a
torchvision-format file directly. Nothing here downloads weights: a file is given or the
backbone starts from Kaiming initialization.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from wds_ocr.errors import CheckpointError
from wds_ocr.model.state import name_keys, state_fit

BackboneName = Literal["resnet18", "resnet34", "resnet50"]

# Classifier keys of a torchvision file: the backbone has no classifier, so they are ignored.
_IGNORED_PREFIXES = ("fc.",)


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


def _conv1x1(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)


def _downsample(in_channels: int, out_channels: int, stride: int) -> nn.Sequential | None:
    """Projection shortcut (``downsample.0`` conv, ``downsample.1`` BN) when the shape changes."""
    if stride == 1 and in_channels == out_channels:
        return None
    return nn.Sequential(_conv1x1(in_channels, out_channels, stride), nn.BatchNorm2d(out_channels))


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with an identity or projection shortcut (ResNet-18/34)."""

    expansion = 1

    def __init__(self, in_channels: int, width: int, stride: int = 1):
        super().__init__()
        out_channels = width * self.expansion
        self.conv1 = _conv3x3(in_channels, width, stride)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = _conv3x3(width, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(in_channels, out_channels, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + shortcut)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carrying the stride, as torchvision's v1.5), 1x1 expand x4 (ResNet-50)."""

    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int = 1):
        super().__init__()
        out_channels = width * self.expansion
        self.conv1 = _conv1x1(in_channels, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = _conv3x3(width, width, stride)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = _conv1x1(width, out_channels)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(in_channels, out_channels, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + shortcut)


_ARCHITECTURES: dict[str, tuple[type[BasicBlock] | type[Bottleneck], tuple[int, int, int, int]]] = {
    "resnet18": (BasicBlock, (2, 2, 2, 2)),
    "resnet34": (BasicBlock, (3, 4, 6, 3)),
    "resnet50": (Bottleneck, (3, 4, 6, 3)),
}
_WIDTHS = (64, 128, 256, 512)


class ResNet(nn.Module):
    """Stem + four stages; ``forward`` returns ``(c2, c3, c4, c5)``.

    ``out_channels`` lists the channels of C2..C5: (64, 128, 256, 512) for ResNet-18/34,
    (256, 512, 1024, 2048) for ResNet-50.
    """

    def __init__(self, name: BackboneName = "resnet18"):
        super().__init__()
        if name not in _ARCHITECTURES:
            raise ValueError(f"unknown backbone {name!r}; choose one of {sorted(_ARCHITECTURES)}")
        block, depths = _ARCHITECTURES[name]
        self.name = name
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        in_channels = 64
        stages = []
        for index, (width, depth) in enumerate(zip(_WIDTHS, depths)):
            stride = 1 if index == 0 else 2
            blocks = []
            for block_index in range(depth):
                blocks.append(block(in_channels, width, stride if block_index == 0 else 1))
                in_channels = width * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.out_channels = tuple(width * block.expansion for width in _WIDTHS)
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(images))))
        c2 = self.layer1(x)
        c3 = self.layer2(c2)
        c4 = self.layer3(c3)
        c5 = self.layer4(c4)
        return c2, c3, c4, c5


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"backbone weights file {path} does not exist")
    try:
        # weights_only: the file is untrusted input, never let it run pickled code.
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, zipfile.BadZipFile, RuntimeError, EOFError, OSError, ValueError) as exc:
        raise CheckpointError(
            f"backbone weights file {path} cannot be read as a tensor state dict "
            f"(saved with torch.save, no pickled objects): {exc}"
        ) from None
    if not isinstance(loaded, dict):
        raise CheckpointError(
            f"backbone weights file {path} holds a {type(loaded).__name__}, "
            "not a state dict of parameter name -> tensor"
        )
    not_tensors = [key for key, value in loaded.items() if not isinstance(value, torch.Tensor)]
    if not_tensors:
        raise CheckpointError(
            f"backbone weights file {path}: entries are not tensors: {name_keys(repr(k) for k in not_tensors)}"
        )
    return loaded


def load_backbone_weights(model: ResNet, path: str | Path) -> None:
    """Load a torchvision-format ResNet state dict from ``path`` into ``model`` in place.

    ``fc.*`` keys are ignored and a missing ``num_batches_tracked`` keeps the model's value;
    any other missing or unexpected key, or a shape mismatch, raises ``CheckpointError`` naming
    the file and the first offending keys.
    """
    path = Path(path)
    loaded = _read_state_dict(path)
    state = {key: value for key, value in loaded.items() if not key.startswith(_IGNORED_PREFIXES)}
    fit = state_fit(model.state_dict(), state)
    if not fit.exact:
        raise CheckpointError(
            f"backbone weights file {path} does not fit a {model.name} backbone: {fit.problems()}. "
            "Give a torchvision-format state dict of the configured backbone."
        )
    # strict=False only admits the optional num_batches_tracked buffers checked above.
    model.load_state_dict(state, strict=False)
