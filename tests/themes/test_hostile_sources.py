"""Hostile sources (issue 9, point 1): image bombs and odd files are rejects with their reasons,
refused before anything large is allocated, and the build goes on to its manifest."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from wds_ocr.data.images import decode_canonical, read_image_bytes
from wds_ocr.data.sources import list_source, read_regular_file
from wds_ocr.config import SourceConfig
from wds_ocr.errors import ConfigError, SampleError, SourceError

LIMIT = 40_000_000
BOMB_MB = 16  # nothing in these tests may allocate more than this while refusing a bomb


def small(image_format: str, mode: str = "RGB", side: int = 8) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    if mode != "RGB":
        image = image.convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, image_format)
    return buffer.getvalue()


def jpeg_declaring(width: int, height: int) -> bytes:
    ok, encoded = cv2.imencode(".jpg", np.full((8, 8, 3), 128, np.uint8))
    data = bytearray(encoded.tobytes())
    frame = data.index(b"\xff\xc0")
    data[frame + 5 : frame + 7] = height.to_bytes(2, "big")
    data[frame + 7 : frame + 9] = width.to_bytes(2, "big")
    return bytes(data)


def png_declaring(width: int, height: int, mode: str = "RGB") -> bytes:
    data = bytearray(small("PNG", mode))
    ihdr = data.index(b"IHDR") + 4
    data[ihdr : ihdr + 4] = width.to_bytes(4, "big")
    data[ihdr + 4 : ihdr + 8] = height.to_bytes(4, "big")
    return bytes(data)


def refused(data: bytes, name: str, max_pixels: int = LIMIT) -> tuple[str, float, int]:
    """(message, seconds, peak traced bytes) of decode_canonical refusing ``data``."""
    tracemalloc.start()
    started = time.perf_counter()
    try:
        with pytest.raises(SampleError) as caught:
            decode_canonical(data, name, max_pixels)
        seconds = time.perf_counter() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return str(caught.value), seconds, peak


@pytest.mark.parametrize(
    ("data", "name", "what"),
    [
        (jpeg_declaring(65500, 65500), "bomb.jpg", "JPEG header declares 65500x65500 = 4290250000"),
        (png_declaring(40000, 30000), "bomb.png", "PNG header declares 40000x30000 = 1200000000"),
        (png_declaring(30000, 30000, "P"), "palette.png", "PNG header declares 30000x30000 = 900000000"),
        (png_declaring(30000, 30000, "RGBA"), "alpha.png", "PNG header declares 30000x30000 = 900000000"),
    ],
)
def test_bombs_are_refused_from_the_header_before_decoding(data, name, what):
    message, seconds, peak = refused(data, name)
    assert message == (f"{name}: image too large: its {what} pixels, over the limit of {LIMIT} "
                       "(source.max_pixels); refused before decoding")
    assert len(data) < 2000 and seconds < 0.5 and peak < BOMB_MB << 20


@pytest.mark.parametrize(("image_format", "suffix"), [("TIFF", "tif"), ("BMP", "bmp"), ("WEBP", "webp")])
def test_every_format_honours_the_pixel_limit(image_format, suffix):
    data = small(image_format, side=10)
    message, _, peak = refused(data, f"x.{suffix}", max_pixels=99)
    assert message == (f"x.{suffix}: image too large: its {image_format} header declares 10x10 = 100 pixels, over "
                       "the limit of 99 (source.max_pixels); refused before decoding")
    assert decode_canonical(data, f"x.{suffix}", max_pixels=100).size == (10, 10)


def test_largest_real_receipt_fits_the_default_limit(sroie_root):
    largest = max((sroie_root / "images" / "val").iterdir(), key=lambda p: p.stat().st_size)
    data = read_image_bytes(largest, largest.name)
    width, height = decode_canonical(data, largest.name).size
    assert width * height <= SourceConfig().max_pixels


def test_a_decoder_exception_is_a_reject(monkeypatch):
    def explode(*args, **kwargs):
        raise cv2.error("OpenCV(5.0) imgcodecs: error: (-215:Assertion failed) pixels <= CV_IO_MAX_IMAGE_PIXELS")

    monkeypatch.setattr("wds_ocr.data.images.cv2.imdecode", explode)
    with pytest.raises(SampleError) as caught:
        decode_canonical(small("JPEG"), "boom.jpg")
    assert str(caught.value) == ("boom.jpg: corrupt JPEG: the decoder failed (OpenCV(5.0) imgcodecs: error: "
                                 "(-215:Assertion failed) pixels <= CV_IO_MAX_IMAGE_PIXELS); re-export the image as "
                                 "JPEG or PNG")


def test_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    started = time.perf_counter()
    with pytest.raises(SampleError) as caught:
        read_image_bytes(fifo, "pipe.jpg")
    assert time.perf_counter() - started < 1.0
    assert str(caught.value) == f"pipe.jpg: {fifo} is a FIFO, not a regular file; only regular image files are read"


def test_link_to_a_device_is_refused_without_reading(tmp_path):
    (tmp_path / "dev").symlink_to("/dev")  # a linked folder is followed; its files are checked as files
    link = tmp_path / "dev" / "zero"
    tracemalloc.start()
    try:
        with pytest.raises(SampleError) as caught:
            read_image_bytes(link, "zero.jpg")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20
    assert str(caught.value) == (f"zero.jpg: {link} is a character device, not a regular file; only regular image "
                                 "files are read")


def test_a_link_out_of_its_folder_is_refused_before_anything_is_read(tmp_path):
    """One rule for images, annotation files and shards: a link is followed only within its folder,
    and nothing of what it points at reaches a message."""
    from wds_ocr.errors import ShardFormatError
    from wds_ocr.shards.tario import open_shard

    secret = tmp_path / "private" / "secret.txt"
    secret.parent.mkdir()
    secret.write_bytes(b"TOP-SECRET-PASSWORD\n")
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "leak.jpg").symlink_to(secret)
    with pytest.raises(SampleError) as caught:
        read_image_bytes(folder / "leak.jpg", "leak.jpg")
    assert str(caught.value) == (f"leak.jpg: {folder / 'leak.jpg'} is a symbolic link to {os.path.realpath(secret)}, "
                                 f"outside its folder {os.path.realpath(folder)}; links are followed only within their "
                                 "folder: copy the file in, or link the whole folder")
    assert "TOP-SECRET" not in str(caught.value)
    (folder / "shard-000000.tar").symlink_to(secret)
    with pytest.raises(ShardFormatError, match=r"shard-000000.tar: .* is a symbolic link to .*secret.txt, outside its "):
        open_shard(folder / "shard-000000.tar", "shard-000000.tar")
    with pytest.raises(ValueError, match=r"^is a symbolic link to .*secret.txt, outside its folder"):
        read_regular_file(folder / "leak.jpg", 1 << 20)
    (folder / "inside.jpg").write_bytes(small("JPEG"))
    (folder / "alias.jpg").symlink_to("inside.jpg")  # within the folder: followed
    assert read_image_bytes(folder / "alias.jpg", "alias.jpg") == (folder / "inside.jpg").read_bytes()


def test_link_to_a_regular_file_is_followed(tmp_path):
    target = tmp_path / "real.png"
    target.write_bytes(small("PNG"))
    (tmp_path / "alias.png").symlink_to(target)
    assert read_image_bytes(tmp_path / "alias.png", "alias.png") == target.read_bytes()


def test_file_over_the_read_cap_is_refused_without_reading(tmp_path):
    path = tmp_path / "big.png"
    path.write_bytes(small("PNG", side=64))
    size = path.stat().st_size
    with pytest.raises(SampleError) as caught:
        read_image_bytes(path, "big.png", max_bytes=size - 1)
    assert str(caught.value) == (f"big.png: image file is {size} bytes, over the {size - 1}-byte limit "
                                 f"(source.max_file_bytes): {path}")
    assert read_image_bytes(path, "big.png", max_bytes=size) == path.read_bytes()


def test_annotation_files_are_read_as_bounded_regular_files(tmp_path):
    with pytest.raises(ValueError, match="^is not a regular file$"):
        read_regular_file(Path("/dev/zero"), 1 << 20)
    path = tmp_path / "a.json"
    path.write_bytes(b"x" * 100)
    with pytest.raises(ValueError, match="^is 100 bytes, over the 99-byte limit$"):
        read_regular_file(path, 99)
    root = tmp_path / "src"
    (root / "images" / "train").mkdir(parents=True)
    (root / "jsons").mkdir()
    (root / "jsons" / "train.json").symlink_to("/dev/zero")
    with pytest.raises(SourceError) as caught:
        list_source(root, "train", SourceConfig())
    assert str(caught.value) == (f"{root / 'jsons' / 'train.json'} is a symbolic link to /dev/zero, outside its folder "
                                 f"{os.path.realpath(root / 'jsons')}; links are followed only within their folder: "
                                 "copy the file in, or link the whole folder; annotations must be a regular JSON file")
    (root / "jsons" / "train.json").unlink()
    (root / "jsons" / "train.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(SourceError) as caught:
        list_source(root, "train", SourceConfig())
    assert str(caught.value) == f"{root / 'jsons' / 'train.json'} is nested too deeply to be an annotation file"
    (root / "jsons" / "train.json").write_text('{"images": {"a.jpg": {"words": {"1": {"points": [[' + "7" * 5000
                                               + ', 0], [1, 0], [1, 1]]}}}}}')
    with pytest.raises(SourceError) as caught:
        list_source(root, "train", SourceConfig())
    assert str(caught.value) == (f"{root / 'jsons' / 'train.json'} holds an integer of 5000 digits (at most 24 are "
                                 "read): 777777777777...; no annotation needs such a number")


HOSTILE = {
    "bomb_jpeg.jpg": "image too large: its JPEG header declares 65500x65500 = 4290250000 pixels, over the limit of "
                     "40000000 (source.max_pixels); refused before decoding",
    "bomb_png.png": "image too large: its PNG header declares 40000x30000 = 1200000000 pixels, over the limit of "
                    "40000000 (source.max_pixels); refused before decoding",
    "bomb_palette.png": "image too large: its PNG header declares 30000x30000 = 900000000 pixels, over the limit "
                        "of 40000000 (source.max_pixels); refused before decoding",
}


def test_build_with_bombs_fifos_and_devices_rejects_them_and_finishes(synth_root, tmp_path):
    source = tmp_path / "source"
    shutil.copytree(synth_root, source)
    images = source / "images" / "train"
    (images / "bomb_jpeg.jpg").write_bytes(jpeg_declaring(65500, 65500))
    (images / "bomb_png.png").write_bytes(png_declaring(40000, 30000))
    (images / "bomb_palette.png").write_bytes(png_declaring(30000, 30000, "P"))
    os.mkfifo(images / "pipe.jpg")
    (images / "zero.jpg").symlink_to("/dev/zero")
    (images / "folder.jpg").mkdir()
    annotations = json.loads((source / "jsons" / "train.json").read_text())
    for name in [*HOSTILE, "pipe.jpg", "zero.jpg", "folder.jpg"]:
        annotations["images"][name] = {"words": {}}
    (source / "jsons" / "train.json").write_text(json.dumps(annotations))
    out = tmp_path / "shards"
    # VmHWM is this process's own peak RSS (ru_maxrss would carry the forking pytest's over exec).
    script = (
        "import re, sys\n"
        "from wds_ocr.cli import main\n"
        "try:\n"
        "    main()\n"
        "finally:\n"
        "    peak = re.search(r'VmHWM:\\s+(\\d+) kB', open('/proc/self/status').read()).group(1)\n"
        "    print('maxrss_kb', peak, file=sys.stderr)\n"
    )
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-c", script, "build-shards", str(source), "--split", "train", "--out", str(out),
         "--quiet", "--workers", "1", "--set", "transform.size=64"],  # decoded in this process, measured here
        capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(Path.cwd())},
    )
    seconds = time.perf_counter() - started
    assert result.returncode == 0, result.stderr
    maxrss_mb = int(result.stderr.split("maxrss_kb")[-1].split()[0]) / 1024
    assert maxrss_mb < 800, f"the build peaked at {maxrss_mb:.0f} MB"
    assert seconds < 90
    assert "samples in 15: written 9, rejected 6" in result.stdout
    rejects = {r["name"]: r["reason"] for r in map(json.loads, (out / "rejects.jsonl").read_text().splitlines())
               if r["kind"] == "sample"}
    assert rejects == {
        **HOSTILE,
        "pipe.jpg": f"{images / 'pipe.jpg'} is a FIFO, not a regular file; only regular image files are read",
        "zero.jpg": f"{images / 'zero.jpg'} is a symbolic link to /dev/zero, outside its folder "
                    f"{os.path.realpath(images)}; links are followed only within their folder: copy the file in, or "
                    "link the whole folder",
        "folder.jpg": f"expected an image file but found a directory: {images / 'folder.jpg'}",
    }
    assert (out / "manifest.json").is_file()


def _gif_declaring(width: int, height: int) -> bytes:
    """A 48-byte GIF whose logical screen and image declare ``width`` x ``height`` pixels."""
    screen = b"GIF89a" + width.to_bytes(2, "little") + height.to_bytes(2, "little") + b"\x80\x00\x00"
    palette = b"\x00\x00\x00\xff\xff\xff"
    image = b"\x2c" + b"\x00\x00\x00\x00" + width.to_bytes(2, "little") + height.to_bytes(2, "little") + b"\x00"
    return screen + palette + image + b"\x02\x02\x44\x01\x00\x3b"


@pytest.mark.parametrize("data, format_name", [
    (_gif_declaring(65535, 65535), "GIF"),
    # a PSD header: 8BPS, version 1, 3 channels, 60000 x 60000, 8 bits, RGB
    (b"8BPS\x00\x01" + b"\x00" * 6 + b"\x00\x03" + (60000).to_bytes(4, "big") * 2 + b"\x00\x08\x00\x03"
     + b"\x00" * 16, "PSD"),
])
def test_other_decoders_declaring_a_bomb_are_a_reject(data, format_name):
    """Pillow refuses to open these from their header alone; that is a reject naming the file."""
    with pytest.raises(SampleError) as caught:
        decode_canonical(data, f"bomb.{format_name.lower()}")
    assert str(caught.value).startswith(f"bomb.{format_name.lower()}: unsupported image format")
    assert "supported: JPEG, PNG, WEBP, TIFF, BMP" in str(caught.value)


def test_a_jpeg_of_too_many_scans_is_refused_before_decoding():
    MAX_JPEG_SCANS = SourceConfig().max_jpeg_scans

    buffer = io.BytesIO()
    Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(buffer, "JPEG", progressive=True)
    data = buffer.getvalue()
    first_scan = data.index(b"\xff\xda")
    end = data.rindex(b"\xff\xd9")
    scans = data[first_scan:end]  # every scan of the file, SOS headers and entropy-coded data
    count = scans.count(b"\xff\xda")
    assert count >= 2
    repeated = data[:first_scan] + scans * (MAX_JPEG_SCANS // count + 1) + b"\xff\xd9"
    started = time.perf_counter()
    with pytest.raises(SampleError, match=rf"many.jpg: JPEG with more than {MAX_JPEG_SCANS} scans \(source.max_jpeg_scans\): "
                                          r"decoding costs a "
                                          r"pass over the whole image per scan"):
        decode_canonical(repeated, "many.jpg")
    assert time.perf_counter() - started < 10  # refused from the markers, never decoded
    assert decode_canonical(data, "fine.jpg").pixels.shape == (64, 64, 3)  # an ordinary progressive JPEG
    with pytest.raises(SampleError, match=rf"JPEG with more than {count - 1} scans \(source.max_jpeg_scans\)"):
        decode_canonical(data, "fine.jpg", max_scans=count - 1)  # the setting, lowered


def test_strings_the_files_cannot_hold_are_rejects_and_everything_written_reads_back(tmp_path):
    """Empty, over-long and non-UTF-8 names, word ids and transcriptions: each is a reject or a
    skipped word with its reason, the build writes its manifest and rejects.jsonl, the counts add
    up, and verify (records, rejects and all) passes; a file name on disk that is not UTF-8 too."""
    from wds_ocr.config import load_config
    from wds_ocr.data.synth import synthesize
    from wds_ocr.shards.build import build_shards
    from wds_ocr.shards.rejects import read_rejects
    from wds_ocr.shards.verify import verify_shards

    root = tmp_path / "src"
    synthesize(root, 2, seed=1, val_fraction=0.0, min_side=160, max_side=200)
    annotations = root / "jsons" / "train.json"
    doc = json.loads(annotations.read_text())
    names = sorted(doc["images"])
    words = doc["images"][names[0]]["words"]
    first = sorted(words)[0]
    points = words[first]["points"]
    words["\ud800id"] = {"points": points, "transcription": "ok"}
    words["zz-long-text"] = {"points": points, "transcription": "x" * 70_000}
    words["zz-surrogate"] = {"points": points, "transcription": "bad \udfff text"}
    doc["images"][""] = {"words": {}}
    doc["images"]["n" * 70_000 + ".jpg"] = {"words": {}}
    doc["images"]["\ud83d.jpg"] = {"words": {}}
    annotations.write_text(json.dumps(doc))  # json.dumps escapes the lone surrogates as \ud800 etc.
    image = root / "images" / "train" / names[0]
    odd = os.fsencode(root / "images" / "train") + b"/caf\xe9.jpg"  # Latin-1 bytes: not UTF-8
    with open(odd, "wb") as handle:
        handle.write(image.read_bytes())
    config = load_config(None, ["transform.size=128"])
    result = build_shards(root, "train", tmp_path / "shards", config)
    counts = result.manifest.counts
    assert (counts.samples_in, counts.written, counts.rejected) == (len(names) + 4, len(names), 4)
    reasons = {(r.kind, r.name, r.word_id): r.reason for r in read_rejects(result.rejects_path)}
    assert reasons[("sample", "", None)].startswith("image name '' in ")
    assert reasons[("sample", "n" * 200 + "... (70,004 characters)", None)].startswith(
        "image name of 70,004 characters, over the limit of 1,024 (source.max_name_chars): ")
    assert reasons[("sample", "\\ud83d.jpg", None)] == (
        f"image name \\ud83d.jpg is not valid text: character 0 is '\\ud83d' (a lone surrogate); rename it in UTF-8 "
        f"(in {annotations})")
    assert reasons[("sample", "caf\\udce9.jpg", None)] == f"image has no entry in {annotations}"
    assert reasons[("word", names[0], "\\ud800id")] == (
        "word id \\ud800id is not valid text: character 0 is '\\ud800' (a lone surrogate); rename it in UTF-8")
    assert reasons[("word", names[0], "zz-long-text")].startswith(
        "transcription of 70,000 characters, over the limit of 65,536 (source.max_transcription_chars): xxxx")
    assert reasons[("word", names[0], "zz-surrogate")].startswith("transcription bad \\udfff text is not valid text")
    report = verify_shards(tmp_path / "shards")
    assert report.ok, report.problems


def test_work_per_image_is_bounded_before_it_starts(tmp_path):
    """A polygon of a million points is a skipped word and an image of 10,001 words a reject, each
    decided from the counts, in well under a second of work per entry."""
    MAX_POLYGON_POINTS, MAX_WORDS_PER_IMAGE = SourceConfig().max_polygon_points, SourceConfig().max_words_per_image

    root = tmp_path / "src"
    (root / "images" / "train").mkdir(parents=True)
    (root / "jsons").mkdir()
    for name in ("a.jpg", "b.jpg"):
        (root / "images" / "train" / name).write_bytes(small("JPEG"))
    square = [[0, 0], [4, 0], [4, 4], [0, 4]]
    many = {f"{i:05d}": {"points": square, "transcription": "x"} for i in range(MAX_WORDS_PER_IMAGE + 1)}
    huge = [[float(i % 7), float(i % 5)] for i in range(1_000_000)]
    doc = {"images": {"a.jpg": {"words": {"w1": {"points": huge}, "w2": {"points": square}}},
                      "b.jpg": {"words": many}}}
    (root / "jsons" / "train.json").write_text(json.dumps(doc))
    started = time.perf_counter()
    listing = list_source(root, "train", SourceConfig())
    assert time.perf_counter() - started < 30  # the JSON parse itself; the polygon is never converted
    assert [r.reason for r in listing.rejects] == [
        "10,001 words, over the limit of 10,000 per image (source.max_words_per_image)"]
    (sample,) = listing.samples
    assert [w.word_id for w in sample.words] == ["w2"]
    assert [(s.word_id, s.reason) for s in sample.skips] == [
        ("w1", f"polygon of 1,000,000 points, over the limit of {MAX_POLYGON_POINTS:,} (source.max_polygon_points)")]


def test_an_icdar_file_of_too_many_words_is_a_reject(tmp_path):
    MAX_WORDS_PER_IMAGE = SourceConfig().max_words_per_image

    root = tmp_path / "src"
    (root / "images" / "train").mkdir(parents=True)
    (root / "gts" / "train").mkdir(parents=True)
    (root / "images" / "train" / "a.jpg").write_bytes(small("JPEG"))
    (root / "gts" / "train" / "gt_a.txt").write_text("0,0,4,0,4,4,0,4,x\n" * (MAX_WORDS_PER_IMAGE + 1))
    listing = list_source(root, "train", SourceConfig(format="icdar"))
    assert [(r.name, r.reason) for r in listing.rejects] == [
        ("a.jpg", "gt_a.txt holds 10,001 words, over the limit of 10,000 per image (source.max_words_per_image)")]


def test_the_limits_are_settings_and_the_defaults_keep_every_fingerprint(synth_root, tmp_path):
    """source.max_* lowered in a build: the samples over them are rejects naming the setting, the
    fingerprint changes; at their defaults the record settings do not hold them (earlier builds
    keep their fingerprints)."""
    from wds_ocr.config import load_config
    from wds_ocr.shards.build import build_shards

    assert "max_words_per_image" not in load_config(None, []).record_settings()["source"]
    strict = load_config(None, ["transform.size=64", "source.max_words_per_image=3",
                                "source.max_transcription_chars=4", "source.max_polygon_points=4"])
    assert strict.record_settings()["source"]["max_words_per_image"] == 3
    assert strict.fingerprint() != load_config(None, ["transform.size=64"]).fingerprint()
    result = build_shards(synth_root, "train", tmp_path / "strict", strict)
    reasons = [r.reason for r in result.rejects]
    assert reasons and all("(source.max_words_per_image)" in r or "(source.max_transcription_chars)" in r
                           for r in reasons)
    assert result.manifest.counts.rejected + result.manifest.counts.written == 9
    with pytest.raises(ConfigError, match="source.max_transcription_chars"):
        load_config(None, ["source.max_transcription_chars=70000"])  # more than the record reader takes
