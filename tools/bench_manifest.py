"""What opening a large manifest costs: a valid manifest of SHARDS x PER samples is written (made
up shard entries, no shard files), then parsed (``load_manifest``) and opened by ``ShardStream``
(with its batch plans), each in a fresh process; prints the file size, seconds and peak RSS.

    .venv/bin/python tools/bench_manifest.py --shards 1500 --per 1000
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from wds_ocr.config import Config

MEASURE = """
import resource, sys, time
t = time.perf_counter()
if sys.argv[1] == "parse":
    from wds_ocr.shards.manifest import load_manifest
    count = load_manifest(sys.argv[2]).total_samples
else:
    from wds_ocr.loader.stream import ShardStream
    count = len(ShardStream(sys.argv[2], batch_size=8).plans())
print(f"{sys.argv[1]}: {count} ({'samples' if sys.argv[1] == 'parse' else 'batch plans'}), "
      f"{time.perf_counter() - t:.1f} s, peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
"""


def write_manifest(path: Path, shards: int, per: int) -> None:
    config = Config()
    entries, index, span = [], 0, 10240
    for shard in range(shards):
        keys = [f"{index + i:07d}_img{index + i}" for i in range(per)]
        members_end = per * span
        entries.append({"bytes": -(-(members_end + 1024) // 10240) * 10240, "name": f"shard-{shard:06d}.tar",
                        "samples": per, "keys": keys, "first_key": keys[0], "last_key": keys[-1],
                        "offsets": [i * span for i in range(per)], "members_end": members_end,
                        "digests": ["%016x" % (index + i) for i in range(per)],
                        "checksums": ["%016x" % (index + i) for i in range(per)],
                        "sha256": hashlib.sha256(str(shard).encode()).hexdigest()})
        index += per
    body = {"schema": "wds-ocr/manifest", "schema_version": 4, "checksum": "xxh3_64",
            "fingerprint": config.fingerprint(), "record_settings": config.record_settings(),
            "source": {"annotation_sha256": "0" * 64, "fingerprint": "0" * 64, "format": "json", "listed": index,
                       "listing_rejects": [], "split": "train"},
            "counts": {"samples_in": index, "written": index, "rejected": 0, "words_skipped": 0,
                       "words": {"words": 0, "in_targets": 0, "dont_care": 0, "too_small": 0, "shrink_vanished": 0}},
            "shard_settings": config.shards.model_dump(mode="json"), "environment": {}, "shards": entries}
    path.write_text(json.dumps(body))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shards", type=int, default=1500)
    parser.add_argument("--per", type=int, default=1000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="wds-ocr-manifest-") as tmp:
        path = Path(tmp) / "manifest.json"
        write_manifest(path, args.shards, args.per)
        print(f"{path.stat().st_size / 1e6:.1f} MB manifest, {args.shards * args.per} samples")
        for what in ("parse", "stream"):
            done = subprocess.run([sys.executable, "-c", MEASURE, what, str(path)], capture_output=True, text=True)
            print(done.stdout.strip() if done.returncode == 0 else
                  f"{what}: failed: {(done.stderr.strip().splitlines() or ['(no message)'])[-1]}")


if __name__ == "__main__":
    main()
