"""Benchmark build-shards: the same split built with 1 and with 2 worker processes, side by side.

    python tools/bench_build.py                       # ../shared/data/sroie-dev, split val
    python tools/bench_build.py --source DIR --split train --workers 1 2 4 --set transform.size=512
    python tools/bench_build.py --json                # machine-readable

Each run builds into its own temporary folder (removed afterwards) and is timed from the call to
``build_shards`` to its return: listing, worker start-up, pipeline, encoding, writing and the
manifest. It also reports when the first sample was done (start-up: listing, worker processes,
one sample) and the rate after that, and checks that every worker count wrote identical bytes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
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
    parser.add_argument("--split", default="val", help="split to build [%(default)s]")
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


def run(source: Path, split: str, workers: int, overrides: list[str]) -> dict:
    config = load_config(None, overrides)
    with tempfile.TemporaryDirectory(prefix="bench_build_") as tmp:
        out = Path(tmp) / "shards"
        ticks: list[float] = []
        started = time.perf_counter()
        result = build_shards(source, split, out, config, workers=workers,
                              progress=lambda _: ticks.append(time.perf_counter()))
        seconds = time.perf_counter() - started
        manifest = result.manifest
        names = [entry.name for entry in manifest.shards]
        return {
            "workers": workers,
            "seconds": round(seconds, 3),
            "samples": manifest.counts.written,
            "samples_per_s": round(manifest.counts.written / seconds, 2),
            # Start-up (listing, worker processes, first sample) and the rate once samples flow.
            "first_sample_s": round(ticks[0] - started, 3) if ticks else None,
            "steady_samples_per_s": round((len(ticks) - 1) / (ticks[-1] - ticks[0]), 2) if len(ticks) > 1 else None,
            "bytes": sum(entry.bytes for entry in manifest.shards),
            "shards": len(names),
            "sha256": folder_digest(out, names),
        }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        runs = [run(args.source, args.split, workers, args.overrides) for workers in args.workers]
        size = load_config(None, args.overrides).transform.size
    except WdsOcrError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    base = runs[0]
    samples = base["samples"]
    report = {
        "source": str(args.source),
        "split": args.split,
        "transform_size": size,
        "samples": samples,
        "bytes_per_sample": round(base["bytes"] / max(samples, 1)),
        "runs": [{k: v for k, v in r.items() if k != "sha256"} for r in runs],
        "speedup": {str(r["workers"]): round(r["samples_per_s"] / base["samples_per_s"], 2) for r in runs[1:]},
        "identical": len({r["sha256"] for r in runs}) == 1,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
    }
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(f"{args.source} split {args.split}: {samples} samples at {size}x{size}, {os.cpu_count()} CPUs")
        for r in runs:
            print(f"  workers {r['workers']:>2}: {r['seconds']:7.2f} s  {r['samples_per_s']:7.2f} samples/s  "
                  f"({r['shards']} shards; first sample after {r['first_sample_s']:.2f} s, then "
                  f"{r['steady_samples_per_s']:.2f} samples/s)")
        for r in runs[1:]:
            print(f"  speedup {r['workers']} vs {base['workers']} workers: {report['speedup'][str(r['workers'])]:.2f}x")
        print(f"  bytes per sample: {report['bytes_per_sample']:,} ({report['bytes_per_sample'] / 1e6:.2f} MB)")
        print(f"  outputs byte-identical across worker counts: {'yes' if report['identical'] else 'NO'}")
    return 0 if report["identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
