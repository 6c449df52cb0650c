"""Shards are plain WebDataset tars: stock tools read them; real receipts round-trip bit for bit."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from wds_ocr.config import load_config
from wds_ocr.shards.build import build_shards
from wds_ocr.shards.inspect import read_record
from wds_ocr.shards.manifest import load_manifest
from wds_ocr.shards.verify import verify_shards

# The README's "read a shard without wds-ocr" recipe: stock webdataset + msgpack + numpy only, the
# compact record expanded to the full image and maps.
RECIPE = """\
import sys
from pathlib import Path
import msgpack, numpy as np, webdataset as wds

for sample in wds.WebDataset(sys.argv[1], shardshuffle=False):   # e.g. shards/val/shard-000000.tar
    header, blob = msgpack.unpackb(sample["msgpack"])
    a = {name: np.frombuffer(blob, spec["dtype"], int(np.prod(spec["shape"])), spec["offset"]).reshape(spec["shape"])
         for name, spec in header["arrays"].items()}
    meta = header["meta"]
    side, (left, top), (width, height) = meta["side"], meta["offset"], meta["resized_size"]
    image = np.zeros((side, side, 3), np.uint8)                    # the padding is zero
    image[top : top + height, left : left + width] = a["image"]
    planes = np.zeros((4, side, side), np.uint8)                   # gt, mask, thresh_mask, band
    planes[1] = 1                                                  # mask is 1 outside the window
    x, y, w, h = a["map_window"]
    planes[:, y : y + h, x : x + w] = np.unpackbits(a["map_bits"], axis=-1, bitorder="little")[:, :, :w]
    gt, mask, thresh_mask, band = planes
    thresh_map = np.full((side, side), a["thresh_fill"][0], np.float16)
    thresh_map[band == 1] = a["thresh_values"]                     # row-major, as stored
    print(sample["__key__"], meta["name"], image.shape, thresh_map.dtype, int(gt.sum()), a["polygons"].shape)
    break
"""
PRINT_LINE = RECIPE.splitlines()[-2]


def run_recipe(script_text: str, shard: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    script = tmp_path / "read_shard.py"
    script.write_text(script_text)
    return subprocess.run([sys.executable, str(script), str(shard)], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)


def test_stock_webdataset_recipe_reads_a_sample(uneven_shards, tmp_path):
    assert "wds_ocr" not in RECIPE
    shard = uneven_shards / "shard-000000.tar"
    done = run_recipe(RECIPE, shard, tmp_path)
    assert done.returncode == 0, done.stderr
    manifest = load_manifest(uneven_shards)
    record, _ = read_record(uneven_shards, manifest, None)
    vertices = len(record.arrays["polygons"])
    assert vertices > 0
    gt = int(record.expand()["gt"].sum())
    expected = f"{record.key} {record.meta.name} (64, 64, 3) float16 {gt} ({vertices}, 2)\n"
    assert done.stdout == expected


def test_the_recipe_expands_every_array_bit_for_bit(synth_root, tmp_path):
    from conftest import build_small_shards

    folder = build_small_shards(synth_root, tmp_path / "s", size=256, max_samples=100)
    save = PRINT_LINE.split("print(")[0] + 'np.savez(sys.argv[1] + ".npz", image=image, gt=gt, mask=mask, ' \
                                          'thresh_map=thresh_map, thresh_mask=thresh_mask)'
    shard = folder / "shard-000000.tar"
    done = run_recipe(RECIPE.replace(PRINT_LINE, save), shard, tmp_path)
    assert done.returncode == 0, done.stderr
    manifest = load_manifest(folder)
    record, _ = read_record(folder, manifest, manifest.shards[0].keys[0])
    assert record.expand()["thresh_mask"].any() and record.arrays["thresh_values"].size  # maps with text on them
    with np.load(str(shard) + ".npz") as saved:
        for name, array in record.expand().items():
            assert saved[name].dtype == array.dtype and saved[name].tobytes() == array.tobytes(), name


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
    sizes = []
    for entry in manifest.shards:
        for key in entry.keys:
            record, _ = read_record(out, manifest, key)
            orientations[record.meta.name] = record.meta.orientation
            assert record.meta.side == 640 and record.expand()["image"].shape == (640, 640, 3)
            assert np.isfinite(record.arrays["thresh_values"]).all()
            sizes.append(entry.span(entry.keys.index(key))[1] - entry.span(entry.keys.index(key))[0])
    tagged = sorted(name for name, value in orientations.items() if value != 1)
    # the compact records: 0.76 MB a receipt on average here (the full arrays: 3.29 MB), at most 1.32 MB
    assert max(sizes) <= 1_320_000 and sum(sizes) / len(sizes) < 800_000, (max(sizes), sum(sizes) / len(sizes))
    assert len(orientations) == 40 and len(tagged) == 8, tagged
