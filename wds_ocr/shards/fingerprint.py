"""What a build records about its inputs: image digests, the source fingerprint, the environment.

``verify`` and ``merge`` recompute these to check a manifest against its source and its parts.
"""

from __future__ import annotations

import hashlib
import json
import platform

import cv2
import numpy as np

from wds_ocr import __version__
from wds_ocr.data.images import read_image_bytes
from wds_ocr.data.sources import SourceSample
from wds_ocr.errors import SampleError

__all__ = ["UNREADABLE", "environment", "image_digest", "source_fingerprint"]

UNREADABLE = "unreadable"  # the image digest recorded for a file that cannot be read


def image_digest(sample: SourceSample, max_bytes: int) -> str:
    """sha256 hex of a sample's image file, or ``UNREADABLE`` (missing, not a regular file, too large)."""
    try:
        return hashlib.sha256(read_image_bytes(sample.image_path, sample.name, max_bytes)).hexdigest()
    except SampleError:
        return UNREADABLE


def environment() -> dict[str, str]:
    import msgpack
    import pyclipper

    return {
        "wds_ocr": __version__,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "opencv": cv2.__version__,
        "msgpack": ".".join(str(v) for v in msgpack.version),
        "pyclipper": getattr(pyclipper, "__version__", "unknown"),
    }


def source_fingerprint(annotation_sha256: str, listing_rejects: list[str], digests: list[str]) -> str:
    """sha256 over the annotation files, the names rejected while listing, and every image's bytes."""
    images = hashlib.sha256("\n".join(digests).encode()).hexdigest()
    body = {"annotation_sha256": annotation_sha256, "listing_rejects": sorted(listing_rejects), "images_sha256": images}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
