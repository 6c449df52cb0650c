"""Any timm model as a DBNet backbone (the optional ``timm`` extra: ``pip install 'wds-ocr[timm]'``).

``timm.create_model(name, features_only=True)`` gives a model's feature maps and their strides
(``feature_info.reduction()``); DBNet's neck takes the last map at each of the strides 4, 8, 16
and 32, so any model that reaches them works (ResNets, ConvNeXt, EfficientNet, MobileNet, ...).
A model that lacks one of them is refused with the strides it has. Weights: timm's own source
when ``pretrained`` (downloads), or a local file through timm's ``pretrained_cfg_overlay``
(safetensors or a weights-only torch file, as timm reads them).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from wds_ocr.data.pipeline import Normalization
from wds_ocr.errors import CheckpointError, ConfigError

STRIDES = (4, 8, 16, 32)


def _timm() -> Any:
    try:
        import timm
    except ImportError as exc:
        raise ConfigError(f"timm backbones need the timm package ({exc}); install it with "
                          "`pip install 'wds-ocr[timm]'` (timm needs a torchvision built for your torch)") from None
    return timm


def timm_normalization(name: str) -> Normalization:
    """The mean/std of ``name``'s pretrained configuration (ImageNet's when it names none)."""
    timm = _timm()
    try:
        config = timm.models.get_pretrained_cfg(name)
    except Exception:  # noqa: BLE001 - an unknown name is reported when the model is built
        config = None
    if config is None:
        if not timm.is_model(name.split(".")[0]):
            raise ConfigError(f"model.backbone: timm has no model {name!r}; `timm.list_models()` names them")
        return Normalization()
    mean, std = getattr(config, "mean", None), getattr(config, "std", None)
    if mean is None or std is None or len(mean) != 3 or len(std) != 3:
        return Normalization()
    return Normalization(tuple(mean), tuple(std))


class TimmBackbone(nn.Module):
    """``forward(images)`` -> the maps at strides 4, 8, 16, 32; ``out_channels`` their channels."""

    def __init__(self, name: str, pretrained: bool = False, weights_file: str | None = None):
        super().__init__()
        timm = _timm()
        kwargs: dict[str, Any] = {}
        if weights_file is not None:
            path = Path(weights_file)
            if not path.is_file():
                raise CheckpointError(f"backbone weights file {path} does not exist")
            kwargs["pretrained_cfg_overlay"] = {"file": str(path)}
        try:
            body = timm.create_model(name, features_only=True, pretrained=pretrained or weights_file is not None,
                                     **kwargs)
        except RuntimeError as exc:  # timm's unknown-model and weight-loading errors
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            source = f"weights file {weights_file}" if weights_file else ("pretrained weights" if pretrained else "")
            raise ConfigError(f"model.backbone timm:{name}: cannot build it{' with ' + source if source else ''}: "
                              f"{reason}") from None
        reductions = list(body.feature_info.reduction())
        channels = list(body.feature_info.channels())
        missing = [s for s in STRIDES if s not in reductions]
        if missing:
            raise ConfigError(f"model.backbone timm:{name} gives feature maps at strides {reductions}; DBNet needs "
                              f"4, 8, 16 and 32 (missing {missing}): choose a convolutional or hierarchical model")
        # The deepest map at each stride.
        self.picks = tuple(max(i for i, r in enumerate(reductions) if r == s) for s in STRIDES)
        self.body = body
        self.name = name
        self.out_channels = tuple(channels[i] for i in self.picks)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        features = self.body(images)
        return tuple(features[i] for i in self.picks)
