"""Starting points and deployment: train --init, model normalization in checkpoints, timm backbones,
the imported PP-OCRv4 detector against onnxruntime on real receipts, and ONNX export parity."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import random_checkpoint
from wds_ocr.cli import cli
from wds_ocr.config import ModelConfig, load_config
from wds_ocr.data.images import decode_canonical, read_image_bytes
from wds_ocr.data.pipeline import IMAGENET, Normalization
from wds_ocr.errors import ConfigError
from wds_ocr.infer.detect import model_normalization, probability_maps
from wds_ocr.loader.device import normalize
from wds_ocr.model.dbnet import DBNet
from wds_ocr.run.checkpoint import init_weights, open_checkpoint

SMALL = ["--set", "loader.workers=0", "--set", "loader.batch_size=4", "--set", "augment.affine=false",
         "--set", "augment.hflip=0", "--set", "train.log_every=1", "--quiet"]
HAS_ONNX = all(importlib.util.find_spec(name) is not None for name in ("onnx", "onnxruntime"))
needs_onnx = pytest.mark.skipif(not HAS_ONNX, reason="onnx and onnxruntime (the ppocr extra) are not installed")


def _start_checkpoint(folder: Path, *overrides: str) -> Path:
    """A model checkpoint (random weights) to --init from, at the shards' record settings (64 px)."""
    folder.mkdir(parents=True, exist_ok=True)
    return random_checkpoint(folder, load_config(None, ["transform.size=64", "shards.max_samples=100", *overrides]))


def _train(shards: Path, out: Path, *args: str):
    return CliRunner().invoke(cli, ["train", "--shards", str(shards), "--out", str(out), "--max-steps", "1",
                                    *SMALL, *args])


# ---------------------------------------------------------------- train --init


def test_init_takes_the_model_and_its_settings_from_the_checkpoint(single_shard, tmp_path):
    start = _start_checkpoint(tmp_path / "start", "model.neck_channels=32")
    result = _train(single_shard, tmp_path / "run", "--init", str(start))
    assert result.exit_code == 0, result.output
    assert "trained 1 step over 0 epochs" in result.output  # 9 samples, batches of 4: 2 steps an epoch
    events = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    init = [e for e in events if e["event"] == "init"]
    expected_keys = len(open_checkpoint(start).body["model"])
    assert init == [{"event": "init", "step": 0, "checkpoint": str(start), "loaded": expected_keys, "missing": [],
                     "unexpected": [], "mismatched": []}]
    last = open_checkpoint(tmp_path / "run" / "last.pt")
    assert last.config.model.neck_channels == 32  # from the checkpoint: no --set was given
    assert last.body["position"]["step"] == 1 and last.body["scheduler"]["step"] == 1  # a fresh schedule
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["initialized_from"] == str(start.resolve()) and run["resumed_from"] is None


def test_init_copies_every_weight_exactly():
    config = load_config(None, ["model.neck_channels=32"])
    torch.manual_seed(1)
    source = DBNet(config.model)
    path_state = {"config": config.model_dump(mode="json"), "model": source.state_dict()}
    torch.manual_seed(2)
    target = DBNet(config.model)
    assert not torch.equal(target.neck.lateral[0].weight, source.neck.lateral[0].weight)

    class Opened:  # what open_checkpoint returns, without a file
        path = Path("start.pt")
        body = path_state

    fit = init_weights(target, Opened(), partial=False)
    assert fit.exact and len(fit.fitting) == len(source.state_dict())
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key


def test_init_that_does_not_fit_is_refused_naming_the_keys(single_shard, tmp_path):
    start = _start_checkpoint(tmp_path / "start", "model.neck_channels=32")
    result = _train(single_shard, tmp_path / "run", "--init", str(start), "--set", "model.neck_channels=64")
    assert result.exit_code == 2
    assert result.output.startswith(
        f"error: --init {start} does not fit the model: shape mismatch neck.lateral.0.weight (file (32, 64, 1, 1), "
        "model (64, 64, 1, 1)), neck.lateral.1.weight (file (32, 128, 1, 1), model (64, 128, 1, 1)),")
    assert "(and " in result.output and "more). Start from a checkpoint of the same model settings" in result.output
    assert "or pass --init-partial to load only the weights that fit" in result.output
    assert not (tmp_path / "run" / "last.pt").exists()


def test_init_partial_loads_what_fits_and_names_the_rest(single_shard, tmp_path):
    start = _start_checkpoint(tmp_path / "start", "model.neck_channels=32")
    result = _train(single_shard, tmp_path / "run", "--init", str(start), "--init-partial",
                    "--set", "model.neck_channels=64")
    assert result.exit_code == 0, result.output
    assert f"--init {start}: loaded " in result.output
    assert "left at their fresh initialization or ignored: shape mismatch neck.lateral.0.weight (file (32, 64, 1, " \
           "1), model (64, 64, 1, 1))" in result.output
    init = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][0]
    state = open_checkpoint(start).body["model"]
    wider = DBNet(load_config(None, ["model.neck_channels=64"]).model).state_dict()
    fitting = [key for key, value in state.items() if value.shape == wider[key].shape]
    # the whole backbone (the same resnet18) fits; of the neck and heads only what does not scale with the width
    assert all(key in fitting for key in state if key.startswith("backbone."))
    assert sorted(key for key in fitting if not key.startswith("backbone.")) == [
        "prob_head.1.num_batches_tracked", "prob_head.4.num_batches_tracked", "prob_head.6.bias",
        "thresh_head.1.num_batches_tracked", "thresh_head.4.num_batches_tracked", "thresh_head.6.bias"]
    assert init["loaded"] == len(fitting) and len(init["mismatched"]) == len(state) - len(fitting)


def test_init_with_resume_is_a_usage_error(single_shard, tmp_path):
    start = _start_checkpoint(tmp_path / "start")
    result = _train(single_shard, tmp_path / "run", "--init", str(start), "--resume", str(start))
    assert result.exit_code == 2
    assert result.output == ("error: --init and --resume cannot be combined: --resume continues a run (its weights, "
                             "optimizer and position), --init starts a new one from a checkpoint's weights\n")


def test_a_frozen_backbone_keeps_its_weights_and_statistics(single_shard, tmp_path):
    start = _start_checkpoint(tmp_path / "start", "model.neck_channels=32")
    result = _train(single_shard, tmp_path / "run", "--init", str(start), "--set", "train.backbone_lr_scale=0")
    assert result.exit_code == 0, result.output
    before = open_checkpoint(start).body["model"]
    after = open_checkpoint(tmp_path / "run" / "last.pt").body["model"]
    changed = sorted({key.split(".")[0] for key in before if not torch.equal(before[key], after[key])})
    assert changed == ["neck", "prob_head", "thresh_head"]  # every backbone tensor, BN statistics too, is as it was
    groups = open_checkpoint(tmp_path / "run" / "last.pt").body["optimizer"]["param_groups"]
    assert [group["lr_scale"] for group in groups] == [0.0, 0.0, 1.0, 1.0]
    assert [group["lr"] for group in groups][:2] == [0.0, 0.0]


def test_frozen_batchnorm_keeps_the_statistics_and_trains_the_rest(single_shard, tmp_path):
    start = _start_checkpoint(tmp_path / "start", "model.neck_channels=32")
    result = _train(single_shard, tmp_path / "run", "--init", str(start), "--set", "train.freeze_batchnorm=true")
    assert result.exit_code == 0, result.output
    before = open_checkpoint(start).body["model"]
    after = open_checkpoint(tmp_path / "run" / "last.pt").body["model"]
    statistics = [key for key in before if key.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert len(statistics) == 3 * 24  # resnet18's 20 BatchNorms and 2 in each head
    assert all(torch.equal(before[key], after[key]) for key in statistics)
    assert not torch.equal(before["prob_head.1.weight"], after["prob_head.1.weight"])  # BN scale still learns
    assert not torch.equal(before["backbone.layer1.0.conv1.weight"], after["backbone.layer1.0.conv1.weight"])


# ---------------------------------------------------------------- normalization


def test_normalization_is_resolved_into_the_checkpoint_and_used(single_shard, tmp_path):
    plain = _train(single_shard, tmp_path / "plain", "--set", "model.neck_channels=32")
    assert plain.exit_code == 0, plain.output
    stored = json.loads(json.dumps(open_checkpoint(tmp_path / "plain" / "last.pt").body["config"]["model"]))
    assert stored["input_mean"] == list(IMAGENET.mean) and stored["input_std"] == list(IMAGENET.std)

    own = _train(single_shard, tmp_path / "own", "--set", "model.neck_channels=32",
                 "--set", "model.input_mean=[0.25, 0.5, 0.75]", "--set", "model.input_std=[0.5, 0.25, 0.125]")
    assert own.exit_code == 0, own.output
    checkpoint = open_checkpoint(tmp_path / "own" / "last.pt")
    model = checkpoint.model(torch.device("cpu"))
    assert model.normalization == Normalization((0.25, 0.5, 0.75), (0.5, 0.25, 0.125))
    assert model_normalization(torch.nn.parallel.DataParallel(model)) == model.normalization
    # evaluation's maps are the model's output on images normalized its way
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8))
    with torch.no_grad():
        expected = torch.sigmoid(model(normalize(images, model.normalization))["prob_logits"][:, 0]).numpy()
        other = torch.sigmoid(model(normalize(images, IMAGENET))["prob_logits"][:, 0]).numpy()
    got = probability_maps(model, images, torch.device("cpu"), "32")
    np.testing.assert_array_equal(got, expected)
    assert np.abs(got - other).max() > 1e-3  # the normalization matters


def test_normalize_applies_the_given_mean_and_std():
    normalization = Normalization((0.5, 0.25, 0.0), (0.5, 0.25, 1.0))
    images = torch.tensor([[[[255, 0, 51]]]], dtype=torch.uint8)
    out = normalize(images, normalization)  # uint8 on the CPU: the table path
    expected = [(1.0 - 0.5) / 0.5, (0.0 - 0.25) / 0.25, (0.2 - 0.0) / 1.0]
    np.testing.assert_allclose(out[0, :, 0, 0].numpy(), expected, rtol=1e-6)
    floats = normalize(images.float(), normalization)  # the elementwise path gives the same bits
    assert torch.equal(floats, out)


def test_model_settings_are_validated():
    with pytest.raises(ConfigError, match=r"model.backbone: unknown backbone; use one of resnet18, resnet34, "
                                          r"resnet50, pplcnetv3, or timm:<model name> \(got 'resnet101'\)"):
        load_config(None, ["model.backbone=resnet101"])
    with pytest.raises(ConfigError, match=r"model.pretrained: must be used with a timm:<name> backbone, not "
                                          r"model.backbone \(resnet18\)"):
        load_config(None, ["model.pretrained=true"])
    with pytest.raises(ConfigError, match=r"model.input_std: every channel's std must be positive"):
        load_config(None, ["model.input_std=[0.2, 0, 0.2]"])


# ---------------------------------------------------------------- timm backbones


def test_timm_backbone_from_a_local_weights_file(tmp_path):
    timm = pytest.importorskip("timm", reason="timm (the timm extra) needs a torchvision built for this torch")
    reference = timm.create_model("resnet18", features_only=True)
    torch.manual_seed(3)
    for parameter in reference.parameters():
        parameter.data.normal_()
    weights = tmp_path / "resnet18.pth"
    torch.save(timm.create_model("resnet18").state_dict() | {k: v for k, v in reference.state_dict().items()}, weights)
    model = DBNet(ModelConfig(backbone="timm:resnet18", neck_channels=32, backbone_weights=str(weights)))
    assert model.backbone.out_channels == (64, 128, 256, 512)
    for key, value in reference.state_dict().items():
        assert torch.equal(model.backbone.body.state_dict()[key], value), key
    assert model.normalization == Normalization((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    outputs = model.eval()(torch.zeros(1, 3, 64, 96))
    assert outputs["prob_logits"].shape == (1, 1, 64, 96)


def test_timm_model_without_the_strides_is_refused():
    pytest.importorskip("timm", reason="timm (the timm extra) needs a torchvision built for this torch")
    with pytest.raises(ConfigError, match=r"model.backbone timm:vit_tiny_patch16_224 gives feature maps at strides "
                                          r"\[16, 16, 16\]; DBNet needs 4, 8, 16 and 32"):
        DBNet(ModelConfig(backbone="timm:vit_tiny_patch16_224"))


def test_without_timm_a_timm_backbone_says_how_to_install_it():
    if importlib.util.find_spec("timm") is not None:
        pytest.skip("timm is installed")
    with pytest.raises(ConfigError, match=r"timm backbones need the timm package .*pip install 'wds-ocr\[timm\]'"):
        DBNet(ModelConfig(backbone="timm:resnet18"))


# ---------------------------------------------------------------- PP-OCRv4 import and export


def _receipts(root: Path, count: int, side: int) -> list[np.ndarray]:
    """``count`` val receipts resized (keeping their shape) to ``side`` on the long side, sides multiples of 32."""
    import cv2

    images = []
    for path in sorted((root / "images" / "val").glob("*.jpg"))[:count]:
        pixels = decode_canonical(read_image_bytes(path, path.name), path.name).pixels
        height, width = pixels.shape[:2]
        scale = side / max(height, width)
        size = (max(32, round(width * scale / 32) * 32), max(32, round(height * scale / 32) * 32))
        images.append(cv2.resize(pixels, size, interpolation=cv2.INTER_AREA))
    return images


@pytest.fixture(scope="module")
def ppocr_checkpoint(tmp_path_factory) -> Path:
    from wds_ocr.model.ppocr import wheel_model_path

    if not HAS_ONNX or wheel_model_path() is None:
        pytest.skip("needs onnx, onnxruntime and the rapidocr-onnxruntime wheel (tools/_env.sh installs them)")
    out = tmp_path_factory.mktemp("ppocr") / "ppocrv4_det.pt"
    result = CliRunner().invoke(cli, ["import-ppocr", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "(252 tensors, 1,195,079 values)" in result.output
    return out


def test_imported_ppocr_detector_matches_onnxruntime_on_real_receipts(ppocr_checkpoint, sroie_root):
    import onnxruntime

    from wds_ocr.model.ppocr import wheel_model_path

    session = onnxruntime.InferenceSession(str(wheel_model_path()), providers=["CPUExecutionProvider"])
    model = open_checkpoint(ppocr_checkpoint).model(torch.device("cpu"))
    # PaddleOCR's normalization: ImageNet's figures on BGR arrays in array order; in RGB order:
    assert model.normalization == Normalization((0.406, 0.456, 0.485), (0.225, 0.224, 0.229))
    mean, std = np.array(model.normalization.mean[::-1]), np.array(model.normalization.std[::-1])  # BGR
    for image in _receipts(sroie_root, 3, 960):
        # the file's input: BGR, normalized, NCHW
        bgr = image[:, :, ::-1].astype(np.float32)
        pixels = ((bgr / 255.0 - mean) / std).astype(np.float32)
        reference = session.run(None, {"x": pixels.transpose(2, 0, 1)[None]})[0][0, 0]
        ours = probability_maps(model, torch.from_numpy(image[None]), torch.device("cpu"), "32")[0]
        assert ours.shape == reference.shape == image.shape[:2]
        assert np.abs(ours - reference).max() < 1e-3
        assert (reference > 0.3).sum() > 10_000  # the receipt has text, and the maps agree on it
        assert ((ours > 0.3) != (reference > 0.3)).sum() <= 10


def test_import_refuses_a_file_that_is_not_the_detector(tmp_path):
    if not HAS_ONNX:
        pytest.skip("needs onnx (the ppocr extra)")
    import onnx
    from onnx import TensorProto, helper

    from wds_ocr.errors import CheckpointError
    from wds_ocr.model.ppocr import import_ppocr

    weight = helper.make_tensor("w", TensorProto.FLOAT, [4, 3, 3, 3], np.zeros(108, np.float32).tolist())
    node = helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], [weight])
    path = tmp_path / "other.onnx"
    onnx.save(helper.make_model(graph), str(path))
    with pytest.raises(CheckpointError, match=rf"ONNX file {path} holds 1 parameter groups \(convolutions, norms, "
                                              r"affines\), the PP-OCRv4 detector 119: not that model"):
        import_ppocr(path)
    text = tmp_path / "notes.onnx"
    text.write_text("not a model")
    with pytest.raises(CheckpointError, match=rf"ONNX file {text} cannot be parsed"):
        import_ppocr(text)


@needs_onnx
def test_export_matches_torch_on_real_receipts(ppocr_checkpoint, sroie_root, tmp_path):
    from wds_ocr.infer.export import OnnxDetector

    out = tmp_path / "model.onnx"
    result = CliRunner().invoke(cli, ["export", "--checkpoint", str(ppocr_checkpoint), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert f"wrote {out} (4.8 MB)" in result.output
    exported = OnnxDetector(out)
    checkpoint = open_checkpoint(ppocr_checkpoint)
    assert exported.config == checkpoint.config
    model = checkpoint.model(torch.device("cpu"))
    for image in _receipts(sroie_root, 2, 800):  # tall and narrow: not the square the file was traced with
        ours = probability_maps(model, torch.from_numpy(image[None]), torch.device("cpu"), "32")[0]
        theirs = exported.probability_maps(image[None])[0]
        assert theirs.shape == image.shape[:2]
        assert np.abs(ours - theirs).max() < 1e-3
        assert ((ours > 0.3) != (theirs > 0.3)).sum() <= 10


@needs_onnx
def test_predict_runs_an_exported_model_like_its_checkpoint(ppocr_checkpoint, sroie_root, tmp_path):
    image = sorted((sroie_root / "images" / "val").glob("*.jpg"))[0]
    runner = CliRunner()
    out = tmp_path / "model.onnx"
    assert runner.invoke(cli, ["export", "--checkpoint", str(ppocr_checkpoint), "--out", str(out)]).exit_code == 0
    settings = ["--set", "transform.size=640", "--no-overlay"]
    by_torch = runner.invoke(cli, ["predict", "--checkpoint", str(ppocr_checkpoint), str(image),
                                   "--out", str(tmp_path / "torch"), *settings])
    by_onnx = runner.invoke(cli, ["predict", "--model", str(out), str(image), "--out", str(tmp_path / "onnx"),
                                  *settings])
    assert by_torch.exit_code == 0 and by_onnx.exit_code == 0, by_torch.output + by_onnx.output
    a = json.loads((tmp_path / "torch" / f"{image.stem}.json").read_text())
    b = json.loads((tmp_path / "onnx" / f"{image.stem}.json").read_text())
    assert len(a["polygons"]) == len(b["polygons"]) > 20
    for left, right in zip(a["polygons"], b["polygons"]):
        assert np.abs(np.array(left["points"]) - np.array(right["points"])).max() <= 0.5
    both = runner.invoke(cli, ["predict", "--model", str(out), "--checkpoint", str(ppocr_checkpoint), str(image),
                               "--out", str(tmp_path / "x")])
    assert both.exit_code == 2 and "error: give exactly one of --checkpoint or --model" in both.output
