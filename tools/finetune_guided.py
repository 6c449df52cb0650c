"""Guided fine-tuning of an imported detector: its own map, cut to the ground truth's words.

    .venv/bin/python tools/finetune_guided.py --init pretrained/ppocrv4_det.pt \
        --shards shards/sroie-1600a/train --source ../shared/data/sroie-dev --out runs/guided.pt \
        --steps 300 --temperature 10
    .venv/bin/wds-ocr evaluate --checkpoint runs/guided.pt --shards shards/sroie-1600a/train \
        --set evaluation.crop_to_content=true --sweep thresh=0.2,0.3,0.4,0.5 \
        --sweep box_thresh=0.5,0.6,0.7 --sweep unclip_ratio=1.2,1.3,1.4,1.5 --save-best runs/guided-tuned.pt
    .venv/bin/wds-ocr evaluate --checkpoint runs/guided-tuned.pt --source ../shared/data/sroie-dev --split val

An experiment, not a `wds-ocr train` mode: docs/BENCHMARKS.md ("Fine-tuning the imported detector")
records what it gives (the imported detector kept, not improved). Fine-tuning PP-OCRv4 on the
ground truth's own DB targets makes it worse (0.85-0.93 on sroie-dev val against 0.95); this keeps
the imported model's kernels and changes only where the ground truth disagrees with them:

- target = the frozen imported model's probability above 0.5, **inside the ground-truth word
  polygons only**: 0 in the gaps between words it joins ("DISCOUNT" and ":") and on text nobody
  labelled; with ``--add-missed``, plus the DB kernels of labelled words in which its largest
  probability is under 0.1 (words it does not see at all); with ``--short-words N``, plus the DB
  kernels (``targets.shrink_ratio``) of words of at most N characters, whose boxes it draws too
  small (a "1" of 16 x 22 px comes out 8 x 14), each of their pixels counted ``--short-weight``
  times in the BCE;
- DB's balanced BCE (3 hard negatives per positive, weight 5) plus dice on the probability map;
  the threshold head and every BatchNorm's statistics stay as imported; SGD with momentum 0.9,
  linear warmup over 20 steps, then cosine decay;
- ``--temperature T`` divides the probability head's last layer by T before training: the
  imported logits run from -99 to +72, so a decision cannot move in a few hundred steps at a
  learning rate that keeps the rest of the model; at T = 10 they run from -10 to +7 (the sign of
  every logit, and so the map at probability 0.5, is unchanged).

Windows of the records are augmented on the device as `train` does (`tools/recipes/sroie-ppocr.toml`'s
augmentation, without flips, rotation at most 5 degrees). The word polygons come from the live
pipeline (``--source``), matched to records by name, in the record frame; they travel through the
augmentation in the slot of the threshold mask, which this loss does not use.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from wds_ocr.config import load_config
from wds_ocr.data.images import read_image_bytes
from wds_ocr.data.pipeline import process_sample
from wds_ocr.data.sources import list_source
from wds_ocr.data.targets import make_targets
from wds_ocr.errors import WdsOcrError
from wds_ocr.loader.device import Augmenter, content_regions, normalize, to_device
from wds_ocr.loader.loaders import make_loader
from wds_ocr.loader.stream import ShardStream
from wds_ocr.run.checkpoint import open_checkpoint, save_checkpoint
from wds_ocr.run.runtime import resolve_device

RECIPE = Path(__file__).parent / "recipes" / "sroie-ppocr.toml"


def word_masks(source: Path, split: str, size: int, overrides: list[str], short: int) -> dict[str, torch.Tensor]:
    """Record name -> (size, size) uint8 map: bit 1 inside a labelled word's polygon (don't-care
    words included), bit 2 on the DB kernel of a word of at most ``short`` characters."""
    config = load_config(None, [f"transform.size={size}", *overrides])
    masks = {}
    for sample in list_source(source, split, config.source).samples:
        meta = process_sample(sample, config, read_image_bytes(sample.image_path, sample.name)).meta
        mask = np.zeros((size, size), np.uint8)
        for polygon in meta.polygons:
            cv2.fillPoly(mask, [np.round(np.asarray(polygon)).astype(np.int32)], 1)
        if short:
            texts = [(word.text or "").strip() for word in sample.words]
            chosen = [i for i, text in enumerate(texts) if 0 < len(text) <= short and not meta.dont_care[i]]
            if chosen:
                kernels = make_targets([meta.polygons[i] for i in chosen], [False] * len(chosen), size, size,
                                       config.targets).gt
                mask |= kernels << 1
        masks[sample.name] = torch.from_numpy(mask)
    return masks


def missed_kernels(gt: torch.Tensor, teacher: torch.Tensor, below: float) -> torch.Tensor:
    """(N, H, W) bool: the kernels of ``gt`` (4-connected) in which ``teacher`` stays under ``below``."""
    missed = torch.zeros_like(gt, dtype=torch.bool)
    for n in range(gt.shape[0]):
        count, labels = cv2.connectedComponents((gt[n] > 0.5).cpu().numpy().astype(np.uint8), connectivity=4)
        if count <= 1:
            continue
        flat = torch.from_numpy(labels).long().flatten()
        top = torch.zeros(count).scatter_reduce_(0, flat, teacher[n].flatten().cpu(), reduce="amax", include_self=True)
        hit = top < below
        hit[0] = False
        missed[n] = hit[flat].view(gt.shape[1:])
    return missed


def guided_loss(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor,
                weight: torch.Tensor | None = None) -> torch.Tensor:
    """DB's balanced BCE (3 hardest negatives per positive) x 5 plus dice, on probability logits;
    ``weight`` (default 1) scales each pixel's BCE, so a few pixels can count as many."""
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none") * valid
    if weight is not None:
        bce = bce * weight
    positive, negative = target * valid, (1 - target) * valid
    count = int(positive.sum())
    hardest = (bce * negative).flatten().topk(min(int(negative.sum()), 3 * max(count, 1))).values
    balanced = ((bce * positive).sum() + hardest.sum()) / (count + len(hardest) + 1e-6)
    prob = torch.sigmoid(logits)
    dice = 1 - 2 * (prob * positive).sum() / ((prob * valid).sum() + positive.sum() + 1e-6)
    return 5 * balanced + dice


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--init", type=Path, required=True, help="the imported detector (wds-ocr import-ppocr)")
    parser.add_argument("--shards", required=True, help="train shards (records at the size the model runs at)")
    parser.add_argument("--source", type=Path, required=True, help="the source folder the shards were built from")
    parser.add_argument("--split", default="train")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--temperature", type=float, default=10.0)
    parser.add_argument("--add-missed", action="store_true", help="words it does not see become positives")
    parser.add_argument("--short-words", type=int, default=0, metavar="N",
                        help="the DB kernels of words of at most N characters become positives")
    parser.add_argument("--short-weight", type=float, default=1.0, metavar="W",
                        help="each pixel of those kernels counts W times in the BCE")
    parser.add_argument("--config", type=Path, default=RECIPE, help="loader and augmentation settings")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="override a setting of --config (repeatable)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... [auto: CUDA where present]")
    parser.add_argument("--max-seconds", type=float, default=0.0, metavar="S",
                        help="a time budget (0: none): the cosine decay follows whichever of steps and seconds "
                             "is further along, and the run stops when either is used up")
    args = parser.parse_args()
    try:
        run(args)
    except (WdsOcrError, OSError, ValueError) as error:
        sys.exit(f"finetune_guided: {error}")


def run(args: argparse.Namespace) -> None:
    torch.manual_seed(args.seed)
    device = resolve_device(args.device)
    config = load_config(args.config, ["augment.hflip=0", "augment.rotate_degrees=5", *args.overrides])
    start = open_checkpoint(args.init)
    model = start.model(device)
    teacher = open_checkpoint(args.init).model(device).eval()
    for parameter in teacher.parameters():
        parameter.requires_grad_(False)
    for name, parameter in model.named_parameters():
        if name.startswith("thresh_head"):
            parameter.requires_grad_(False)
    with torch.no_grad():
        model.prob_head[-1].weight.div_(args.temperature)
        model.prob_head[-1].bias.div_(args.temperature)
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trained, lr=args.lr, momentum=0.9)
    stream = ShardStream(args.shards, config.loader, train=True, batch_size=config.loader.batch_size)
    size = stream.manifest.image_size
    reduction = stream.manifest.record_settings["transform"].get("jpeg_reduction", "off")
    masks = word_masks(args.source, args.split, size, [f"transform.jpeg_reduction={reduction}"], args.short_words)
    augmenter = Augmenter(config.augment, config.targets.thresh_min, seed=args.seed)
    step, epoch, started = 0, 0, time.perf_counter()
    out_of_time = False
    while step < args.steps and not out_of_time:
        stream.set_epoch(epoch)
        for batch in make_loader(stream):
            if step >= args.steps:
                break
            along = step / args.steps
            if args.max_seconds:
                along = max(along, (time.perf_counter() - started) / args.max_seconds)
                if along >= 1.0:
                    out_of_time = True
                    break
            model.train()
            for module in model.modules():
                if isinstance(module, torch.nn.BatchNorm2d):
                    module.eval()
            lr = args.lr * min(1.0, (step + 1) / 20) * 0.5 * (1 + math.cos(math.pi * min(1.0, along)))
            for group in optimizer.param_groups:
                group["lr"] = lr
            on_device = to_device(batch, device)
            maps = on_device.maps()
            missing = [info.name for info in batch.info if info.name not in masks]
            if missing:
                raise ValueError(f"records {missing[:3]} of {args.shards} are not in {args.source} split "
                                 f"{args.split!r}: give the source and split the shards were built from")
            maps["thresh_mask"] = torch.stack([masks[info.name] for info in batch.info]).to(device, maps["thresh_mask"].dtype)
            raw = on_device.images.permute(0, 3, 1, 2).float()
            raw, maps = augmenter(raw, maps, epoch, batch.index, 0, content_regions(batch.info))
            images = normalize(raw.permute(0, 2, 3, 1), model.normalization)
            with torch.no_grad():
                teacher_prob = torch.sigmoid(teacher(images)["prob_logits"][:, 0].float())
            slot, valid = maps["thresh_mask"].long(), maps["mask"].float()
            target = torch.maximum((teacher_prob > 0.5).float() * (slot & 1).float(), ((slot >> 1) & 1).float())
            if args.add_missed:
                target = torch.maximum(target, missed_kernels(maps["gt"].float(), teacher_prob, 0.1).float())
            weight = None
            if args.short_weight != 1.0:
                weight = 1 + (args.short_weight - 1) * ((slot >> 1) & 1).float()
            loss = guided_loss(model(images)["prob_logits"][:, 0].float(), target, valid, weight)
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trained, 5.0)
            optimizer.step()
            step += 1
            if step % 25 == 0:
                print(f"step {step}/{args.steps} loss {loss.item():.4f} lr {lr:.2e} "
                      f"{time.perf_counter() - started:.0f} s", flush=True)
        epoch += 1
    model.eval()
    state = {name: tensor.cpu() for name, tensor in model.state_dict().items()}
    save_checkpoint(args.out, {"config": start.body["config"], "model": state})
    stopped = f" (the --max-seconds {args.max_seconds:g} budget ended it; {args.steps} were planned)" if out_of_time else ""
    print(f"wrote {args.out} after {step} steps in {time.perf_counter() - started:.0f} s{stopped}")


if __name__ == "__main__":
    main()
