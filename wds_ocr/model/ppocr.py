"""Import PaddleOCR's PP-OCRv4 mobile text detector (its ONNX file) as a DBNet wds-ocr trains.

The file is the one the ``rapidocr-onnxruntime`` wheel ships (``models/ch_PP-OCRv4_det_infer.onnx``,
Apache-2.0): PP-LCNetV3 backbone (folded for inference, ``model.lcnet``), RSEFPN neck with 96
channels and DB's probability head. The graph holds no threshold head (inference drops it), so
the imported model's ``thresh_head`` starts as a copy of the probability head, BatchNorm
statistics included (a freshly initialized head would start with statistics that do not fit the
neck's features, which matters when fine-tuning keeps BatchNorm statistics frozen), with its last
layer zeroed (a threshold of 0.5 everywhere to begin with); fine-tuning trains it towards DB's
threshold map.

How weights find their modules: the ONNX graph is walked in order and turned into a sequence of
parameter groups (a Conv's weight and bias, a ConvTranspose's weight and the bias added after it,
a BatchNormalization's four tensors, a learnable affine's scalar scale and bias); the torch model
runs once on a small input with hooks that record the same kinds of modules in the order they
run. Both sequences must agree kind by kind and shape by shape, or the import stops naming the
first place they differ; so a file of another architecture is refused, never half loaded.

PaddleOCR feeds BGR images; the stem's input channels are swapped here so the model takes wds-ocr's
RGB records. The normalization PaddleOCR trains this detector with (``lcnet.MEAN`` / ``lcnet.STD``)
travels in the config.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from wds_ocr.config import Config, build_config
from wds_ocr.errors import CheckpointError, ConfigError
from wds_ocr.model.dbnet import DBNet
from wds_ocr.model.lcnet import MEAN, STD, Affine

# The model settings of the imported detector.
PPOCR_MODEL = {"backbone": "pplcnetv3", "neck": "rsefpn", "neck_channels": 96, "k": 50.0,
               "input_mean": list(MEAN), "input_std": list(STD)}
# PaddleOCR's DB post-processing defaults for this detector (its kernels are shrunk by 0.4 in training,
# so its boxes need a larger unclip than wds-ocr's 0.6-shrink targets); a fine-tuning run takes its
# post-processing from its own settings, not from here.
PPOCR_POSTPROCESS = {"thresh": 0.3, "box_thresh": 0.5, "unclip_ratio": 1.6}
WHEEL_PACKAGE = "rapidocr_onnxruntime"
WHEEL_MODEL = Path("models") / "ch_PP-OCRv4_det_infer.onnx"
# The shipped file is 4.7 MB; anything far larger is not this model.
MAX_ONNX_BYTES = 64 << 20
_HOOKED = (nn.Conv2d, nn.ConvTranspose2d, nn.BatchNorm2d, Affine)


@dataclass(frozen=True)
class Group:
    """One module's tensors, in the order ``_assign`` stores them."""

    kind: str  # "conv", "convT", "bn", "affine"
    tensors: tuple[np.ndarray | None, ...]
    where: str  # the ONNX node's output name, for messages


def wheel_model_path() -> Path | None:
    """The detector file inside an installed rapidocr-onnxruntime, without importing the package."""
    spec = importlib.util.find_spec(WHEEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / WHEEL_MODEL
        if candidate.is_file():
            return candidate
    return None


def _onnx() -> Any:
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError as exc:
        raise ConfigError(f"importing an ONNX detector needs the onnx package ({exc}): "
                          "pip install 'wds-ocr[ppocr]'") from None
    return onnx, numpy_helper


def read_groups(path: Path) -> list[Group]:
    """The parameter groups of the graph in ``path``, in graph order."""
    onnx, numpy_helper = _onnx()
    if not path.is_file():
        raise CheckpointError(f"ONNX file {path} does not exist" if not path.exists()
                              else f"ONNX file {path} is not a regular file")
    size = path.stat().st_size
    if size > MAX_ONNX_BYTES:
        raise CheckpointError(f"ONNX file {path} is {size} bytes; the PP-OCRv4 detector is about 4.7 MB "
                              f"(limit {MAX_ONNX_BYTES}): give the ch_PP-OCRv4_det_infer.onnx file")
    try:
        graph = onnx.load_model_from_string(path.read_bytes()).graph
    except Exception as exc:  # noqa: BLE001 - protobuf raises several types for a damaged file
        raise CheckpointError(f"ONNX file {path} cannot be parsed: {exc}") from None
    constants: dict[str, np.ndarray] = {}
    for initializer in graph.initializer:
        constants[initializer.name] = numpy_helper.to_array(initializer)
    nodes = list(graph.node)
    for node in nodes:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].type == onnx.AttributeProto.TENSOR:
            constants[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    consumers: dict[str, list[Any]] = {}
    for node in nodes:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    def constant(name: str) -> np.ndarray | None:
        return constants.get(name)

    def scalar_constant(node: Any) -> tuple[np.ndarray | None, str | None]:
        """(the (1,)-shaped constant input, the other input) of a binary node."""
        for mine, other in ((0, 1), (1, 0)):
            value = constant(node.input[mine])
            if value is not None and value.shape == (1,) and node.input[other] not in constants:
                return value, node.input[other]
        return None, None

    groups: list[Group] = []
    for node in nodes:
        op = node.op_type
        if op == "Conv":
            weight, bias = constant(node.input[1]), constant(node.input[2]) if len(node.input) > 2 else None
            groups.append(Group("conv", (weight, bias), node.output[0]))
        elif op == "ConvTranspose":
            bias = None
            for follower in consumers.get(node.output[0], []):
                if follower.op_type == "Add":
                    other = [constant(name) for name in follower.input if name != node.output[0]]
                    if other and other[0] is not None:
                        bias = other[0].reshape(-1)
            groups.append(Group("convT", (constant(node.input[1]), bias), node.output[0]))
        elif op == "BatchNormalization":
            groups.append(Group("bn", tuple(constant(name) for name in node.input[1:5]), node.output[0]))
        elif op == "Mul":
            scale, _ = scalar_constant(node)
            if scale is None:
                continue
            followers = consumers.get(node.output[0], [])
            bias = None
            if len(followers) == 1 and followers[0].op_type == "Add":
                bias, _ = scalar_constant(followers[0])
            if bias is None:
                raise CheckpointError(f"ONNX file {path}: node {node.output[0]} scales by a learnable scalar "
                                      "without the bias PP-OCR's affine blocks add: not a PP-OCRv4 detector")
            groups.append(Group("affine", (scale, bias), node.output[0]))
    return groups


def _module_order(model: DBNet) -> list[tuple[str, nn.Module]]:
    """The hooked modules in the order an inference forward runs them."""
    names = {module: name for name, module in model.named_modules()}
    order: list[tuple[str, nn.Module]] = []
    handles = [module.register_forward_hook(lambda m, _i, _o: order.append((names[m], m)))
               for module in model.modules() if isinstance(module, _HOOKED)]
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, 3, 64, 64))
    finally:
        for handle in handles:
            handle.remove()
    return order


def _kind(module: nn.Module) -> str:
    if isinstance(module, nn.ConvTranspose2d):
        return "convT"
    if isinstance(module, nn.Conv2d):
        return "conv"
    if isinstance(module, nn.BatchNorm2d):
        return "bn"
    return "affine"


def _targets(name: str, module: nn.Module) -> list[tuple[str, torch.Tensor | None]]:
    if isinstance(module, nn.BatchNorm2d):
        return [(f"{name}.weight", module.weight), (f"{name}.bias", module.bias),
                (f"{name}.running_mean", module.running_mean), (f"{name}.running_var", module.running_var)]
    if isinstance(module, Affine):
        return [(f"{name}.scale", module.scale), (f"{name}.bias", module.bias)]
    return [(f"{name}.weight", module.weight), (f"{name}.bias", module.bias)]


def import_ppocr(path: str | Path, base: Config | None = None) -> tuple[Config, dict[str, torch.Tensor]]:
    """(config, model state dict) of the PP-OCRv4 detector in ``path``. ``base`` supplies every
    setting but the model's (default: the defaults)."""
    path = Path(path)
    groups = read_groups(path)
    data = (base or Config()).model_dump(mode="json")
    data["model"] = dict(PPOCR_MODEL)
    config = build_config(data)
    model = DBNet(config.model, load_weights=False)
    order = _module_order(model)
    if len(order) != len(groups):
        raise CheckpointError(f"ONNX file {path} holds {len(groups)} parameter groups (convolutions, norms, "
                              f"affines), the PP-OCRv4 detector {len(order)}: not that model")
    state = model.state_dict()
    for index, ((name, module), group) in enumerate(zip(order, groups)):
        if _kind(module) != group.kind:
            raise CheckpointError(f"ONNX file {path}: parameter group {index} ({group.where}) is a {group.kind}, "
                                  f"the PP-OCRv4 detector has a {_kind(module)} there ({name}): not that model")
        for (key, target), value in zip(_targets(name, module), group.tensors):
            if target is None and value is None:
                continue
            if target is None or value is None:
                raise CheckpointError(f"ONNX file {path}: {group.where} {'has' if value is not None else 'lacks'} "
                                      f"a tensor where {key} {'has none' if target is None else 'needs one'}")
            tensor = torch.tensor(np.asarray(value, dtype=np.float32)).reshape(-1) \
                if isinstance(module, Affine) else torch.tensor(np.asarray(value, dtype=np.float32))
            if tuple(tensor.shape) != tuple(state[key].shape):
                raise CheckpointError(f"ONNX file {path}: {group.where} has shape {tuple(tensor.shape)} where {key} "
                                      f"needs {tuple(state[key].shape)}: not the PP-OCRv4 detector")
            state[key] = tensor.clone()
    for key in [k for k in state if k.startswith("prob_head.")]:
        state["thresh_head." + key[len("prob_head."):]] = state[key].clone()
    # ... except its last layer, zeroed: the threshold starts at sigmoid(0) = 0.5 everywhere, where
    # its loss has gradient (a copy of the probability logits would start saturated).
    for name in ("weight", "bias"):
        state[f"thresh_head.6.{name}"] = torch.zeros_like(state[f"thresh_head.6.{name}"])
    # PaddleOCR's input is BGR; wds-ocr's records are RGB.
    stem = "backbone.stem.0.weight"
    state[stem] = state[stem].flip(1).contiguous()
    return config, state
