"""Tests for wds_ocr.infer.evaluate: shards and the live path give identical scores; map -> original frame."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from wds_ocr.config import Config, PostprocessConfig, load_config
from wds_ocr.data.pipeline import process_sample
from wds_ocr.data.sources import list_source
from wds_ocr.data.synth import synthesize
from wds_ocr.errors import CheckpointError
from wds_ocr.data.geometry import valid_region
from wds_ocr.infer.evaluate import detect, evaluate_shards, evaluate_source
from wds_ocr.eval.postprocess import boxes_from_prob, map_polygons
from wds_ocr.model.dbnet import DBNet
from wds_ocr.shards.build import build_shards
from wds_ocr.run.checkpoint import save_checkpoint

torch.set_num_threads(2)

# A randomly initialised tiny model finds hundreds of (wrong) boxes with box_thresh 0.3: enough
# detections for the comparison of the two paths to mean something.
RANDOM_MODEL = ["model.neck_channels=32", "postprocess.box_thresh=0.3", "loader.workers=0"]


def random_checkpoint(path: Path, config: Config) -> Path:
    torch.manual_seed(0)
    save_checkpoint(path, {"config": config.model_dump(mode="json"), "model": DBNet(config.model).state_dict()})
    return path


@pytest.fixture(scope="module")
def receipts(tmp_path_factory) -> Path:
    """8 synthetic receipts (2 stored with EXIF orientation tags) plus one corrupt file in train."""
    root = tmp_path_factory.mktemp("receipts")
    synthesize(root, 8, seed=3, val_fraction=0.0, min_side=200, max_side=320)
    annotations = root / "jsons" / "train.json"
    doc = json.loads(annotations.read_text())
    doc["images"]["synth_0001b.jpg"] = {"words": {}}
    annotations.write_text(json.dumps(doc))
    (root / "images" / "train" / "synth_0001b.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return root


@pytest.mark.parametrize("pad, crop", [("top_left", "false"), ("center", "false"), ("top_left", "true"),
                                       ("center", "true")])
def test_shards_and_live_path_give_identical_scores_on_synthetic_receipts(receipts, tmp_path, pad, crop):
    config = load_config(None, ["transform.size=128", f"transform.pad={pad}", f"evaluation.crop_to_content={crop}",
                                *RANDOM_MODEL])
    build_shards(receipts, "train", tmp_path / "shards", config)
    checkpoint = random_checkpoint(tmp_path / "random.pt", config)
    for precision in ("32", "bf16-mixed"):
        from_shards = evaluate_shards(checkpoint, tmp_path / "shards", config, precision=precision, batch_size=3,
                                      workers=0, device="cpu")
        live = evaluate_source(checkpoint, receipts, "train", config, precision=precision, batch_size=3, workers=2,
                               device="cpu")
        assert from_shards.score == live.score
        assert from_shards.per_image == live.per_image
        assert from_shards.images == live.images == 7 and from_shards.mode == live.mode == precision
        assert from_shards.score.gt_care > 0 and from_shards.score.det_care > 0
    assert len(live.skipped) == 1 and live.skipped[0].startswith("synth_0001b.jpg: ")
    names = sorted(json.loads((receipts / "jsons" / "train.json").read_text())["images"])
    assert [image.name for image in live.per_image] == [name for name in names if name != "synth_0001b.jpg"]


def test_a_records_ground_truth_is_the_live_pipelines_texts_included(receipts, tmp_path):
    """One ground truth: truth_from_info of a record's SampleInfo equals that of the live sample's
    (info_from_meta), transcriptions included, through both loader modes."""
    from wds_ocr.infer.detect import truth_from_info
    from wds_ocr.infer.evaluate import LiveSamples
    from wds_ocr.loader.loaders import make_loader
    from wds_ocr.loader.stream import ShardStream

    config = load_config(None, ["transform.size=128"])
    build_shards(receipts, "train", tmp_path / "shards", config)
    live = LiveSamples(list_source(receipts, "train", config.source).samples, config)
    expected = {}
    for index in range(len(live)):
        image, truth = live[index]
        if image is not None:
            expected[truth.name] = truth
    assert len(expected) == 7 and sum(len(t.texts) for t in expected.values()) > 20
    for mode in ("threads", "processes"):
        stream = ShardStream(tmp_path / "shards", config.loader, batch_size=3, workers=1, mode=mode)
        seen = 0
        for batch in make_loader(stream):
            for info in batch.info:
                truth, want = truth_from_info(info, texts=True), expected[info.name]
                assert truth.texts == want.texts and any(truth.texts)
                assert truth.original_size == want.original_size
                assert np.array_equal(truth.inverse_matrix, want.inverse_matrix)
                assert [p.tolist() for p in truth.polygons] == [p.tolist() for p in want.polygons]
                assert truth.dont_care.tolist() == want.dont_care.tolist()
                assert truth.left_out.tolist() == want.left_out.tolist()
                assert truth_from_info(info).texts is None  # the IoU metric carries none
                seen += 1
        assert seen == 7


def test_valid_region_recovers_the_resize_plan(receipts):
    for pad in ("top_left", "center"):
        config = load_config(None, ["transform.size=128", f"transform.pad={pad}"])
        samples = [s for s in list_source(receipts, "train", config.source).samples if s.name != "synth_0001b.jpg"]
        assert len(samples) == 7
        for sample in samples:
            meta = process_sample(sample, config).meta
            assert valid_region(meta.inverse_matrix, meta.original_size) == (meta.offset, meta.resized_size)


def test_detect_maps_boxes_to_the_original_image_and_ignores_padding():
    config = PostprocessConfig()
    # An original image of 400 x 200 at size 128: resized to 128 x 64, padded below (top-left)
    # or 32 px above and below (center).
    scale = 128 / 400
    top_left = np.array([[1 / scale, 0, 0], [0, 1 / scale, 0], [0, 0, 1]])
    center = np.array([[1 / scale, 0, 0], [0, 1 / scale, -32 / scale], [0, 0, 1]])
    prob_top = np.zeros((128, 128), dtype=np.float32)
    prob_top[10:30, 20:90] = 0.95
    prob_top[70:100, 10:100] = 0.95  # in the padding: never a box
    prob_center = np.zeros((128, 128), dtype=np.float32)
    prob_center[42:62, 20:90] = 0.95
    prob_center[:30, 10:100] = 0.95  # padding above
    found_top = detect(prob_top, top_left, (400, 200), config)
    found_center = detect(prob_center, center, (400, 200), config)
    assert len(found_top) == len(found_center) == 1
    np.testing.assert_allclose(found_top[0].polygon, found_center[0].polygon, atol=1e-9)
    expected = map_polygons([boxes_from_prob(prob_top[:64], config)[0].polygon], top_left)[0]
    np.testing.assert_allclose(found_top[0].polygon, expected)
    assert found_top[0].polygon[:, 0].min() >= 0 and found_top[0].polygon[:, 0].max() <= 400
    assert found_top[0].polygon[:, 1].min() >= 0 and found_top[0].polygon[:, 1].max() <= 200


def test_evaluating_a_missing_checkpoint_is_a_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        evaluate_shards(tmp_path / "none.pt", tmp_path, device="cpu")


@pytest.fixture(scope="module")
def sroie_val_shards(sroie_root, tmp_path_factory) -> tuple[Path, Config]:
    """The 40 real val receipts as shards at 256 px, built once for this module."""
    config = load_config(None, ["transform.size=256", *RANDOM_MODEL])
    out = tmp_path_factory.mktemp("sroie_val")
    build_shards(sroie_root, "val", out, config, workers=2)
    return out, config


def test_shards_and_live_path_give_identical_scores_on_real_receipts(sroie_root, sroie_val_shards, tmp_path):
    shards, config = sroie_val_shards
    checkpoint = random_checkpoint(tmp_path / "random.pt", config)
    from_shards = evaluate_shards(checkpoint, shards, config, precision="32", batch_size=8, workers=0, device="cpu")
    live = evaluate_source(checkpoint, sroie_root, "val", config, precision="32", batch_size=8, workers=2,
                           device="cpu")
    assert from_shards.images == live.images == 40
    assert from_shards.score == live.score
    assert from_shards.per_image == live.per_image
    assert from_shards.score.gt_care > 2000 and from_shards.score.det_care > 0
    assert (from_shards.score.precision, from_shards.score.recall, from_shards.score.hmean) == \
        (live.score.precision, live.score.recall, live.score.hmean)
    assert from_shards.seconds > 0 and from_shards.images_per_s > 0 and live.skipped == ()


def test_config_from_checkpoint_applies_overrides(tmp_path):
    from wds_ocr.errors import ConfigError
    from wds_ocr.run.checkpoint import config_from_checkpoint

    config = load_config(None, ["transform.size=256", *RANDOM_MODEL])
    checkpoint = random_checkpoint(tmp_path / "random.pt", config)
    assert config_from_checkpoint(checkpoint) == config
    changed = config_from_checkpoint(checkpoint, ["postprocess.box_thresh=0.5"])
    assert changed.postprocess.box_thresh == 0.5 and changed.transform.size == 256
    with pytest.raises(ConfigError, match="postprocess.box_thresh"):
        config_from_checkpoint(checkpoint, ["postprocess.box_thresh=2"])


def test_loader_settings_come_from_the_config_unless_an_option_is_given(receipts, tmp_path, monkeypatch):
    """`evaluate --set loader.batch_size=3` is used; `--batch-size` / `--workers` override only when given."""
    from click.testing import CliRunner

    from wds_ocr.cli import cli
    from wds_ocr.infer import evaluate as evaluate_module

    config = load_config(None, ["transform.size=128", *RANDOM_MODEL])
    build_shards(receipts, "train", tmp_path / "shards", config)
    checkpoint = random_checkpoint(tmp_path / "random.pt", config)
    seen = []
    opened = evaluate_module._open_stream

    def spy(location, loader, runtime):
        seen.append((loader.batch_size, loader.workers))
        return opened(location, loader, runtime)

    monkeypatch.setattr(evaluate_module, "_open_stream", spy)
    base = ["evaluate", "--checkpoint", str(checkpoint), "--shards", str(tmp_path / "shards"), "--quiet"]
    runner = CliRunner()
    for extra, expected in ((["--set", "loader.batch_size=3"], (3, 0)),  # the checkpoint's workers: 0
                            (["--set", "loader.batch_size=3", "--batch-size", "5", "--workers", "1"], (5, 1)),
                            ([], (8, 0))):
        result = runner.invoke(cli, [*base, *extra])
        assert result.exit_code == 0, result.output
        assert seen[-1] == expected, extra


def test_content_window_covers_every_image_of_the_batch_in_whole_strides():
    from wds_ocr.infer.detect import content_window
    from wds_ocr.infer.scoring import ImageTruth

    def truth(offset, size, scale=0.5):  # a record holding an image of ``size`` at ``offset``, resized by ``scale``
        inverse = np.array([[1 / scale, 0, -offset[0] / scale], [0, 1 / scale, -offset[1] / scale], [0, 0, 1.0]])
        return ImageTruth("x", (round(size[0] / scale), round(size[1] / scale)), inverse, (), np.zeros(0, bool),
                          np.zeros(0, np.uint8))

    # top-left padding: a tall image (100 x 250) and a wide one (250 x 90) in 256 x 256 records
    assert content_window([truth((0, 0), (100, 250))], 256) == (slice(0, 256), slice(0, 128))
    assert content_window([truth((0, 0), (100, 250)), truth((0, 0), (250, 90))], 256) == (slice(0, 256),
                                                                                          slice(0, 256))
    assert content_window([truth((0, 0), (40, 70))], 256) == (slice(0, 96), slice(0, 64))
    # centred: the window starts at a multiple of 32 at or before the image and ends inside the record
    assert content_window([truth((78, 0), (100, 250))], 256) == (slice(0, 256), slice(64, 192))
    assert content_window([truth((0, 233), (256, 23))], 256) == (slice(224, 256), slice(0, 256))


def test_crop_to_content_runs_the_model_on_the_window_only(receipts, tmp_path):
    """The cropped run scores exactly what a forward pass over the window gives."""
    from wds_ocr.infer.detect import content_window, probability_maps
    from wds_ocr.infer.scoring import detect as detect_boxes
    from wds_ocr.eval.metric import match_image
    from wds_ocr.loader.stream import ShardStream

    config = load_config(None, ["transform.size=128", "evaluation.crop_to_content=true", *RANDOM_MODEL])
    build_shards(receipts, "train", tmp_path / "shards", config)
    checkpoint = random_checkpoint(tmp_path / "random.pt", config)
    result = evaluate_shards(checkpoint, tmp_path / "shards", config, precision="32", batch_size=1, workers=0,
                             device="cpu")
    model = DBNet(config.model)
    model.load_state_dict(torch.load(checkpoint, weights_only=True)["model"])
    model.eval()
    stream = ShardStream(tmp_path / "shards", batch_size=1)
    stream.set_epoch(0)
    windows = []
    for batch, evaluated in zip(stream, result.per_image):
        from wds_ocr.infer.detect import truth_from_info

        truth = truth_from_info(batch.info[0])
        window = content_window([truth], 128)
        windows.append(window)
        prob = probability_maps(model, batch.images, torch.device("cpu"), "32", window)[0]
        found = detect_boxes(prob, truth.inverse_matrix, truth.original_size, config.postprocess)
        counts = match_image(truth.polygons, truth.dont_care, [d.polygon for d in found])
        assert (evaluated.detections, evaluated.matched) == (len(found), counts.matched)
    assert any(w != (slice(0, 128), slice(0, 128)) for w in windows)  # some records were cropped


@pytest.mark.parametrize("post_workers", [0, 1])
def test_sweep_scores_each_setting_as_a_run_with_that_setting(receipts, tmp_path, post_workers):
    """Each swept setting scores exactly what an evaluation run with that setting alone gives,
    through the inline scorer and through a worker process (the counts travel as msgpack)."""
    from wds_ocr.infer.evaluate import postprocess_grid

    config = load_config(None, ["transform.size=128", f"evaluation.post_workers={post_workers}", *RANDOM_MODEL])
    build_shards(receipts, "train", tmp_path / "shards", config)
    checkpoint = random_checkpoint(tmp_path / "random.pt", config)
    grid = postprocess_grid(config.postprocess, ["thresh=0.3,0.5", "box_thresh=0.3,0.6"])
    assert [(g.thresh, g.box_thresh) for g in grid] == [(0.3, 0.3), (0.3, 0.6), (0.5, 0.3), (0.5, 0.6)]
    swept = evaluate_shards(checkpoint, tmp_path / "shards", config, precision="32", batch_size=3, workers=0,
                            device="cpu", sweep=grid)
    assert [settings for settings, _ in swept.sweep] == grid
    assert swept.sweep[0][1] == swept.score  # the first combination is the run's own setting
    scores = set()
    for settings, score in swept.sweep:
        alone = evaluate_shards(checkpoint, tmp_path / "shards", config.model_copy(update={"postprocess": settings}),
                                precision="32", batch_size=3, workers=0, device="cpu")
        assert score == alone.score, settings
        scores.add((score.matched, score.det_care))
    assert len(scores) > 1  # the settings do change the result


def test_sweep_grid_refuses_unknown_fields_bad_values_and_too_many_combinations():
    from wds_ocr.infer.evaluate import postprocess_grid

    base = PostprocessConfig()
    with pytest.raises(ValueError, match=r"--sweep 'mode=db': expected FIELD=V1,V2,\.\.\. with FIELD one of thresh, "
                                         r"box_thresh, unclip_ratio, min_size"):
        postprocess_grid(base, ["mode=db"])
    with pytest.raises(ValueError, match=r"--sweep 'thresh=0.3,high': the values must be numbers"):
        postprocess_grid(base, ["thresh=0.3,high"])
    with pytest.raises(ValueError, match=r"--sweep: postprocess.thresh=1.5: Input should be less than 1"):
        postprocess_grid(base, ["postprocess.thresh=0.3,1.5"])
    with pytest.raises(ValueError, match=r"thresh is given twice"):
        postprocess_grid(base, ["thresh=0.3", "thresh=0.5"])
    many = ",".join(str(0.01 * i) for i in range(1, 90))
    with pytest.raises(ValueError, match=r"--sweep: 267 combinations; at most 256"):
        postprocess_grid(base, [f"thresh={many}", "unclip_ratio=1.5,2,2.5"])
    assert [g.unclip_ratio for g in postprocess_grid(base, ["unclip_ratio=1.2, 1.5"])] == [1.2, 1.5]
