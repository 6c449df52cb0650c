"""DBNet loss: balanced BCE on the probability map, masked L1 on the threshold map, and dice on
the approximate binary map (MhLiao/DB's ``L1BalanceCELoss``).

    total = bce_weight * bce + l1_weight * l1 + dice_weight * dice

Everything runs in float32 with autocast disabled, from the model's LOGITS: BCE uses the
log-sum-exp form (``binary_cross_entropy_with_logits``), and the binary map is
``sigmoid(k * (sigmoid(p) - sigmoid(t)))`` through ``torch.sigmoid``, which never overflows.
Target maps may arrive as uint8 (masks) or float16 (thresh_map); they are cast here.

Hard negative mining runs over the whole batch, as in the reference: all positives plus the
``negative_ratio x positives`` negatives with the highest loss. The reference keeps zero
negatives when a batch has no text, so its BCE is exactly 0 there and a text-free batch never
learns to suppress false positives. Here the positive count used for the cap is at least 1% of
the valid (mask = 1) pixels (``MIN_POSITIVE_FRACTION``), and at least one pixel: a text-free
batch is scored on its hardest ``negative_ratio x 1%`` pixels. With receipts, where text covers
far more than 1% of the page, the rule changes nothing else. The number of negatives kept is a
tensor, never a Python int, so the loss does not synchronize with the GPU and compiles in one
graph.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from wds_ocr.config import LossConfig
from wds_ocr.shards.naming import MAP_NAMES

# Floor of the positive count that caps the mined negatives, as a fraction of the valid pixels.
MIN_POSITIVE_FRACTION = 0.01
# Guards the dice ratio when the prediction and the ground truth are both empty under the mask.
DICE_EPS = 1e-6

BATCH_KEYS = MAP_NAMES  # the record's target maps, as the codec, loader and verify name them


def _as_float_map(name: str, value: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    if value.shape != shape:
        raise ValueError(f"batch[{name!r}] has shape {tuple(value.shape)}, the model output needs {tuple(shape)}")
    return value.float()


def balanced_bce(logits: torch.Tensor, gt: torch.Tensor, mask: torch.Tensor, negative_ratio: float) -> torch.Tensor:
    """BCE over all positives and the hardest negatives under ``mask`` (float32 (N, H, W) maps)."""
    loss = F.binary_cross_entropy_with_logits(logits, gt, reduction="none")
    positive = gt * mask
    negative = (1.0 - gt) * mask
    positive_count = positive.sum()
    negative_available = negative.sum()
    floor = torch.clamp(torch.ceil(mask.sum() * MIN_POSITIVE_FRACTION), min=1.0)
    negative_count = torch.minimum(
        negative_available, torch.floor(torch.maximum(positive_count, floor) * negative_ratio)
    )
    # Non-negative pixels score 0 and every BCE value is >= 0, so the top `negative_count` of
    # this map sum to the top `negative_count` negatives (ties at 0 add nothing).
    ranked = torch.sort((loss * negative).flatten(), descending=True).values
    keep = torch.arange(ranked.numel(), device=ranked.device) < negative_count
    negative_sum = (ranked * keep).sum()
    positive_sum = (loss * positive).sum()
    # The denominator is >= 1 whenever any pixel is valid; clamp keeps an all-masked batch at 0.
    return (positive_sum + negative_sum) / torch.clamp(positive_count + negative_count, min=1.0)


def masked_l1(thresh_logits: torch.Tensor, thresh_map: torch.Tensor, thresh_mask: torch.Tensor) -> torch.Tensor:
    """Mean |sigmoid(t) - thresh_map| over ``thresh_mask``; 0 (with zero gradient) when it is empty."""
    error = torch.abs(torch.sigmoid(thresh_logits) - thresh_map) * thresh_mask
    return error.sum() / torch.clamp(thresh_mask.sum(), min=1.0)


def binary_map(prob_logits: torch.Tensor, thresh_logits: torch.Tensor, k: float) -> torch.Tensor:
    """Differentiable binarization ``1 / (1 + exp(-k (P - T)))`` from the logits of P and T.

    ``torch.sigmoid`` is evaluated without overflow for any argument (the reference's
    ``reciprocal(1 + exp(..))`` reaches inf and a NaN gradient), and ``P - T`` lies in [-1, 1].
    """
    return torch.sigmoid(k * (torch.sigmoid(prob_logits) - torch.sigmoid(thresh_logits)))


def dice(prediction: torch.Tensor, gt: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``1 - 2 |P.G| / (|P| + |G|)`` under ``mask``."""
    intersection = (prediction * gt * mask).sum()
    union = (prediction * mask).sum() + (gt * mask).sum() + DICE_EPS
    return 1.0 - 2.0 * intersection / union


class DBLoss(nn.Module):
    """``forward(outputs, batch) -> (total, parts)``.

    ``outputs``: the model's dict with ``prob_logits`` and ``thresh_logits``, (N, 1, H, W).
    ``batch``: ``gt``, ``mask``, ``thresh_map``, ``thresh_mask``, (N, H, W), any real dtype.
    ``parts``: detached ``bce``, ``l1``, ``dice`` (unweighted) and ``total``.
    """

    def __init__(self, config: LossConfig, k: float):
        super().__init__()
        self.bce_weight = float(config.bce_weight)
        self.l1_weight = float(config.l1_weight)
        self.dice_weight = float(config.dice_weight)
        self.negative_ratio = float(config.negative_ratio)
        self.k = float(k)

    def forward(
        self, outputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        missing = [key for key in ("prob_logits", "thresh_logits") if key not in outputs]
        if missing:
            raise ValueError(
                f"DBLoss needs model outputs {missing}; run the model in training mode or with with_thresh=True"
            )
        missing = [key for key in BATCH_KEYS if key not in batch]
        if missing:
            raise ValueError(f"DBLoss needs batch maps {missing}")
        prob_logits = outputs["prob_logits"]
        with torch.autocast(device_type=prob_logits.device.type, enabled=False):
            prob = prob_logits[:, 0].float()
            thresh = outputs["thresh_logits"][:, 0].float()
            gt, mask, thresh_map, thresh_mask = (
                _as_float_map(key, batch[key], prob.shape) for key in BATCH_KEYS
            )
            bce = balanced_bce(prob, gt, mask, self.negative_ratio)
            l1 = masked_l1(thresh, thresh_map, thresh_mask)
            dice_loss = dice(binary_map(prob, thresh, self.k), gt, mask)
            total = self.bce_weight * bce + self.l1_weight * l1 + self.dice_weight * dice_loss
        parts = {"bce": bce.detach(), "l1": l1.detach(), "dice": dice_loss.detach(), "total": total.detach()}
        return total, parts
