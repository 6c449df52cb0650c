"""Benchmark build-shards: the same splits built with 1 and with 2 worker processes, side by side.

    python tools/bench_build.py                       # ../shared/data/sroie-dev, splits train and val
    python tools/bench_build.py --split val --workers 1 2 4 --set transform.size=512
    python tools/bench_build.py --repeat 3 --json     # 1, 2, 1, 2, 1, 2 workers; machine-readable

A run builds every split (in order, as a user would: train then val) into its own temporary
folders (removed afterwards) and is timed from the first call to ``build_shards`` to the last
return: listing, worker start-up, pipeline, encoding, writing and the manifests. Per split it also
reports when the first sample was done and the rate after that, and it checks that every worker
count wrote identical bytes. ``--repeat N`` alternates the worker counts N times (a shared machine's
load drifts; the speedup is taken per repeat, between neighbouring runs, and its median reported).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

from wds_ocr.config import load_config
from wds_ocr.errors import WdsOcrError
from wds_ocr.shards.build import build_shards

DEFAULT_SOURCE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "sroie-dev"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="dataset root [%(default)s]")
    parser.add_argument("--split", nargs="+", default=["train", "val"], help="splits to build [train val]")
    parser.add_argument("--repeat", type=int, default=1, help="alternate the worker counts this many times [1]")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to compare [1 2]")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="config override, e.g. transform.size=512 (repeatable)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = parser.parse_args(argv)
    if any(w < 1 for w in args.workers):
        parser.error("--workers takes counts of 1 or more")
    return args


def folder_digest(folder: Path, names: list[str]) -> str:
    digest = hashlib.sha256()
    for name in names + ["manifest.json", "rejects.jsonl"]:
        digest.update((folder / name).read_bytes())
    return digest.hexdigest()


def run_split(source: Path, split: str, out: Path, workers: int, config) -> dict:
    ticks: list[float] = []
    started = time.perf_counter()
    result = build_shards(source, split, out, config, workers=workers,
                          progress=lambda _: ticks.append(time.perf_counter()))
    seconds = time.perf_counter() - started
    manifest = result.manifest
    names = [entry.name for entry in manifest.shards]
    return {
        "split": split,
        "seconds": round(seconds, 3),
        "samples": manifest.counts.written,
        # Start-up (listing, worker processes, first sample) and the rate once samples flow.
        "first_sample_s": round(ticks[0] - started, 3) if ticks else None,
        "steady_samples_per_s": round((len(ticks) - 1) / (ticks[-1] - ticks[0]), 2) if len(ticks) > 1 else None,
        "bytes": sum(entry.bytes for entry in manifest.shards),
        "shards": len(names),
        "sha256": folder_digest(out, names),
    }


def run(source: Path, splits: list[str], workers: int, overrides: list[str]) -> dict:
    config = load_config(None, overrides)
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench_build_") as tmp:
        started = time.perf_counter()
        parts = [run_split(source, split, Path(tmp) / split, workers, config) for split in splits]
        seconds = time.perf_counter() - started
    samples = sum(p["samples"] for p in parts)
    return {
        "workers": workers,
        "seconds": round(seconds, 3),
        "samples": samples,
        "samples_per_s": round(samples / seconds, 2),
        "bytes": sum(p["bytes"] for p in parts),
        "load_average_1min": round(load, 2),
        "splits": parts,
        "sha256": hashlib.sha256("".join(p["sha256"] for p in parts).encode()).hexdigest(),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        runs = [run(args.source, args.split, workers, args.overrides)
                for _ in range(args.repeat) for workers in args.workers]
        size = load_config(None, args.overrides).transform.size
    except WdsOcrError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    base_workers = args.workers[0]
    samples = runs[0]["samples"]
    width = len(args.workers)
    rounds = [runs[i : i + width] for i in range(0, len(runs), width)]
    speedups = {str(w): [round(r[k]["samples_per_s"] / r[0]["samples_per_s"], 3) for r in rounds]
                for k, w in enumerate(args.workers) if k}
    report = {
        "source": str(args.source),
        "splits": args.split,
        "transform_size": size,
        "samples": samples,
        "bytes_per_sample": round(runs[0]["bytes"] / max(samples, 1)),
        "runs": [{k: v for k, v in r.items() if k != "sha256"} for r in runs],
        "speedup": {w: statistics.median(values) for w, values in speedups.items()},
        "speedup_per_repeat": speedups,
        "identical": len({r["sha256"] for r in runs}) == 1,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
    }
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(f"{args.source} splits {' + '.join(args.split)}: {samples} samples at {size}x{size}, "
              f"{os.cpu_count()} CPUs")
        for r in runs:
            detail = "; ".join(f"{p['split']} {p['seconds']:.2f} s, first sample after {p['first_sample_s']:.2f} s, "
                               f"then {p['steady_samples_per_s']:.2f} samples/s" for p in r["splits"])
            print(f"  workers {r['workers']:>2}: {r['seconds']:7.2f} s  {r['samples_per_s']:7.2f} samples/s  "
                  f"(load {r['load_average_1min']:.1f}; {detail})")
        for w, values in speedups.items():
            print(f"  speedup {w} vs {base_workers} workers: {report['speedup'][w]:.2f}x (median of "
                  f"{', '.join(f'{v:.2f}' for v in values)})")
        print(f"  bytes per sample: {report['bytes_per_sample']:,} ({report['bytes_per_sample'] / 1e6:.2f} MB)")
        print(f"  outputs byte-identical across worker counts: {'yes' if report['identical'] else 'NO'}")
    return 0 if report["identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
