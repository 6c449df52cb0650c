"""Backbones by name: the ones written here and any timm model, each with its input normalization.

``build_backbone(config)`` returns a module whose ``forward(images)`` gives four feature maps at
strides 4, 8, 16 and 32 and whose ``out_channels`` lists their channels:

- ``resnet18`` / ``resnet34`` / ``resnet50``: torchvision's layout (``model.backbone_weights`` takes
  a torchvision-format file), ImageNet normalization;
- ``pplcnetv3``: PP-OCRv4's mobile detector backbone (weights come from ``wds-ocr import-ppocr``),
  PaddleOCR's normalization (ImageNet figures on BGR arrays);
- ``timm:<name>``: ``timm.create_model(name, features_only=True)``, the maps at strides 4..32
  picked from its ``feature_info``; weights from timm's usual source (``model.pretrained``) or a
  local file (``model.backbone_weights``); normalization from the model's pretrained config.

``normalization_of(config)`` is ``model.input_mean`` / ``input_std`` where given, else the
backbone's own; ``resolve_model`` writes it into the config, so checkpoints carry it.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from wds_ocr.config import TIMM_PREFIX, Config, ModelConfig
from wds_ocr.data.pipeline import IMAGENET, Normalization
from wds_ocr.model import lcnet
from wds_ocr.model.resnet import ResNet, load_backbone_weights

PPOCR_NORMALIZATION = Normalization(lcnet.MEAN, lcnet.STD)


def timm_name(config: ModelConfig) -> str | None:
    """The timm model name of a ``timm:<name>`` backbone, else None."""
    return config.backbone[len(TIMM_PREFIX):].strip() if config.backbone.startswith(TIMM_PREFIX) else None


def build_backbone(config: ModelConfig, load_weights: bool = True) -> nn.Module:
    """The configured backbone; ``load_weights=False`` skips ``backbone_weights`` / ``pretrained``
    (a checkpoint's weights replace them anyway)."""
    name = timm_name(config)
    if name is not None:
        from wds_ocr.model.timm_backbone import TimmBackbone  # timm is an optional extra

        return TimmBackbone(name, pretrained=load_weights and config.pretrained,
                            weights_file=config.backbone_weights if load_weights else None)
    if config.backbone == "pplcnetv3":
        if load_weights and config.backbone_weights is not None:
            raise ValueError("pplcnetv3 takes its weights from a checkpoint: make one with `wds-ocr import-ppocr` "
                             "and start with `train --init`, instead of model.backbone_weights")
        return lcnet.LCNetV3Det()
    backbone = ResNet(config.backbone)  # type: ignore[arg-type]
    if load_weights and config.backbone_weights is not None:
        load_backbone_weights(backbone, config.backbone_weights)
    return backbone


def default_normalization(config: ModelConfig) -> Normalization:
    """The normalization the backbone's weights were trained with."""
    name = timm_name(config)
    if name is not None:
        from wds_ocr.model.timm_backbone import timm_normalization

        return timm_normalization(name)
    if config.backbone == "pplcnetv3":
        return PPOCR_NORMALIZATION
    return IMAGENET


def normalization_of(config: ModelConfig) -> Normalization:
    default = None
    if config.input_mean is None or config.input_std is None:
        default = default_normalization(config)
    mean = config.input_mean if config.input_mean is not None else default.mean  # type: ignore[union-attr]
    std = config.input_std if config.input_std is not None else default.std  # type: ignore[union-attr]
    return Normalization(mean, std)


def resolve_model(config: Config) -> Config:
    """``config`` with ``model.input_mean`` / ``input_std`` filled in (what a checkpoint stores)."""
    normalization = normalization_of(config.model)
    update: dict[str, Any] = {"input_mean": normalization.mean, "input_std": normalization.std}
    return config.model_copy(update={"model": config.model.model_copy(update=update)})
