"""Tests for wds_ocr.model: ResNet backbones, DBNet outputs, backbone weight loading, DBLoss values."""

from __future__ import annotations

import math

import pytest
import torch

from wds_ocr.config import LossConfig, ModelConfig
from wds_ocr.errors import CheckpointError
from wds_ocr.model.dbnet import DBNet
from wds_ocr.model.loss import DBLoss
from wds_ocr.model.resnet import ResNet, load_backbone_weights

torch.set_num_threads(2)

# Backbone-only parameter counts of torchvision's resnet18/34/50 (their totals minus the fc layer).
TORCHVISION_BACKBONE_PARAMETERS = {"resnet18": 11_176_512, "resnet34": 21_284_672, "resnet50": 23_508_032}


def _small_model(backbone: str = "resnet18", neck: int = 32) -> DBNet:
    torch.manual_seed(0)
    return DBNet(ModelConfig(backbone=backbone, neck_channels=neck))


def _random_batch(n: int = 2, size: int = 64, seed: int = 1) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, size, size, generator=generator)
    gt = torch.zeros(n, size, size)
    gt[:, size // 4 : size // 2, size // 8 : size - size // 8] = 1.0
    mask = torch.ones(n, size, size, dtype=torch.uint8)
    mask[:, :4, :4] = 0
    thresh_map = (0.3 + 0.4 * torch.rand(n, size, size, generator=generator)).half()
    thresh_mask = torch.zeros(n, size, size, dtype=torch.uint8)
    thresh_mask[:, size // 4 - 4 : size // 2 + 4, :] = 1
    return images, {"gt": gt, "mask": mask, "thresh_map": thresh_map, "thresh_mask": thresh_mask}


# ---------------------------------------------------------------- backbone


@pytest.mark.parametrize(
    ("name", "channels"),
    [("resnet18", (64, 128, 256, 512)), ("resnet34", (64, 128, 256, 512)), ("resnet50", (256, 512, 1024, 2048))],
)
def test_resnet_features_and_parameter_count(name, channels):
    model = ResNet(name).eval()
    assert model.out_channels == channels
    assert sum(p.numel() for p in model.parameters()) == TORCHVISION_BACKBONE_PARAMETERS[name]
    with torch.no_grad():
        features = model(torch.randn(1, 3, 64, 96))
    assert [tuple(f.shape) for f in features] == [
        (1, c, 64 // s, 96 // s) for c, s in zip(channels, (4, 8, 16, 32))
    ]


def test_resnet_state_dict_uses_torchvision_names():
    state18 = ResNet("resnet18").state_dict()
    # torchvision's resnet18 has 122 entries, 2 of them fc.weight / fc.bias.
    assert len(state18) == 120
    assert "layer1.0.downsample.0.weight" not in state18
    assert tuple(state18["layer2.0.downsample.0.weight"].shape) == (128, 64, 1, 1)
    assert tuple(state18["layer2.0.downsample.1.running_var"].shape) == (128,)
    assert tuple(state18["conv1.weight"].shape) == (64, 3, 7, 7)
    state50 = ResNet("resnet50").state_dict()
    assert tuple(state50["layer1.0.downsample.0.weight"].shape) == (256, 64, 1, 1)
    assert tuple(state50["layer4.2.conv3.weight"].shape) == (2048, 512, 1, 1)
    assert tuple(state50["layer3.0.conv2.weight"].shape) == (256, 256, 3, 3)


def test_unknown_backbone_is_refused():
    with pytest.raises(ValueError, match="unknown backbone 'resnet101'"):
        ResNet("resnet101")


# ---------------------------------------------------------------- backbone weights


def test_load_backbone_weights_round_trip_ignores_fc(tmp_path):
    torch.manual_seed(3)
    source = ResNet("resnet18")
    with torch.no_grad():
        source.bn1.running_mean.uniform_()
    state = {key: value.clone() for key, value in source.state_dict().items()}
    state["fc.weight"] = torch.zeros(1000, 512)
    state["fc.bias"] = torch.zeros(1000)
    path = tmp_path / "resnet18.pth"
    torch.save(state, path)

    torch.manual_seed(4)
    target = ResNet("resnet18")
    load_backbone_weights(target, path)
    loaded = target.state_dict()
    for key, value in source.state_dict().items():
        assert torch.equal(loaded[key], value), key


def test_load_backbone_weights_without_num_batches_tracked(tmp_path):
    source = ResNet("resnet18")
    state = {k: v for k, v in source.state_dict().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "old.pth"
    torch.save(state, path)
    target = ResNet("resnet18")
    load_backbone_weights(target, path)
    assert torch.equal(target.layer3[1].conv2.weight, source.layer3[1].conv2.weight)


def test_load_backbone_weights_rejects_wrong_shape(tmp_path):
    state = dict(ResNet("resnet18").state_dict())
    state["layer2.0.conv1.weight"] = torch.zeros(128, 64, 1, 1)
    path = tmp_path / "wrong_shape.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as caught:
        load_backbone_weights(ResNet("resnet18"), path)
    message = str(caught.value)
    assert str(path) in message
    assert "shape mismatch layer2.0.conv1.weight (file (128, 64, 1, 1), model (128, 64, 3, 3))" in message


def test_load_backbone_weights_rejects_missing_and_unexpected_keys(tmp_path):
    state = dict(ResNet("resnet18").state_dict())
    del state["layer4.1.bn2.running_var"]
    path = tmp_path / "missing.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as caught:
        load_backbone_weights(ResNet("resnet18"), path)
    assert str(path) in str(caught.value)
    assert "missing keys 'layer4.1.bn2.running_var'" in str(caught.value)

    # A resnet50 file given to a resnet18 backbone: both directions reported.
    path50 = tmp_path / "resnet50.pth"
    torch.save(dict(ResNet("resnet50").state_dict()), path50)
    with pytest.raises(CheckpointError) as caught:
        load_backbone_weights(ResNet("resnet18"), path50)
    message = str(caught.value)
    assert f"backbone weights file {path50} does not fit a resnet18 backbone" in message
    assert "unexpected keys 'layer1.0.conv3.weight'" in message


def test_load_backbone_weights_refuses_pickled_objects_and_missing_file(tmp_path):
    path = tmp_path / "pickled.pth"
    torch.save({"conv1.weight": torch.zeros(1), "payload": _NotATensor()}, path)
    with pytest.raises(CheckpointError, match="cannot be read as a tensor state dict"):
        load_backbone_weights(ResNet("resnet18"), path)
    absent = tmp_path / "absent.pth"
    with pytest.raises(CheckpointError, match=f"backbone weights file {absent} does not exist"):
        load_backbone_weights(ResNet("resnet18"), absent)


class _NotATensor:
    """Pickled as a custom class: weights_only loading must refuse it."""


def test_dbnet_loads_backbone_weights_from_config(tmp_path):
    torch.manual_seed(5)
    source = ResNet("resnet18")
    path = tmp_path / "backbone.pth"
    torch.save(dict(source.state_dict()), path)
    model = DBNet(ModelConfig(backbone="resnet18", neck_channels=32, backbone_weights=str(path)))
    assert torch.equal(model.backbone.conv1.weight, source.conv1.weight)


# ---------------------------------------------------------------- DBNet


@pytest.mark.parametrize("backbone", ["resnet18", "resnet34", "resnet50"])
def test_dbnet_output_shapes_and_modes(backbone):
    model = DBNet(ModelConfig(backbone=backbone, neck_channels=64, k=25))
    assert model.k == 25.0
    images = torch.randn(2, 3, 128, 96)
    model.train()
    outputs = model(images)
    assert set(outputs) == {"prob_logits", "thresh_logits"}
    for value in outputs.values():
        assert value.shape == (2, 1, 128, 96)
        assert value.dtype == torch.float32
        assert torch.isfinite(value).all()
    model.eval()
    with torch.no_grad():
        assert set(model(images)) == {"prob_logits"}
        both = model(images, with_thresh=True)
    assert set(both) == {"prob_logits", "thresh_logits"}
    assert both["thresh_logits"].shape == (2, 1, 128, 96)


def test_dbnet_channels_last_matches_contiguous():
    model = _small_model().eval()
    images = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        reference = model(images, with_thresh=True)
        model_cl = model.to(memory_format=torch.channels_last)
        outputs = model_cl(images.contiguous(memory_format=torch.channels_last), with_thresh=True)
    for key in reference:
        assert outputs[key].shape == (2, 1, 128, 128)
        torch.testing.assert_close(outputs[key], reference[key], rtol=1e-4, atol=1e-4)


def test_dbnet_rejects_sides_not_multiple_of_32():
    with pytest.raises(ValueError, match="multiples of 32, got 100x128"):
        _small_model()(torch.randn(1, 3, 100, 128))


# ---------------------------------------------------------------- loss by hand


def _bce(logit: float, target: float) -> float:
    return target * math.log1p(math.exp(-logit)) + (1 - target) * math.log1p(math.exp(logit))


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


PROB = [
    [3.0, -2.0, 0.5, -1.0],
    [1.5, 2.0, -3.0, 0.0],
    [-0.5, 1.0, -4.0, 2.5],
    [0.25, -1.5, 4.0, -2.5],
]
THRESH = [
    [0.0, 1.0, -1.0, 0.5],
    [-0.5, 0.2, 0.0, 2.0],
    [1.5, -2.0, 0.3, -0.3],
    [0.0, 0.8, -1.2, 1.0],
]
GT = [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
MASK = [[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 1, 1]]  # (2, 3) ignored: logit 2.5
THRESH_MAP = [[0.3, 0.5, 0.7, 0.3], [0.4, 0.6, 0.3, 0.3], [0.3, 0.3, 0.3, 0.3], [0.3, 0.3, 0.3, 0.3]]
THRESH_MASK = [[1, 1, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]


def _hand_case(k: float = 50.0) -> tuple[dict, dict, dict[str, float]]:
    cells = [(r, c) for r in range(4) for c in range(4)]
    positives = [_bce(PROB[r][c], 1) for r, c in cells if GT[r][c] and MASK[r][c]]
    negatives = sorted((_bce(PROB[r][c], 0) for r, c in cells if not GT[r][c] and MASK[r][c]), reverse=True)
    # 2 positives -> 3 x 2 = 6 hardest negatives of the 13 valid ones.
    assert len(positives) == 2 and len(negatives) == 13
    bce = (sum(positives) + sum(negatives[:6])) / 8
    l1_terms = [abs(_sigmoid(THRESH[r][c]) - THRESH_MAP[r][c]) for r, c in cells if THRESH_MASK[r][c]]
    l1 = sum(l1_terms) / len(l1_terms)
    binary = {
        (r, c): _sigmoid(k * (_sigmoid(PROB[r][c]) - _sigmoid(THRESH[r][c]))) for r, c in cells
    }
    intersection = sum(binary[rc] * GT[rc[0]][rc[1]] * MASK[rc[0]][rc[1]] for rc in cells)
    union = sum(binary[rc] * MASK[rc[0]][rc[1]] for rc in cells) + sum(
        GT[r][c] * MASK[r][c] for r, c in cells
    ) + 1e-6
    dice = 1 - 2 * intersection / union
    outputs = {
        "prob_logits": torch.tensor(PROB).view(1, 1, 4, 4),
        "thresh_logits": torch.tensor(THRESH).view(1, 1, 4, 4),
    }
    batch = {
        "gt": torch.tensor(GT, dtype=torch.uint8).view(1, 4, 4),
        "mask": torch.tensor(MASK, dtype=torch.uint8).view(1, 4, 4),
        "thresh_map": torch.tensor(THRESH_MAP, dtype=torch.float32).view(1, 4, 4),
        "thresh_mask": torch.tensor(THRESH_MASK, dtype=torch.float32).view(1, 4, 4),
    }
    return outputs, batch, {"bce": bce, "l1": l1, "dice": dice}


def test_loss_matches_hand_computation():
    outputs, batch, expected = _hand_case()
    loss = DBLoss(LossConfig(), k=50.0)
    total, parts = loss(outputs, batch)
    assert parts["bce"].item() == pytest.approx(expected["bce"], abs=1e-6)
    assert parts["l1"].item() == pytest.approx(expected["l1"], abs=1e-6)
    assert parts["dice"].item() == pytest.approx(expected["dice"], abs=1e-6)
    hand_total = 5 * expected["bce"] + 10 * expected["l1"] + 1 * expected["dice"]
    assert total.item() == pytest.approx(hand_total, abs=1e-5)
    assert parts["total"].item() == pytest.approx(hand_total, abs=1e-5)
    assert all(not value.requires_grad for value in parts.values())
    assert total.dtype == torch.float32


def test_loss_weights_and_k_come_from_arguments():
    outputs, batch, expected = _hand_case(k=10.0)
    total, parts = DBLoss(LossConfig(bce_weight=2, l1_weight=0, dice_weight=3, negative_ratio=1), k=10.0)(
        outputs, batch
    )
    cells = [(r, c) for r in range(4) for c in range(4)]
    positives = [_bce(PROB[r][c], 1) for r, c in cells if GT[r][c] and MASK[r][c]]
    negatives = sorted((_bce(PROB[r][c], 0) for r, c in cells if not GT[r][c] and MASK[r][c]), reverse=True)
    bce_ratio1 = (sum(positives) + sum(negatives[:2])) / 4
    assert parts["bce"].item() == pytest.approx(bce_ratio1, abs=1e-6)
    assert parts["dice"].item() == pytest.approx(expected["dice"], abs=1e-6)
    assert total.item() == pytest.approx(2 * bce_ratio1 + 3 * expected["dice"], abs=1e-5)


def test_loss_without_text_mines_hardest_negatives():
    outputs, batch, _ = _hand_case()
    batch["gt"] = torch.zeros(1, 4, 4)
    batch["mask"] = torch.ones(1, 4, 4)
    _, parts = DBLoss(LossConfig(), k=50.0)(outputs, batch)
    # No positives: the cap counts ceil(1% of 16 valid pixels) = 1 positive -> 3 negatives.
    negatives = sorted((_bce(v, 0) for row in PROB for v in row), reverse=True)
    assert parts["bce"].item() == pytest.approx(sum(negatives[:3]) / 3, abs=1e-6)


def test_loss_finite_with_no_text_and_empty_thresh_mask():
    model = _small_model()
    model.train()
    images, batch = _random_batch()
    batch["gt"].zero_()
    batch["thresh_mask"].zero_()
    total, parts = DBLoss(LossConfig(), k=model.k)(model(images), batch)
    assert torch.isfinite(total)
    assert parts["l1"].item() == 0.0
    total.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_loss_finite_for_saturated_logits_and_fully_masked_batch():
    prob = torch.tensor([[[[80.0, -80.0], [-90.0, 95.0]]]], requires_grad=True)
    thresh = torch.tensor([[[[-85.0, 88.0], [70.0, -99.0]]]], requires_grad=True)
    batch = {
        "gt": torch.tensor([[[0.0, 1.0], [1.0, 0.0]]]),
        "mask": torch.zeros(1, 2, 2),
        "thresh_map": torch.full((1, 2, 2), 0.5, dtype=torch.float16),
        "thresh_mask": torch.zeros(1, 2, 2, dtype=torch.uint8),
    }
    loss = DBLoss(LossConfig(), k=1000.0)
    total, _ = loss({"prob_logits": prob, "thresh_logits": thresh}, batch)
    total.backward()
    assert torch.isfinite(total)
    assert torch.isfinite(prob.grad).all() and torch.isfinite(thresh.grad).all()
    batch["mask"] = torch.ones(1, 2, 2)
    total, _ = loss({"prob_logits": prob, "thresh_logits": thresh}, batch)
    assert torch.isfinite(total) and total.item() > 100  # confidently wrong logits cost a lot


def test_loss_reports_missing_inputs():
    outputs, batch, _ = _hand_case()
    loss = DBLoss(LossConfig(), k=50.0)
    with pytest.raises(ValueError, match=r"needs model outputs \['thresh_logits'\]"):
        loss({"prob_logits": outputs["prob_logits"]}, batch)
    del batch["thresh_mask"]
    with pytest.raises(ValueError, match=r"needs batch maps \['thresh_mask'\]"):
        loss(outputs, batch)
    _, batch, _ = _hand_case()
    batch["gt"] = torch.zeros(1, 4, 5)
    with pytest.raises(ValueError, match=r"batch\['gt'\] has shape \(1, 4, 5\)"):
        loss(outputs, batch)


# ---------------------------------------------------------------- precision and training


def test_bf16_autocast_close_to_fp32():
    model = _small_model(neck=64)
    model.train()
    images, batch = _random_batch(size=128)
    loss = DBLoss(LossConfig(), k=model.k)
    with torch.no_grad():
        reference, _ = loss(model(images), batch)
        with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
            outputs = model(images)
            mixed, parts = loss(outputs, batch)
    assert outputs["prob_logits"].dtype == torch.bfloat16
    assert mixed.dtype == torch.float32 and parts["bce"].dtype == torch.float32
    assert mixed.item() == pytest.approx(reference.item(), rel=1e-2)


def test_optimizer_steps_decrease_loss():
    model = _small_model()
    model.train()
    images, batch = _random_batch(seed=7)
    loss = DBLoss(LossConfig(), k=model.k)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    history = []
    for _ in range(6):
        optimizer.zero_grad()
        total, _ = loss(model(images), batch)
        total.backward()
        optimizer.step()
        history.append(total.item())
    assert history[-1] < history[0] * 0.9, history
