"""Shards are plain WebDataset tars: stock tools read them; real receipts round-trip bit for bit."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from wds_ocr.config import load_config
from wds_ocr.shards.build import build_shards
from wds_ocr.shards.inspect import read_record
from wds_ocr.shards.manifest import load_manifest
from wds_ocr.shards.verify import verify_shards

# The README's "read a shard without wds-ocr" recipe: stock webdataset + msgpack + numpy only.
RECIPE = """\
import sys
import msgpack, numpy as np, webdataset as wds

for sample in wds.WebDataset(sys.argv[1], shardshuffle=False):
    header, blob = msgpack.unpackb(sample["msgpack"])
    arrays = {name: np.frombuffer(blob, spec["dtype"], int(np.prod(spec["shape"])), spec["offset"]).reshape(spec["shape"])
              for name, spec in header["arrays"].items()}
    print(sample["__key__"], header["meta"]["name"], arrays["image"].shape, arrays["thresh_map"].dtype,
          arrays["polygons"].shape, len(header["meta"]["word_ids"]))
    break
"""


def test_stock_webdataset_recipe_reads_a_sample(uneven_shards, tmp_path):
    script = tmp_path / "read_shard.py"
    script.write_text(RECIPE)
    assert "wds_ocr" not in RECIPE
    shard = uneven_shards / "shard-000000.tar"
    done = subprocess.run([sys.executable, str(script), str(shard)], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    manifest = load_manifest(uneven_shards)
    record, _ = read_record(uneven_shards, manifest, None)
    vertices = len(record.arrays["polygons"])
    assert vertices > 0
    expected = (f"{record.key} {record.meta.name} (64, 64, 3) float16 ({vertices}, 2) "
                f"{len(record.meta.word_ids)}\n")
    assert done.stdout == expected


@pytest.mark.skipif(shutil.which("tar") is None, reason="no system tar")
def test_system_tar_lists_members_with_fixed_owner_and_mtime(uneven_shards):
    entry = load_manifest(uneven_shards).shards[0]
    listing = subprocess.run(["tar", "tvf", str(uneven_shards / entry.name)], capture_output=True, text=True,
                             check=True, env=dict(os.environ, TZ="UTC"), timeout=60)
    lines = listing.stdout.splitlines()
    assert len(lines) == entry.samples == 4
    for line, key in zip(lines, entry.keys):
        assert re.fullmatch(rf"-rw-r--r-- 0/0 +\d+ 1970-01-01 00:00 {key}\.msgpack", line), line


@pytest.mark.slow
def test_real_receipts_build_and_verify_bit_exact(sroie_root, tmp_path):
    """The 40 SROIE validation receipts (8 stored with an EXIF orientation tag) at the default 640."""
    out = tmp_path / "val"
    result = build_shards(sroie_root, "val", out, load_config(None, []), workers=2)
    counts = result.manifest.counts
    assert counts.as_dict() == {"samples_in": 40, "written": 40, "rejected": 0, "words_skipped": counts.words_skipped,
                      # receipt defaults: 22 of the 2,205 words (1.0%) are under min_text_size 3 at 640
                      "words": {"words": 2205, "in_targets": 2183, "dont_care": 0, "too_small": 22,
                                "shrink_vanished": 0}}
    report = verify_shards(out, against_source=sroie_root)
    assert report.problems == []
    assert (report.samples_checked, report.compared_with_source) == (40, 40)
    manifest = load_manifest(out)
    orientations = {}
    for entry in manifest.shards:
        for key in entry.keys:
            record, _ = read_record(out, manifest, key)
            orientations[record.meta.name] = record.meta.orientation
            assert record.arrays["image"].shape == (640, 640, 3)
            assert np.isfinite(record.arrays["thresh_map"]).all()
    tagged = sorted(name for name, value in orientations.items() if value != 1)
    assert len(orientations) == 40 and len(tagged) == 8, tagged
