"""Tests for wds_ocr.data.synth: layout, determinism, exact quads, EXIF orientations, refusals."""

from __future__ import annotations

import json
import re
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from wds_ocr.data.orientation import displayed_size, orient_array
from wds_ocr.data.synth import SynthSummary, synthesize

N_ALL_ORIENTATIONS = 28  # tagged images are 3, 7, ..., 27: seven of them, orientations 2..8


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, SynthSummary]:
    root = tmp_path_factory.mktemp("synth") / "receipts"
    return root, synthesize(root, N_ALL_ORIENTATIONS, seed=3)


def _annotations(root: Path) -> dict[str, dict[str, dict]]:
    """split -> image name -> words, read from the json files."""
    return {split: json.loads((root / "jsons" / f"{split}.json").read_text())["images"] for split in ("train", "val")}


def _displayed(path: Path, mode: str = "L") -> tuple[np.ndarray, int]:
    """The image as a viewer honouring the EXIF tag shows it, and the tag (1 when absent)."""
    with Image.open(path) as image:
        orientation = image.getexif().get(0x0112, 1)
        stored = np.asarray(image.convert(mode))
    return orient_array(stored, orientation), orientation


def _quads(words: dict[str, dict]) -> list[np.ndarray]:
    return [np.asarray(word["points"], dtype=np.float64) for word in words.values()]


def _fill(shape: tuple[int, int], quads: list[np.ndarray]) -> np.ndarray:
    mask = np.zeros(shape, dtype=np.uint8)
    cv2.fillPoly(mask, [np.round(quad).astype(np.int32) for quad in quads], 1)
    return mask.astype(bool)


def _paper_region(shape: tuple[int, int], quads: list[np.ndarray]) -> np.ndarray:
    """Pixels inside the convex hull of all words but at least 2 px away from every word."""
    hull = np.zeros(shape, dtype=np.uint8)
    points = np.round(np.vstack(quads)).astype(np.int32)
    cv2.fillConvexPoly(hull, cv2.convexHull(points), 1)
    near_words = cv2.dilate(_fill(shape, quads).astype(np.uint8), np.ones((5, 5), np.uint8))
    return (hull > 0) & (near_words == 0)


def _all_files(root: Path) -> dict[str, bytes]:
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


def test_counts_split_sizes_and_names(dataset):
    root, summary = dataset
    annotations = _annotations(root)
    assert summary.root == root
    assert summary.counts == {"train": 21, "val": 7}
    assert summary.exif_tagged == 7
    names = sorted(list(annotations["train"]) + list(annotations["val"]))
    assert names == [f"synth_{index:04d}.jpg" for index in range(N_ALL_ORIENTATIONS)]
    for split in ("train", "val"):
        assert sorted(p.name for p in (root / "images" / split).iterdir()) == sorted(annotations[split])
    assert summary.words == sum(len(entry["words"]) for split in annotations.values() for entry in split.values())
    assert sorted(p.name for p in (root / "jsons").iterdir()) == ["train.json", "val.json"]


def test_json_is_sorted_indented_with_trailing_newline(dataset):
    root, _ = dataset
    for split in ("train", "val"):
        text = (root / "jsons" / f"{split}.json").read_text()
        assert text == json.dumps(json.loads(text), sort_keys=True, indent=1) + "\n"
        for entry in json.loads(text)["images"].values():
            keys = list(entry["words"])
            assert keys == [f"{number:04d}" for number in range(1, len(keys) + 1)]


@pytest.mark.parametrize(("n", "val_fraction", "expected"), [
    (1, 0.25, {"train": 1, "val": 0}),
    (2, 0.25, {"train": 1, "val": 1}),
    (3, 0.0, {"train": 2, "val": 1}),
    (7, 0.25, {"train": 5, "val": 2}),
    (6, 0.5, {"train": 3, "val": 3}),
])
def test_split_sizes(tmp_path, n, val_fraction, expected):
    summary = synthesize(tmp_path / "d", n, seed=0, val_fraction=val_fraction, min_side=160, max_side=240)
    assert summary.counts == expected
    annotations = _annotations(tmp_path / "d")
    assert {split: len(images) for split, images in annotations.items()} == expected


def test_same_seed_gives_identical_bytes_and_other_seed_differs(tmp_path):
    first = synthesize(tmp_path / "a", 6, seed=11, min_side=200, max_side=400)
    second = synthesize(tmp_path / "b", 6, seed=11, min_side=200, max_side=400)
    other = synthesize(tmp_path / "c", 6, seed=12, min_side=200, max_side=400)
    files_a, files_b, files_c = (_all_files(tmp_path / name) for name in ("a", "b", "c"))
    assert len(files_a) == 6 + 2
    assert files_a == files_b
    assert (first.counts, first.words, first.exif_tagged) == (second.counts, second.words, second.exif_tagged)
    assert other.counts == first.counts
    images_a = {Path(name).name: data for name, data in files_a.items() if name.endswith(".jpg")}
    images_c = {Path(name).name: data for name, data in files_c.items() if name.endswith(".jpg")}
    assert images_a.keys() == images_c.keys()
    for name in images_a:
        assert images_a[name] != images_c[name], name
    assert files_a["jsons/train.json"] != files_c["jsons/train.json"]
    assert not [name for name in files_a if name.endswith(".tmp")]


def test_image_content_does_not_depend_on_n(tmp_path):
    synthesize(tmp_path / "few", 2, seed=5, val_fraction=0.0, min_side=200, max_side=300)
    synthesize(tmp_path / "more", 5, seed=5, val_fraction=0.0, min_side=200, max_side=300)
    few = {Path(name).name: data for name, data in _all_files(tmp_path / "few").items() if name.endswith(".jpg")}
    more = {Path(name).name: data for name, data in _all_files(tmp_path / "more").items() if name.endswith(".jpg")}
    assert {name: more[name] for name in few} == few


def test_pages_are_portrait_within_limits_and_polygons_inside(dataset):
    root, _ = dataset
    for split, images in _annotations(root).items():
        for name, entry in images.items():
            with Image.open(root / "images" / split / name) as image:
                width, height = displayed_size(*image.size, image.getexif().get(0x0112, 1))
                assert image.format == "JPEG" and image.mode == "RGB"
            assert 320 <= width <= height <= 960, (name, width, height)
            assert entry["words"], name
            for word in entry["words"].values():
                points = np.asarray(word["points"], dtype=np.float64)
                assert points.shape == (4, 2)
                assert (points[:, 0] >= 0).all() and (points[:, 0] <= width).all(), (name, word)
                assert (points[:, 1] >= 0).all() and (points[:, 1] <= height).all(), (name, word)
                assert word["transcription"]


def test_word_heights_and_dont_care_share(dataset):
    root, _ = dataset
    images = [entry for split in _annotations(root).values() for entry in split.values()]
    words = [word for entry in images for word in entry["words"].values()]
    heights = np.array([np.linalg.norm(np.subtract(w["points"][3], w["points"][0])) for w in words])
    assert ((heights >= 14) & (heights <= 40)).mean() > 0.9
    assert 0.05 < np.mean([w["transcription"] == "###" for w in words]) < 0.15


def test_quads_contain_the_ink_in_the_displayed_frame(dataset):
    """Every quad is clearly darker than the paper; outside the quads the paper holds no ink."""
    root, _ = dataset
    for split, images in _annotations(root).items():
        for name, entry in images.items():
            gray, _ = _displayed(root / "images" / split / name)
            gray = gray.astype(np.float32)
            quads = _quads(entry["words"])
            paper = _paper_region(gray.shape, quads)
            paper_level = float(np.median(gray[paper]))
            assert paper_level > 190, name
            # Ink left outside the quads would be unannotated text: nothing there is ink-dark.
            assert (gray[paper] < paper_level - 40).mean() < 1e-4, name
            for word, quad in zip(entry["words"].values(), quads):
                darkening = paper_level - float(gray[_fill(gray.shape, [quad])].mean())
                least = 12 if word["transcription"] == "###" else 30
                assert darkening > least, (name, word, darkening)


def test_every_orientation_appears_and_stored_pixels_are_turned(dataset):
    root, _ = dataset
    seen = {}
    for split, images in _annotations(root).items():
        for name in images:
            with Image.open(root / "images" / split / name) as image:
                exif = image.getexif()
                seen[name] = exif.get(0x0112, 1)
                if seen[name] == 1:
                    assert 0x0112 not in exif, name
    tagged = {name: o for name, o in seen.items() if o != 1}
    assert sorted(tagged.values()) == [2, 3, 4, 5, 6, 7, 8]
    assert sorted(tagged) == [f"synth_{index:04d}.jpg" for index in range(3, N_ALL_ORIENTATIONS, 4)]


def test_refuses_n_below_one(tmp_path):
    with pytest.raises(ValueError, match=re.escape("synthesize: n must be at least 1 image, got 0")):
        synthesize(tmp_path / "d", 0, seed=0)
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("existing", ["images", "jsons"])
def test_refuses_a_folder_that_already_holds_a_dataset(tmp_path, existing):
    (tmp_path / existing).mkdir()
    (tmp_path / existing / "keep.txt").write_text("old")
    message = (
        f"synthesize: {tmp_path} already holds a dataset ({existing} present); "
        "choose a new or empty folder, or delete the old data first"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        synthesize(tmp_path, 2, seed=0)
    assert sorted(p.name for p in tmp_path.rglob("*")) == sorted([existing, "keep.txt"])


def test_refuses_rerun_into_the_same_folder(tmp_path):
    synthesize(tmp_path, 1, seed=0, min_side=160, max_side=200)
    before = _all_files(tmp_path)
    with pytest.raises(ValueError, match=re.escape("(images and jsons present)")):
        synthesize(tmp_path, 1, seed=1, min_side=160, max_side=200)
    assert _all_files(tmp_path) == before


def test_refuses_bad_sides_and_fraction(tmp_path):
    with pytest.raises(ValueError, match=re.escape("need 160 <= min_side <= max_side, got min_side=500, max_side=400")):
        synthesize(tmp_path / "d", 2, seed=0, min_side=500, max_side=400)
    with pytest.raises(ValueError, match=re.escape("val_fraction must be in [0, 1), got 1.0")):
        synthesize(tmp_path / "d", 2, seed=0, val_fraction=1.0)
