"""Build speed with JPEGs decoded whole or at a reduced scale (transform.jpeg_reduction), side by side.

    .venv/bin/python tools/bench_decode.py [--source ../shared/data/sroie-dev] [--split train]
        [--sizes 640 1600] [--workers 2] [--repeat 2]

For each record size, builds the split with ``transform.jpeg_reduction=off`` and ``=auto`` in
turn (``--repeat`` times, alternating; temporary folders, removed afterwards) and prints samples/s
of each, the median ratio of neighbouring runs, and how many images each reduction (1, 2, 4, 8)
applied to.
"""

from __future__ import annotations

import argparse
import collections
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

from wds_ocr.config import load_config
from wds_ocr.data.geometry import plan_resize
from wds_ocr.data.images import jpeg_reduction, read_image_bytes, reducible_jpeg_size
from wds_ocr.data.sources import list_source
from wds_ocr.shards.build import build_shards

DEFAULT_SOURCE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "sroie-dev"


def reductions(source: Path, split: str, size: int) -> dict[int, int]:
    """How many of the split's images each reduction applies to at ``size`` (orientation aside)."""
    config = load_config(None, [f"transform.size={size}"])
    found: collections.Counter = collections.Counter()
    for sample in list_source(source, split, config.source).samples:
        stored = reducible_jpeg_size(read_image_bytes(sample.image_path, sample.name))
        if stored is None:
            found[1] += 1
            continue
        found[jpeg_reduction(stored, plan_resize(*stored, config.transform).resized_size)] += 1
    return dict(sorted(found.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE)
    parser.add_argument("--split", default="train")
    parser.add_argument("--sizes", type=int, nargs="+", default=[640, 1600])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d')}; "
          f"{args.source} {args.split}, {args.workers} build workers")
    for size in args.sizes:
        rates: dict[str, list[float]] = {"off": [], "auto": []}
        samples = 0
        for _ in range(args.repeat):
            for mode in ("off", "auto"):
                config = load_config(None, [f"transform.size={size}", f"transform.jpeg_reduction={mode}"])
                with tempfile.TemporaryDirectory(prefix="wds-ocr-decode-") as tmp:
                    started = time.perf_counter()
                    result = build_shards(args.source, args.split, Path(tmp) / "out", config, workers=args.workers)
                    seconds = time.perf_counter() - started
                samples = result.manifest.counts.written
                rates[mode].append(samples / seconds)
        ratios = [auto / off for off, auto in zip(rates["off"], rates["auto"])]
        print(f"size {size}: {samples} samples; off {statistics.median(rates['off']):.1f} samples/s, auto "
              f"{statistics.median(rates['auto']):.1f} samples/s; auto/off {statistics.median(ratios):.2f}x "
              f"(runs: {', '.join(f'{r:.2f}' for r in ratios)}); images per reduction "
              f"{reductions(args.source, args.split, size)}")


if __name__ == "__main__":
    main()
