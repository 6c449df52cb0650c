"""Would a lossless image encoding pay for itself on the read path? (issue 10)

    python tools/bench_image_codec.py /tmp/wds10/sroie-train     # a shard folder

For every record's stored image (raw uint8, the resized receipt without padding) this encodes it
losslessly with OpenCV (PNG at compression 1 and 6, WebP lossless) and times one-threaded
decoding. A codec is worth it only if decoding produces pixels faster than reading their raw
bytes: the script prints both rates, the bytes each codec saves, and checks every decode is
bit-exact.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import cv2
import numpy as np

from wds_ocr.shards.inspect import read_record
from wds_ocr.shards.manifest import load_manifest

CODECS = {"png-1": (".png", [cv2.IMWRITE_PNG_COMPRESSION, 1]), "png-6": (".png", [cv2.IMWRITE_PNG_COMPRESSION, 6]),
          "webp-lossless": (".webp", [cv2.IMWRITE_WEBP_QUALITY, 101])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("shards", type=Path)
    parser.add_argument("--limit", type=int, default=40, help="records to measure [%(default)s]")
    args = parser.parse_args()
    cv2.setNumThreads(1)
    manifest = load_manifest(args.shards)
    keys = [k for entry in manifest.shards for k in entry.keys][: args.limit]
    images = [np.ascontiguousarray(read_record(args.shards, manifest, k)[0].arrays["image"]) for k in keys]
    raw = sum(image.nbytes for image in images)
    report = {"records": len(images), "raw_image_mb": raw / 1e6}
    for name, (extension, params) in CODECS.items():
        encoded = [cv2.imencode(extension, image, params)[1] for image in images]
        started = time.perf_counter()
        decoded = [cv2.imdecode(data, cv2.IMREAD_UNCHANGED) for data in encoded]
        seconds = time.perf_counter() - started
        exact = all(np.array_equal(a, b) for a, b in zip(images, decoded))
        report[name] = {"encoded_mb": sum(e.nbytes for e in encoded) / 1e6, "ratio": raw / sum(e.nbytes for e in encoded),
                        "decode_mb_per_s_of_pixels": raw / seconds / 1e6, "bit_exact": exact}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
