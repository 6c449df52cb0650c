"""One prepared GPU check: shards of the real receipts, a short training run, validation at bf16 and fp32.

    python tools/gpu_check.py                 # on a GPU machine: ~3-5 minutes, prints one JSON object
    python tools/gpu_check.py --smoke         # tiny sizes, runs on a CPU in well under a minute

    python tools/gpu_check.py --ppocr-prepare .gpu          # here: what the PP-OCRv4 check needs (29 MB)
    python tools/gpu_check.py --ppocr .gpu --out "$OUT"     # on the GPU machine (carry .gpu): ~5 minutes

Steps (each timed): build train and val shards of ../shared/data/sroie-dev (synthetic receipts
when it is absent); train ``--steps`` optimizer steps at bf16-mixed from scratch (samples/s,
data-wait fraction, GPU utilization sampled meanwhile); evaluate the resulting checkpoint on the
val shards at bf16-mixed and at fp32 (images/s, P/R/H, GPU utilization); then a forward-only pass
over the val shards timed with CUDA events: GPU busy fraction = summed event time / wall time.
GPU utilization comes from ``torch.cuda.utilization()`` (needs pynvml) or, failing that,
``nvidia-smi``; it is null where neither works (and on a CPU).

``--ppocr`` is the GPU run of the PP-OCRv4 fine-tuning that issue 20 asks for (docs/BENCHMARKS.md,
"Detectors": on the CPU it affords 300-1200 steps). A device machine sees only the repository, so
``--ppocr-prepare DIR`` first writes what it needs into DIR (ignore it in git, carry it): the
train split of ``--source`` with its images made upright and at most 1600 px on the long side
(JPEG quality 95, the points scaled to match; the records at 1600 px then come out as from the
originals, to resampling and JPEG noise) and the imported detector (``--init``, default
``pretrained/ppocrv4_det.pt`` from ``wds-ocr import-ppocr``). ``--ppocr DIR --out OUT`` then builds
1600 px train shards of that copy and runs, each timed, with ``tools/recipes/sroie-ppocr-gpu.toml``:
guided fine-tuning (``tools/finetune_guided.py --temperature 10 --add-missed``: at most
``--guided-steps``, its cosine decay ending with ``--guided-seconds``) and the DB loss (``train
--init``, ``--db-steps`` cut to what a 20-step probe says fits ``--db-seconds``). Both checkpoints
land in OUT (``guided.pt``, ``db.pt``) with ``summary.json``; score them here on the original
receipts as the recipe does (``evaluate --sweep ... --save-best`` on the train shards, then
``tools/bench_detectors.py`` on val beside PP-OCRv4). The device machine lacks some of wds-ocr's
packages: download them here as wheels into ``.whl`` (docs/BENCHMARKS.md, "What a GPU run needs",
has the commands) and carry ``.whl`` and ``.gpu``.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

from wds_ocr.config import Config, load_config
from wds_ocr.data.synth import synthesize
from wds_ocr.errors import WdsOcrError
from wds_ocr.infer.evaluate import evaluate_shards
from wds_ocr.loader.device import normalize
from wds_ocr.loader.loaders import make_loader
from wds_ocr.loader.stream import ShardStream
from wds_ocr.shards.build import build_shards
from wds_ocr.run.checkpoint import load_model
from wds_ocr.train.log import read_metrics
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
    parser.add_argument("--ppocr-prepare", type=Path, metavar="DIR",
                        help="write the PP-OCRv4 check's data and start into DIR (run here, then carry DIR)")
    parser.add_argument("--init", type=Path, default=Path("pretrained/ppocrv4_det.pt"),
                        help="the imported detector for --ppocr-prepare [%(default)s]")
    parser.add_argument("--ppocr", type=Path, metavar="DIR", help="run the PP-OCRv4 fine-tuning check on DIR")
    parser.add_argument("--out", type=Path, help="--ppocr: where the checkpoints and summary.json go")
    parser.add_argument("--guided-steps", type=int, default=6000, help="--ppocr: guided steps at most [%(default)s]")
    parser.add_argument("--guided-seconds", type=float, default=150.0,
                        help="--ppocr: guided time budget; its cosine decay ends with it [%(default)s]")
    parser.add_argument("--db-steps", type=int, default=6000, help="--ppocr: DB-loss steps at most [%(default)s]")
    parser.add_argument("--db-seconds", type=float, default=100.0,
                        help="--ppocr: DB-loss time, its step count set from a 20-step probe [%(default)s]")
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


PPOCR_CONFIG = Path(__file__).resolve().parent / "recipes" / "sroie-ppocr-gpu.toml"
PPOCR_LONG_SIDE = 1600  # the recipe's transform.size: records from the copy match the originals'


def shrink_split(source: Path, split: str, out: Path, long_side: int) -> dict:
    """Write ``split`` of a receipt source into ``out`` (json layout): each image upright (EXIF
    applied), at most ``long_side`` px on its long side, as JPEG quality 95; each word's points
    scaled with it, its transcription kept. Samples and words the source reader or the decoder
    cannot use are left out and listed with their reasons."""
    import cv2

    from wds_ocr.data.images import decode_canonical, read_image_bytes
    from wds_ocr.data.sources import list_source
    from wds_ocr.errors import SampleError

    config = load_config(None)
    listing = list_source(source, split, config.source)
    (out / "images" / split).mkdir(parents=True, exist_ok=True)
    (out / "jsons").mkdir(parents=True, exist_ok=True)
    images: dict = {}
    words = 0
    left_out = [f"{reject.name}: {reject.reason}" for reject in listing.rejects]
    words_left_out = [f"{skip.name} [{skip.word_id}]: {skip.reason}" for sample in listing.samples
                      for skip in sample.skips]
    for sample in listing.samples:
        name = Path(sample.name).stem + ".jpg"
        if name in images:
            left_out.append(f"{sample.name}: its copy would be {name}, which another image of the split already is")
            continue
        try:
            pixels = decode_canonical(read_image_bytes(sample.image_path, sample.name), sample.name,
                                      config.source.max_pixels).pixels
        except SampleError as error:
            left_out.append(str(error))
            continue
        height, width = pixels.shape[:2]
        scale = min(1.0, long_side / max(height, width))
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        if size != (width, height):
            pixels = cv2.resize(pixels, size, interpolation=cv2.INTER_AREA)
        ok, encoded = cv2.imencode(".jpg", cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])
        if not ok:
            left_out.append(f"{sample.name}: OpenCV could not encode its {size[0]}x{size[1]} copy")
            continue
        (out / "images" / split / name).write_bytes(encoded.tobytes())
        factors = np.array([size[0] / width, size[1] / height])
        dont_care = config.source.dont_care[0]
        images[name] = {"words": {word.word_id: {
            "points": np.round(word.points * factors, 2).tolist(),
            "transcription": word.text if word.text is not None else (dont_care if word.dont_care else "")}
            for word in sample.words}}
        words += len(sample.words)
    (out / "jsons" / f"{split}.json").write_text(json.dumps({"images": images}), encoding="utf-8")
    return {"images": len(images), "words": words, "samples_in": listing.total, "left_out": left_out,
            "words_left_out": words_left_out}


def ppocr_prepare(args: argparse.Namespace) -> dict:
    if not args.init.is_file():
        raise SystemExit(f"gpu_check: {args.init} does not exist: run wds-ocr import-ppocr --out {args.init} first")
    if not (args.source / "jsons" / "train.json").is_file():
        raise SystemExit(f"gpu_check: {args.source} has no jsons/train.json: give --source a receipt dataset")
    from wds_ocr.run.checkpoint import open_checkpoint

    open_checkpoint(args.init).model(torch.device("cpu"))  # refused here, not after a device machine started
    out = args.ppocr_prepare
    counts = shrink_split(args.source, "train", out / "source", PPOCR_LONG_SIDE)
    shutil.copyfile(args.init, out / "init.pt")
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    return {"prepared": str(out), "train": counts, "bytes": size,
            "next": f"carry {out} and run: python tools/gpu_check.py --ppocr {out} --out $OUT"}


def ppocr_check(args: argparse.Namespace) -> dict:
    """Build 1600 px train shards of the prepared copy, then guided and DB-loss fine-tuning, timed."""
    if args.out is None:
        raise SystemExit("gpu_check: --ppocr needs --out (the folder the checkpoints go to)")
    prepared, out = args.ppocr, args.out
    for needed in (prepared / "init.pt", prepared / "source" / "jsons" / "train.json"):
        if not needed.is_file():
            raise SystemExit(f"gpu_check: {needed} is missing: run --ppocr-prepare {prepared} on the machine "
                             f"that has the data, and carry {prepared}")
    out.mkdir(parents=True, exist_ok=True)
    work = args.work or Path(tempfile.mkdtemp(prefix="gpu_check_ppocr_"))
    device = resolve_device(args.device)
    smoke = ["transform.size=128", "augment.crop_size=96", "loader.batch_size=2", "loader.workers=0",
             "train.precision=32"] if args.smoke else []
    workers = [f"loader.workers={args.workers}"] if args.workers is not None and not args.smoke else []
    config = load_config(PPOCR_CONFIG, [*smoke, *workers, "train.eval_every=0", "train.log_every=20"])
    summary: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                     "torch": torch.__version__, "smoke": args.smoke, "config": str(PPOCR_CONFIG.name)}
    tick = time.perf_counter()
    built = build_shards(prepared / "source", "train", work / "shards", config, workers=max(1, args.workers or 8))
    summary["build"] = {"seconds": round(time.perf_counter() - tick, 1), "records": built.manifest.counts.written}

    tick = time.perf_counter()
    guided = [sys.executable, str(Path(__file__).resolve().parent / "finetune_guided.py"),
              "--init", str(prepared / "init.pt"), "--shards", str(work / "shards"),
              "--source", str(prepared / "source"), "--out", str(out / "guided.pt"),
              "--steps", str(args.guided_steps), "--temperature", "10", "--add-missed",
              "--config", str(PPOCR_CONFIG), "--device", str(device), "--max-seconds", str(args.guided_seconds),
              *[f"--set={setting}" for setting in [*smoke, *workers]]]
    completed = subprocess.run(guided, capture_output=True, text=True, timeout=args.guided_seconds + 600)
    log = completed.stdout.strip().splitlines()
    summary["guided"] = {"returncode": completed.returncode, "seconds": round(time.perf_counter() - tick, 1),
                         "log": log[-4:], "stderr": completed.stderr.strip().splitlines()[-5:]}

    # The DB loss exactly as the recipe runs it (wds-ocr train --init): a 20-step probe gives the
    # step time, then the run's length is what fits --db-seconds (its schedule spans that length).
    def db_run(name: str, steps: int) -> tuple[subprocess.CompletedProcess, float | None]:
        command = [sys.executable, "-m", "wds_ocr", "train", "--init", str(prepared / "init.pt"),
                   "--shards", str(work / "shards"), "--out", str(work / name), "--config", str(PPOCR_CONFIG),
                   "--max-steps", str(steps), "--device", str(device), "--quiet",
                   *[f"--set={setting}" for setting in [*smoke, *workers, "train.eval_every=0"]]]
        done = subprocess.run(command, capture_output=True, text=True, timeout=args.db_seconds + 600)
        found = re.search(r"trained \d+ steps? over .* in ([0-9.]+) s", done.stdout)
        return done, float(found.group(1)) if found else None

    tick = time.perf_counter()
    probe_steps = 2 if args.smoke else 20
    probe, probe_seconds = db_run("probe", probe_steps)
    summary["db"] = {"returncode": probe.returncode, "stderr": probe.stderr.strip().splitlines()[-5:]}
    if probe.returncode == 0 and probe_seconds is not None:
        per_step = probe_seconds / probe_steps
        steps = max(1, min(args.db_steps, int(args.db_seconds / per_step)))
        done, seconds = db_run("db", steps)
        if done.returncode == 0:
            shutil.copyfile(work / "db" / "last.pt", out / "db.pt")
        losses = [r["loss"] for r in read_metrics(work / "db") if r.get("event") == "train" and "loss" in r] \
            if (work / "db" / "metrics.jsonl").is_file() else []
        summary["db"] = {"returncode": done.returncode, "probe_seconds_per_step": round(per_step, 4),
                         "steps": steps, "seconds": seconds, "log": done.stdout.strip().splitlines()[-3:],
                         "stderr": done.stderr.strip().splitlines()[-5:],
                         "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
                         "total_seconds": round(time.perf_counter() - tick, 1)}
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


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
    if args.ppocr_prepare or args.ppocr:
        try:
            summary = ppocr_prepare(args) if args.ppocr_prepare else ppocr_check(args)
        except (WdsOcrError, OSError) as error:
            raise SystemExit(f"gpu_check: {error}") from None
        print(json.dumps(summary, indent=1))
        failed = any(summary.get(stage, {}).get("returncode", 0) != 0 for stage in ("guided", "db"))
        return 1 if failed else 0
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
