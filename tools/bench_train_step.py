"""Training-step throughput of DBNet on this machine: whole records against crops, neck widths.

One fwd + bwd + AdamW step per configuration on random inputs (the cost does not depend on the
pixels), best of a few steps after a warm-up step, side by side in one run:

    .venv/bin/python tools/bench_train_step.py [--threads 2]
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from wds_ocr.config import LossConfig, ModelConfig
from wds_ocr.model.dbnet import DBNet
from wds_ocr.model.loss import DBLoss

# (neck channels, input side, batch)
CASES = ((256, 640, 4), (128, 640, 4), (256, 320, 8), (128, 320, 8))


def step_seconds(neck: int, side: int, batch: int, steps: int) -> float:
    torch.manual_seed(0)
    model = DBNet(ModelConfig(neck_channels=neck)).to(memory_format=torch.channels_last)
    criterion = DBLoss(LossConfig(), model.k)
    optimizer = torch.optim.AdamW(model.parameters(), 1e-3)
    images = torch.randn(batch, 3, side, side).contiguous(memory_format=torch.channels_last)
    maps = {name: torch.zeros(batch, side, side) for name in ("gt", "mask", "thresh_map", "thresh_mask")}
    maps["mask"] += 1
    maps["gt"][:, side // 4 : side // 4 + 8, side // 8 : side // 2] = 1
    times = []
    for _ in range(steps + 1):
        started = time.perf_counter()
        loss, _ = criterion(model(images), maps)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - started)
    return min(times[1:])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads; ResNet-18 DBNet, fp32, channels_last")
    for neck, side, batch in CASES:
        seconds = step_seconds(neck, side, batch, args.steps)
        print(f"  neck {neck:3d}  input {side} x {side}  batch {batch}:  {seconds:.2f} s/step  "
              f"{batch / seconds:5.2f} samples/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
