"""Reading shards from an S3 API server: wds-ocr's signed range reads beside boto3's get_object.

    .venv/bin/python tools/bench_s3.py SHARDS [--rounds 3]

Starts moto's S3 server on 127.0.0.1 (a process of its own), uploads SHARDS (a shard folder) to a
bucket, and then, in alternating rounds on the same objects:
- every member's byte range read once by ``storage.s3.S3Reader`` (HttpReader + SigV4 signing),
- the same ranges read by boto3's ``get_object(Range=...)``,
- one epoch of ``ShardStream("s3://...")`` through ``make_loader`` (threads), and one of the local
  folder, for scale.
Also 512-byte ranges (one per member: the per-request cost of each client). With ``--build
SOURCE``: ``build-shards`` of SOURCE's ``--split`` into a folder and into the bucket, alternating
(``--build-set`` settings, e.g. ``transform.size=1600 shards.max_samples=16``), wall time of each.
Prints ms per ranged read, MB/s and the ratios. The server is local, so the figures measure the
clients' own cost per request, not a network.
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

from wds_ocr.loader.loaders import make_loader
from wds_ocr.loader.stream import ShardStream
from wds_ocr.shards.manifest import load_manifest
from wds_ocr.storage.s3 import S3Reader, S3Url


def _server() -> tuple[subprocess.Popen, str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return process, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.1)
    process.kill()
    raise SystemExit("moto's server did not start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("shards", type=Path)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--build", type=Path, help="also time build-shards of this source: folder vs bucket")
    parser.add_argument("--split", default="train")
    parser.add_argument("--build-set", nargs="*", default=[], help="settings of those builds (section.field=value)")
    args = parser.parse_args()
    process, endpoint = _server()
    os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                      AWS_DEFAULT_REGION="us-east-1")
    try:
        import boto3

        client = boto3.client("s3")
        client.create_bucket(Bucket="bench")
        for path in sorted(args.shards.iterdir()):
            if path.is_file() and not path.name.startswith("."):
                client.upload_file(str(path), "bench", f"set/{path.name}")
        manifest = load_manifest(args.shards)
        ranges = [(e.name, *e.span(i)) for e in manifest.shards for i in range(e.samples)]
        total = sum(stop - start for _, start, stop in ranges)
        reader = S3Reader(S3Url.parse("s3://bench/set"))
        rows: dict[str, list[float]] = {"S3Reader, 512-byte ranges": [], "boto3 get_object, 512-byte ranges": [],
                                        "S3Reader (signed HTTP range)": [], "boto3 get_object(Range)": [],
                                        "ShardStream s3:// epoch (threads, 2)": [],
                                        "ShardStream local folder epoch (threads, 2)": []}
        for _ in range(args.rounds):
            started = time.perf_counter()
            for name, start, _stop in ranges:
                reader.read(name, start, start + 512)
            rows["S3Reader, 512-byte ranges"].append(time.perf_counter() - started)
            started = time.perf_counter()
            for name, start, _stop in ranges:
                client.get_object(Bucket="bench", Key=f"set/{name}", Range=f"bytes={start}-{start + 511}")["Body"].read()
            rows["boto3 get_object, 512-byte ranges"].append(time.perf_counter() - started)
            started = time.perf_counter()
            for name, start, stop in ranges:
                reader.read(name, start, stop)
            rows["S3Reader (signed HTTP range)"].append(time.perf_counter() - started)
            started = time.perf_counter()
            for name, start, stop in ranges:
                client.get_object(Bucket="bench", Key=f"set/{name}", Range=f"bytes={start}-{stop - 1}")["Body"].read()
            rows["boto3 get_object(Range)"].append(time.perf_counter() - started)
            for label, location in (("ShardStream s3:// epoch (threads, 2)", "s3://bench/set"),
                                    ("ShardStream local folder epoch (threads, 2)", str(args.shards))):
                stream = ShardStream(location, batch_size=8)
                started = time.perf_counter()
                for _batch in make_loader(stream, 2, mode="threads"):
                    pass
                rows[label].append(time.perf_counter() - started)
        builds = _builds(args) if args.build else []
    finally:
        process.terminate()
        process.wait(10)
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d')}; "
          f"{len(ranges)} members, {total / 1e6:.1f} MB, {args.rounds} rounds (median)")
    medians = {label: sorted(times)[len(times) // 2] for label, times in rows.items()}
    for label, seconds in medians.items():
        moved = len(ranges) * 512 if "512" in label else total
        print(f"{label:46s} {seconds:7.3f} s  {1000 * seconds / len(ranges):6.2f} ms/request  "
              f"{moved / seconds / 1e6:7.1f} MB/s")
    print(f"boto3 / S3Reader time, 512-byte ranges: "
          f"{medians['boto3 get_object, 512-byte ranges'] / medians['S3Reader, 512-byte ranges']:.2f}x")
    print(f"boto3 / S3Reader time: {medians['boto3 get_object(Range)'] / medians['S3Reader (signed HTTP range)']:.2f}x")
    for line in builds:
        print(line)


def _builds(args: argparse.Namespace) -> list[str]:
    """build-shards into a folder and into the bucket, alternating; one line per build."""
    import shutil
    import tempfile

    from wds_ocr.config import load_config
    from wds_ocr.shards.bucket import build_to_bucket
    from wds_ocr.shards.build import build_shards
    from wds_ocr.storage.s3 import S3Url

    config = load_config(None, args.build_set)
    lines = []
    for round_ in range(args.rounds):
        with tempfile.TemporaryDirectory(prefix="wds-ocr-bench-s3-") as tmp:
            started = time.perf_counter()
            result = build_shards(args.build, args.split, Path(tmp) / "folder", config, workers=2)
            folder_s = time.perf_counter() - started
            size = sum(e.bytes for e in result.manifest.shards)
            started = time.perf_counter()
            bucket = build_to_bucket(args.build, args.split, S3Url.parse(f"s3://bench/build{round_}"), config,
                                     workers=2, staging=Path(tmp) / "staging")
            bucket_s = time.perf_counter() - started
            shutil.rmtree(Path(tmp) / "staging", ignore_errors=True)
        lines.append(f"build round {round_ + 1}: {len(result.manifest.shards)} shards, {size / 1e6:.1f} MB; folder "
                     f"{folder_s:.2f} s, bucket {bucket_s:.2f} s ({bucket.uploaded} uploaded); the bucket adds "
                     f"{bucket_s - folder_s:.2f} s")
    return lines


if __name__ == "__main__":
    main()
