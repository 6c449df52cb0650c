"""One prepared GPU check: shards of the real receipts, a short training run, validation at bf16 and fp32.

    python tools/gpu_check.py                 # on a GPU machine: ~3-5 minutes, prints one JSON object
    python tools/gpu_check.py --smoke         # tiny sizes, runs on a CPU in well under a minute

Steps (each timed): build train and val shards of ../shared/data/sroie-dev (synthetic receipts
when it is absent); train ``--steps`` optimizer steps at bf16-mixed from scratch (samples/s,
data-wait fraction, GPU utilization sampled meanwhile); evaluate the resulting checkpoint on the
val shards at bf16-mixed and at fp32 (images/s, P/R/H, GPU utilization); then a forward-only pass
over the val shards timed with CUDA events: GPU busy fraction = summed event time / wall time.
GPU utilization comes from ``torch.cuda.utilization()`` (needs pynvml) or, failing that,
``nvidia-smi``; it is null where neither works (and on a CPU).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from wds_ocr.config import Config, load_config
from wds_ocr.data.synth import synthesize
from wds_ocr.infer.evaluate import evaluate_shards
from wds_ocr.loader.device import normalize
from wds_ocr.loader.loaders import make_loader
from wds_ocr.loader.stream import ShardStream
from wds_ocr.shards.build import build_shards
from wds_ocr.run.checkpoint import load_model
from wds_ocr.train.loop import TrainProgress, train
from wds_ocr.run.runtime import autocast, resolve_device

DEFAULT_SOURCE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "sroie-dev"
# (train images, val images) copied from the source in --smoke mode.
SMOKE_SUBSET = (8, 4)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: a CPU-runnable check of this script")
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="dataset root [%(default)s]")
    parser.add_argument("--work", type=Path, help="folder for shards and checkpoints [a temporary folder]")
    parser.add_argument("--size", type=int, help="transform.size [640; smoke 128]")
    parser.add_argument("--batch-size", type=int, help="batch size [16; smoke 2]")
    parser.add_argument("--steps", type=int, help="training steps [300; smoke 3]")
    parser.add_argument("--workers", type=int, help="loader workers and build processes [8; smoke 1]")
    parser.add_argument("--device", default="auto", help="device [auto]")
    parser.add_argument("--compile", action="store_true", help="train with torch.compile")
    return parser.parse_args(argv)


def settings(args: argparse.Namespace) -> dict:
    smoke = args.smoke
    return {
        "size": args.size or (128 if smoke else 640),
        "batch_size": args.batch_size or (2 if smoke else 16),
        "steps": args.steps or (3 if smoke else 300),
        "workers": args.workers if args.workers is not None else (1 if smoke else 8),
        "neck_channels": 32 if smoke else 256,
    }


def subset_source(source: Path, out: Path, counts: tuple[int, int]) -> Path:
    """A copy of the first N images of train and val (annotations filtered to match)."""
    for split, count in zip(("train", "val"), counts):
        annotations = json.loads((source / "jsons" / f"{split}.json").read_text(encoding="utf-8"))["images"]
        names = sorted(annotations)[:count]
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
        (out / "jsons").mkdir(exist_ok=True)
        for name in names:
            shutil.copyfile(source / "images" / split / name, out / "images" / split / name)
        body = {"images": {name: annotations[name] for name in names}}
        (out / "jsons" / f"{split}.json").write_text(json.dumps(body), encoding="utf-8")
    return out


class UtilizationSampler:
    """Samples GPU utilization (percent) in a background thread; ``mean()`` over the samples taken."""

    def __init__(self, device: torch.device, interval: float = 0.2):
        self.device = device
        self.interval = interval
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.read = self._reader()

    def _reader(self):
        if self.device.type != "cuda":
            return None
        try:
            torch.cuda.utilization(self.device)
            return lambda: float(torch.cuda.utilization(self.device))
        except Exception:  # pynvml missing or unusable: try nvidia-smi
            pass
        command = ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                   "-i", str(self.device.index or 0)]
        try:
            subprocess.run(command, capture_output=True, check=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return lambda: float(subprocess.run(command, capture_output=True, text=True, timeout=10).stdout.strip())

    def __enter__(self) -> "UtilizationSampler":
        if self.read is not None:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.samples.append(self.read())
            except Exception:
                return

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def mean(self) -> float | None:
        return round(sum(self.samples) / len(self.samples), 1) if self.samples else None


def event_busy_fraction(checkpoint: Path, shards: Path, config: Config, precision: str, device: torch.device,
                        batch_size: int, workers: int) -> dict:
    """Forward passes over the shards; GPU time from CUDA events over wall time (None on a CPU)."""
    model, _ = load_model(checkpoint, device)
    loader = make_loader(ShardStream(shards, batch_size=batch_size), workers, mode=config.loader.mode)
    events = []
    images = 0
    started = time.perf_counter()
    with torch.inference_mode():
        for batch in loader:
            pixels = normalize(batch.images.to(device, non_blocking=True))
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
            with autocast(device, precision):
                model(pixels)
            if device.type == "cuda":
                end.record()
                events.append((start, end))
            images += len(batch)
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # sync: every queued forward has finished
    wall = time.perf_counter() - started
    busy = sum(s.elapsed_time(e) for s, e in events) / 1000.0 if events else None
    return {"images": images, "seconds": round(wall, 3), "images_per_s": round(images / wall, 2),
            "gpu_busy_fraction": round(busy / wall, 3) if busy is not None else None}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup = settings(args)
    started = time.perf_counter()
    device = resolve_device(args.device)
    work = args.work or Path(tempfile.mkdtemp(prefix="gpu_check_"))
    work.mkdir(parents=True, exist_ok=True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")
    summary: dict = {"device": name, "torch": torch.__version__, "smoke": args.smoke, "settings": setup}

    # Data: the real receipts (a subset in smoke mode) or synthetic ones where they are absent.
    tick = time.perf_counter()
    if (args.source / "jsons" / "val.json").is_file():
        source = subset_source(args.source, work / "source", SMOKE_SUBSET) if args.smoke else args.source
        summary["data"] = str(args.source)
    else:
        source = work / "source"
        if not (source / "jsons").exists():
            synthesize(source, 12 if args.smoke else 150, seed=0, val_fraction=0.3)
        summary["data"] = "synthetic"
    config = load_config(None, [
        f"transform.size={setup['size']}", f"loader.batch_size={setup['batch_size']}",
        f"loader.workers={setup['workers']}", f"model.neck_channels={setup['neck_channels']}",
        "train.precision=bf16-mixed", f"train.compile={str(args.compile).lower()}", "train.eval_every=0",
        f"train.log_every={max(1, min(20, setup['steps'] // 5))}", f"train.warmup_steps={min(50, setup['steps'])}",
    ])
    build_workers = max(1, setup["workers"])
    built = {split: build_shards(source, split, work / "shards" / split, config, workers=build_workers)
             for split in ("train", "val")}
    summary["build"] = {"seconds": round(time.perf_counter() - tick, 2),
                        **{split: result.manifest.counts.written for split, result in built.items()}}

    # Training: the schedule spans exactly the requested steps.
    config = config.model_copy(update={"train": config.train.model_copy(update={"max_steps": setup["steps"]})})
    events: list[TrainProgress] = []
    with UtilizationSampler(device) as sampler:
        result = train(config, work / "shards" / "train", out_dir=work / "run", device=args.device,
                       progress=events.append)
    windows = [e for e in events if e.event == "train"]
    steady = windows[1:] or windows
    summary["train"] = {
        "steps": result.steps, "seconds": round(result.seconds, 2),
        "samples_per_s": round(result.samples_per_s, 2),
        "steady_samples_per_s": round(sorted(e.samples_per_s for e in steady)[len(steady) // 2], 2),
        "data_wait_fraction": round(result.data_wait, 4),
        "steady_data_wait_fraction": round(sum(e.data_wait for e in steady) / len(steady), 4),
        "first_loss": round(windows[0].loss, 4), "last_loss": round(windows[-1].loss, 4),
        "gpu_utilization_percent": sampler.mean(),
    }

    # Validation over shards at both precisions, then the CUDA-event busy fraction.
    summary["eval"] = {}
    for precision in ("bf16-mixed", "32"):
        with UtilizationSampler(device) as sampler:
            evaluation = evaluate_shards(result.last_checkpoint, work / "shards" / "val", config, precision=precision,
                                         batch_size=setup["batch_size"], workers=setup["workers"], device=args.device)
        score = evaluation.score
        summary["eval"][precision] = {
            "images": evaluation.images, "seconds": round(evaluation.seconds, 3),
            "images_per_s": round(evaluation.images_per_s, 2), "precision": round(score.precision, 4),
            "recall": round(score.recall, 4), "hmean": round(score.hmean, 4),
            "gpu_utilization_percent": sampler.mean(),
            "forward_only": event_busy_fraction(result.last_checkpoint, work / "shards" / "val", config, precision,
                                                device, setup["batch_size"], setup["workers"]),
        }
    summary["eval"]["hmean_bf16_minus_fp32"] = round(
        summary["eval"]["bf16-mixed"]["hmean"] - summary["eval"]["32"]["hmean"], 4)
    summary["seconds"] = round(time.perf_counter() - started, 1)
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
