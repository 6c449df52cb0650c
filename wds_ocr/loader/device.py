"""On the device: copy, expand, normalize, lay out, augment. The CPU never transforms.

``to_device`` copies a Batch's payload (its compact records, as read) with ``non_blocking=True``
(asynchronous from pinned memory) and expands it there into the full image and maps, bit for bit
the live pipeline's (``loader.batch``: place each image in its zero frame, unpack the bit planes
of each map window, scatter the threshold values); the ring waits for the copy before it reuses
the host buffer. ``normalize`` turns (N, H, W, 3) uint8 into float32 NCHW in channels_last layout with
ImageNet mean/std — one fused elementwise op on the device; the permute is free because NHWC
memory *is* channels_last. ``Augmenter`` applies one random affine (flip, scale, rotation,
translation) per sample to the image and all four maps together through a single sampling grid:
bilinear for the image and thresh_map, nearest for the 0/1 maps, so masks stay binary.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from wds_ocr.config import AugmentConfig
from wds_ocr.data.geometry import valid_region
from wds_ocr.data.pipeline import IMAGENET, Normalization
from wds_ocr.loader.batch import Batch, SampleInfo, expand_images, expand_maps
from wds_ocr.loader.ring import device_fence
from wds_ocr.shards.naming import MAP_NAMES


@dataclass
class DeviceBatch:
    images: torch.Tensor  # (N, H, W, 3) uint8 until normalized
    gt: torch.Tensor
    mask: torch.Tensor
    thresh_map: torch.Tensor
    thresh_mask: torch.Tensor

    def maps(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in MAP_NAMES}


def to_device(batch: Batch, device: torch.device | str) -> DeviceBatch:
    """The batch's full image and maps on ``device``: one asynchronous copy of the packed records
    (overlapping compute when the host buffer is pinned), then their expansion there. A batch of
    full tensors is copied as it is."""
    packed = batch.packed
    if packed is None:
        return DeviceBatch(**{name: t.to(device, non_blocking=True) for name, t in batch.tensors().items()})
    payload = packed.payload.to(device, non_blocking=True)
    if payload.device.type == "cuda" and batch.lease is not None:
        with torch.cuda.device(payload.device):
            batch.lease.fence(device_fence())  # the host buffer is reused only after this copy
    images = expand_images(payload, packed.layouts, packed.size)
    return DeviceBatch(images, **expand_maps(payload, packed.layouts, packed.size, packed.fill))


def _normalize_constants(device: torch.device, normalization: Normalization) -> tuple[torch.Tensor, torch.Tensor]:
    mean = torch.tensor(normalization.mean, device=device, dtype=torch.float32) * 255.0
    inv_std = 1.0 / (torch.tensor(normalization.std, device=device, dtype=torch.float32) * 255.0)
    return mean, inv_std


@functools.lru_cache(maxsize=8)
def _cpu_table(normalization: Normalization) -> np.ndarray:
    """(1, 256, 3) float32: the normalized value of every uint8 level per channel, computed by the
    same two float32 ops as the elementwise path, so a lookup gives the same bits."""
    mean, inv_std = _normalize_constants(torch.device("cpu"), normalization)
    levels = torch.arange(256, dtype=torch.float32)[:, None]
    table = (levels - mean) * inv_std
    return np.ascontiguousarray(table.numpy(), dtype=np.float32).reshape(1, 256, 3)


def normalize(images: torch.Tensor, normalization: Normalization = IMAGENET) -> torch.Tensor:
    """(N, H, W, 3) uint8 (or float 0..255) -> (N, 3, H, W) float32 channels_last, normalized with
    the model's ``normalization`` (ImageNet mean/std unless the model says otherwise).

    Elementwise over a contiguous NHWC float32 copy (the channel is the last dim, so the per-channel
    constants broadcast along memory order), in place after the one conversion; the NCHW permute
    of a contiguous NHWC tensor is channels_last as it stands. On a CPU, uint8 images go through
    a 256-level table per channel instead (OpenCV's LUT: one pass over memory, 3x faster on one
    core than three elementwise passes) with the same bits: each entry is the elementwise result.
    """
    if images.device.type == "cpu" and images.dtype == torch.uint8 and images.dim() == 4 and images.shape[-1] == 3 \
            and images.numel() > 0 and images.shape[0] * images.shape[1] < 2**31:
        n, h, w, _ = images.shape
        source = images.contiguous().numpy().reshape(n * h, w, 3)
        out = cv2.LUT(source, _cpu_table(normalization)).reshape(n, h, w, 3)
        return torch.from_numpy(out).permute(0, 3, 1, 2)
    x = images.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
    mean, inv_std = _normalize_constants(x.device, normalization)
    x.sub_(mean).mul_(inv_std)
    return x.permute(0, 3, 1, 2)


class Augmenter:
    """Joint random affine augmentation of images and DB maps, on the device.

    Seeded per (seed, epoch, batch index, rank) so a resumed run repeats the same augmentation.
    """

    def __init__(self, config: AugmentConfig, thresh_min: float, seed: int = 0):
        self.config = config
        self.thresh_min = thresh_min
        self.seed = seed

    def enabled(self) -> bool:
        return self.config.hflip > 0 or self.config.affine or self.config.crop_size > 0

    def _generator(self, device: torch.device, epoch: int, index: int, rank: int) -> torch.Generator:
        generator = torch.Generator(device=device)
        generator.manual_seed(hash((self.seed, epoch, index, rank)) & 0x7FFF_FFFF_FFFF)
        return generator

    @property
    def crop_size(self) -> int:
        return self.config.crop_size

    def theta(self, n: int, device: torch.device, generator: torch.Generator) -> torch.Tensor:
        """(N, 2, 3) output->input maps in normalized coordinates (whole-record output)."""
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

    def crop_theta(self, n: int, source: int, regions: torch.Tensor, device: torch.device,
                   generator: torch.Generator) -> torch.Tensor:
        """(N, 2, 3) maps from a crop_size x crop_size output to a window of the (source x source) record.

        ``regions``: (N, 4) float (x, y, width, height) of each sample's image inside the padded
        record, in pixels. The window (crop_size / scale record pixels a side, rotated, mirrored
        when flipped) is centred uniformly where it stays inside that region; along an axis where
        the region is smaller than the window, the centre instead ranges where the region stays
        inside the window.
        """
        c = self.config

        def uniform(low: torch.Tensor | float, high: torch.Tensor | float) -> torch.Tensor:
            return low + (high - low) * torch.rand(n, device=device, generator=generator)

        flip = torch.where(torch.rand(n, device=device, generator=generator) < c.hflip, -1.0, 1.0)
        if c.affine:
            scale = uniform(c.scale_min, c.scale_max)
            angle = uniform(-c.rotate_degrees, c.rotate_degrees) * (math.pi / 180.0)
        else:
            scale = torch.ones(n, device=device)
            angle = torch.zeros(n, device=device)
        half = c.crop_size / (source * scale)  # the window's half side in normalized units
        corners = regions.to(device=device, dtype=torch.float32) * (2.0 / source)
        centres = []
        for axis in (0, 1):
            start, stop = corners[:, axis] - 1.0, corners[:, axis] + corners[:, axis + 2] - 1.0
            low, high = start + half, stop - half
            centres.append(uniform(torch.minimum(low, high), torch.maximum(low, high)))
        cos, sin = torch.cos(angle) * half, torch.sin(angle) * half
        theta = torch.zeros(n, 2, 3, device=device)
        # input = centre + half * R(-angle) @ (mirrored output)
        theta[:, 0, 0] = cos * flip
        theta[:, 0, 1] = sin
        theta[:, 1, 0] = -sin * flip
        theta[:, 1, 1] = cos
        theta[:, 0, 2] = centres[0]
        theta[:, 1, 2] = centres[1]
        return theta

    def __call__(self, images: torch.Tensor, maps: dict[str, torch.Tensor], epoch: int = 0, index: int = 0,
                 rank: int = 0, regions: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """images: (N, 3, H, W) float 0..255; maps: (N, H, W). Returns augmented copies.

        Without the affine part or a crop a flip is an exact index reversal; otherwise one sampling
        grid per sample carries flip, scale, rotation and shift (or the crop window) together.
        ``regions`` ((N, 4) x, y, width, height of each image inside its padded record) places the
        crop windows; None means the whole record.
        """
        n, _, h, w = images.shape
        generator = self._generator(images.device, epoch, index, rank)
        crop = self.config.crop_size
        if not self.config.affine and not crop:
            flip = torch.rand(n, device=images.device, generator=generator) < self.config.hflip
            pick = lambda x: torch.where(flip.view(-1, *([1] * (x.dim() - 1))), x.flip(-1), x)  # noqa: E731
            return pick(images).contiguous(memory_format=torch.channels_last), {k: pick(v) for k, v in maps.items()}
        if crop:
            if h != w or crop > h:
                raise ValueError(f"augment.crop_size={crop} needs square records of at least that side, got {h}x{w}")
            if regions is None:
                regions = torch.tensor([[0.0, 0.0, float(w), float(h)]]).expand(n, 4)
            theta = self.crop_theta(n, h, regions, images.device, generator)
            out_h = out_w = crop
        else:
            theta = self.theta(n, images.device, generator)
            out_h, out_w = h, w
        grid = F.affine_grid(theta, (n, 1, out_h, out_w), align_corners=False)
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


def content_regions(info: Sequence[SampleInfo]) -> torch.Tensor | None:
    """(N, 4) float32 (x, y, width, height) of each sample's image inside its padded record; None
    for a batch without sample information (a stand-in)."""
    if not info:
        return None
    rows = []
    for sample in info:
        (x, y), (width, height) = valid_region(sample.inverse_matrix, sample.original_size)
        rows.append((x, y, width, height))
    return torch.tensor(rows, dtype=torch.float32)


def prepare(batch: DeviceBatch, augmenter: Augmenter | None = None, epoch: int = 0, index: int = 0,
            rank: int = 0, regions: torch.Tensor | None = None,
            normalization: Normalization = IMAGENET) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Normalized channels_last images and the maps, augmented when an augmenter is given
    (``regions``: see ``Augmenter.__call__``)."""
    maps = batch.maps()
    if augmenter is None or not augmenter.enabled():
        return normalize(batch.images, normalization), maps
    raw = batch.images.permute(0, 3, 1, 2).float()
    raw, maps = augmenter(raw, maps, epoch, index, rank, regions)
    return normalize(raw.permute(0, 2, 3, 1), normalization), maps
