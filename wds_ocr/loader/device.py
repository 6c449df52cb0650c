"""On the device: copy, normalize, lay out, augment. The CPU never transforms.

``to_device`` copies a Batch's tensors with ``non_blocking=True`` (asynchronous from pinned
memory). ``normalize`` turns (N, H, W, 3) uint8 into float32 NCHW in channels_last layout with
ImageNet mean/std — one fused elementwise op on the device; the permute is free because NHWC
memory *is* channels_last. ``Augmenter`` applies one random affine (flip, scale, rotation,
translation) per sample to the image and all four maps together through a single sampling grid:
bilinear for the image and thresh_map, nearest for the 0/1 maps, so masks stay binary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from wds_ocr.config import AugmentConfig
from wds_ocr.data.pipeline import IMAGENET_MEAN, IMAGENET_STD
from wds_ocr.loader.stream import Batch


@dataclass
class DeviceBatch:
    images: torch.Tensor  # (N, H, W, 3) uint8 until normalized
    gt: torch.Tensor
    mask: torch.Tensor
    thresh_map: torch.Tensor
    thresh_mask: torch.Tensor

    def maps(self) -> dict[str, torch.Tensor]:
        return {"gt": self.gt, "mask": self.mask, "thresh_map": self.thresh_map, "thresh_mask": self.thresh_mask}


def to_device(batch: Batch, device: torch.device | str) -> DeviceBatch:
    """Asynchronous host-to-device copies (overlap with compute when the batch is pinned)."""
    return DeviceBatch(**{name: t.to(device, non_blocking=True) for name, t in batch.tensors().items()})


def normalize(images: torch.Tensor) -> torch.Tensor:
    """(N, H, W, 3) uint8 (or float 0..255) -> (N, 3, H, W) float32 channels_last, ImageNet-normalized."""
    x = images.permute(0, 3, 1, 2).float()
    mean = torch.tensor(IMAGENET_MEAN, device=x.device, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
    inv_std = 1.0 / (torch.tensor(IMAGENET_STD, device=x.device, dtype=torch.float32).view(1, 3, 1, 1) * 255.0)
    return ((x - mean) * inv_std).contiguous(memory_format=torch.channels_last)


class Augmenter:
    """Joint random affine augmentation of images and DB maps, on the device.

    Seeded per (seed, epoch, batch index, rank) so a resumed run repeats the same augmentation.
    """

    def __init__(self, config: AugmentConfig, thresh_min: float, seed: int = 0):
        self.config = config
        self.thresh_min = thresh_min
        self.seed = seed

    def enabled(self) -> bool:
        return self.config.hflip > 0 or self.config.affine

    def _generator(self, device: torch.device, epoch: int, index: int, rank: int) -> torch.Generator:
        generator = torch.Generator(device=device)
        generator.manual_seed(hash((self.seed, epoch, index, rank)) & 0x7FFF_FFFF_FFFF)
        return generator

    def theta(self, n: int, device: torch.device, generator: torch.Generator) -> torch.Tensor:
        """(N, 2, 3) output->input maps in normalized coordinates."""
        c = self.config

        def uniform(low: float, high: float) -> torch.Tensor:
            return low + (high - low) * torch.rand(n, device=device, generator=generator)

        flip = torch.where(torch.rand(n, device=device, generator=generator) < c.hflip, -1.0, 1.0)
        if c.affine:
            scale = uniform(c.scale_min, c.scale_max)
            angle = uniform(-c.rotate_degrees, c.rotate_degrees) * (math.pi / 180.0)
            shift_x = uniform(-c.translate, c.translate) * 2.0
            shift_y = uniform(-c.translate, c.translate) * 2.0
        else:
            scale = torch.ones(n, device=device)
            angle = torch.zeros(n, device=device)
            shift_x = shift_y = torch.zeros(n, device=device)
        cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
        theta = torch.zeros(n, 2, 3, device=device)
        # input = R(-angle)/scale @ (output - shift), then mirrored in x when flipped
        theta[:, 0, 0] = cos * flip
        theta[:, 0, 1] = sin * flip
        theta[:, 1, 0] = -sin
        theta[:, 1, 1] = cos
        theta[:, 0, 2] = -(cos * shift_x + sin * shift_y) * flip
        theta[:, 1, 2] = sin * shift_x - cos * shift_y
        return theta

    def __call__(self, images: torch.Tensor, maps: dict[str, torch.Tensor], epoch: int = 0, index: int = 0,
                 rank: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """images: (N, 3, H, W) float 0..255; maps: (N, H, W). Returns augmented copies.

        Without the affine part a flip is an exact index reversal; with it, one sampling grid
        per sample carries flip, scale, rotation and shift together.
        """
        n, _, h, w = images.shape
        generator = self._generator(images.device, epoch, index, rank)
        if not self.config.affine:
            flip = torch.rand(n, device=images.device, generator=generator) < self.config.hflip
            pick = lambda x: torch.where(flip.view(-1, *([1] * (x.dim() - 1))), x.flip(-1), x)  # noqa: E731
            return pick(images).contiguous(memory_format=torch.channels_last), {k: pick(v) for k, v in maps.items()}
        theta = self.theta(n, images.device, generator)
        grid = F.affine_grid(theta, (n, 1, h, w), align_corners=False)
        out_images = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        binary = torch.stack([maps["gt"], maps["thresh_mask"], 1 - maps["mask"]], dim=1).float()
        binary = F.grid_sample(binary, grid, mode="nearest", padding_mode="zeros", align_corners=False)
        thresh = (maps["thresh_map"].float() - self.thresh_min).unsqueeze(1)
        thresh = F.grid_sample(thresh, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        out_maps = {
            "gt": binary[:, 0].to(maps["gt"].dtype),
            "thresh_mask": binary[:, 1].to(maps["thresh_mask"].dtype),
            # outside the source image is treated like padding: black, no text, a valid negative
            "mask": (1 - binary[:, 2]).to(maps["mask"].dtype),
            "thresh_map": (thresh[:, 0] + self.thresh_min).to(maps["thresh_map"].dtype),
        }
        out_images = out_images.clamp_(0.0, 255.0).contiguous(memory_format=torch.channels_last)
        return out_images, out_maps


def prepare(batch: DeviceBatch, augmenter: Augmenter | None = None, epoch: int = 0, index: int = 0,
            rank: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Normalized channels_last images and the maps, augmented when an augmenter is given."""
    maps = batch.maps()
    if augmenter is None or not augmenter.enabled():
        return normalize(batch.images), maps
    raw = batch.images.permute(0, 3, 1, 2).float()
    raw, maps = augmenter(raw, maps, epoch, index, rank)
    return normalize(raw.permute(0, 2, 3, 1)), maps
