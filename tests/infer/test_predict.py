"""Tests for wds_ocr.infer.predict: JSON + overlay per image, boxes in the original (EXIF-applied) frame."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from wds_ocr.config import load_config
from wds_ocr.data.images import read_orientation
from wds_ocr.data.pipeline import process_sample
from wds_ocr.data.sources import list_source
from wds_ocr.data.synth import synthesize
from wds_ocr.errors import ConfigError, SampleError
from wds_ocr.infer.detect import detect, probability_maps
from wds_ocr.infer.predict import predict
from wds_ocr.run.checkpoint import load_model

from conftest import random_checkpoint

torch.set_num_threads(2)

CONFIG = load_config(None, ["transform.size=128", "model.neck_channels=32", "postprocess.box_thresh=0.3"])


@pytest.fixture(scope="module")
def receipts(tmp_path_factory) -> Path:
    """16 receipts; image 15 is stored transposed with EXIF orientation 5 (width and height swap)."""
    root = tmp_path_factory.mktemp("receipts")
    synthesize(root, 16, seed=5, val_fraction=0.0, min_side=200, max_side=320)
    return root


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return random_checkpoint(tmp_path_factory.mktemp("model"), CONFIG)


def _image(receipts: Path, name: str) -> Path:
    return next(receipts.glob(f"images/*/{name}"))


def test_predict_writes_json_and_overlay_in_original_coordinates(receipts, checkpoint, tmp_path):
    tagged = _image(receipts, "synth_0015.jpg")
    plain = _image(receipts, "synth_0000.jpg")
    assert read_orientation(tagged.read_bytes()) == 5
    done: list[tuple[int, int]] = []
    result = predict(checkpoint, [tagged, plain], tmp_path / "out", precision="32", batch_size=2, device="cpu",
                     progress=lambda n, total: done.append((n, total)))
    assert done == [(2, 2)] and result.failed == () and len(result.predictions) == 2

    for prediction, path in zip(result.predictions, (tagged, plain)):
        body = json.loads((tmp_path / "out" / f"{path.stem}.json").read_text())
        assert prediction.json_path == tmp_path / "out" / f"{path.stem}.json"
        assert set(body) == {"image", "width", "height", "polygons"} and body["image"] == path.name
        width, height = body["width"], body["height"]
        assert len(body["polygons"]) == prediction.polygons > 0
        points = np.array([p["points"] for p in body["polygons"]], dtype=np.float64)
        assert points.shape[1:] == (4, 2)
        assert points[..., 0].min() >= 0 and points[..., 0].max() <= width
        assert points[..., 1].min() >= 0 and points[..., 1].max() <= height
        assert all(0.3 <= p["score"] <= 1.0 for p in body["polygons"])
        overlay = cv2.imread(str(tmp_path / "out" / f"{path.stem}.png"))
        assert overlay.shape == (height, width, 3) and prediction.overlay_path.is_file()

        # The same boxes as the live pipeline + evaluation's detect give, in the displayed frame.
        sample = next(s for s in list_source(receipts, path.parent.name, CONFIG.source).samples if s.name == path.name)
        processed = process_sample(sample, CONFIG)
        assert processed.meta.original_size == (width, height)
        model, _ = load_model(checkpoint, torch.device("cpu"))
        prob = probability_maps(model, torch.from_numpy(processed.image[None]), torch.device("cpu"), "32")[0]
        expected = detect(prob, processed.meta.inverse_matrix, processed.meta.original_size, CONFIG.postprocess)
        np.testing.assert_allclose(points, np.round([d.polygon for d in expected], 2))

    tagged_body = json.loads((tmp_path / "out" / "synth_0015.json").read_text())
    # Orientation 5 transposes: the displayed width is the stored height.
    flags = cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION
    stored = cv2.imdecode(np.frombuffer(tagged.read_bytes(), np.uint8), flags)
    assert (tagged_body["width"], tagged_body["height"]) == (stored.shape[0], stored.shape[1])
    assert stored.shape[0] != stored.shape[1]


def test_bad_image_is_a_sample_error_naming_the_file(receipts, checkpoint, tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"this is not an image")
    good = _image(receipts, "synth_0000.jpg")
    with pytest.raises(SampleError, match="broken.jpg"):
        predict(checkpoint, [good, bad], tmp_path / "out", device="cpu")
    result = predict(checkpoint, [bad, good], tmp_path / "out2", device="cpu", on_error="skip", overlay=False)
    assert len(result.failed) == 1 and "broken.jpg" in result.failed[0]
    assert [p.image for p in result.predictions] == [good] and result.predictions[0].overlay_path is None
    assert sorted(p.name for p in (tmp_path / "out2").iterdir()) == ["synth_0000.json"]
    with pytest.raises(SampleError, match="missing.jpg"):
        predict(checkpoint, [tmp_path / "missing.jpg"], tmp_path / "out3", device="cpu")


def test_images_with_the_same_stem_are_refused(receipts, checkpoint, tmp_path):
    good = _image(receipts, "synth_0000.jpg")
    other = tmp_path / "synth_0000.png"
    other.write_bytes(b"")
    with pytest.raises(ConfigError, match="would both write synth_0000.json"):
        predict(checkpoint, [good, other], tmp_path / "out", device="cpu")


def test_predict_takes_its_image_limits_from_the_config(receipts, checkpoint, tmp_path):
    """source.max_pixels and source.max_file_bytes bound predict as they bound a build."""
    good = _image(receipts, "synth_0000.jpg")
    height, width = cv2.imread(str(good)).shape[:2]
    small_pixels = CONFIG.model_copy(update={"source": CONFIG.source.model_copy(update={"max_pixels": width * height - 1})})
    with pytest.raises(SampleError, match=rf"declares {width}x{height} = {width * height} pixels"):
        predict(checkpoint, [good], tmp_path / "a", config=small_pixels, device="cpu")
    size = good.stat().st_size
    small_files = CONFIG.model_copy(update={"source": CONFIG.source.model_copy(update={"max_file_bytes": size - 1})})
    with pytest.raises(SampleError, match=rf"image file is {size} bytes, over the {size - 1}-byte limit"):
        predict(checkpoint, [good], tmp_path / "b", config=small_files, device="cpu")
