"""Export a checkpoint to ONNX for deployment, and run such a file.

The exported graph takes what a decoder gives and returns what post-processing needs:

    input  "image"        uint8 (N, H, W, 3) RGB, H and W multiples of 32 (any size: dynamic axes)
    output "probability"  float32 (N, 1, H, W), the text probability per pixel

Normalization (the model's own mean/std) and the sigmoid are inside the graph, so a deployment
needs no knowledge of either. The file's metadata (``wds_ocr.config``) holds the checkpoint's
settings as JSON, so ``wds-ocr predict --model FILE.onnx`` resizes, pads and post-processes exactly
as with the checkpoint. Export uses torch's TorchScript-based exporter (``dynamo=False``: no extra
packages); the check that a file matches its checkpoint runs it with onnxruntime (``ppocr`` extra).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from wds_ocr import jsonio
from wds_ocr.config import Config, build_config, recorded
from wds_ocr.errors import CheckpointError, ConfigError
from wds_ocr.model.dbnet import DBNet
from wds_ocr.run.checkpoint import Checkpoint, open_checkpoint

INPUT_NAME = "image"
OUTPUT_NAME = "probability"
CONFIG_KEY = "wds_ocr.config"
OPSET = 17
# A detector exported by wds-ocr is a few MB to a few hundred; far larger files are refused unread.
MAX_ONNX_BYTES = 1 << 30
# The metadata JSON is a few kB.
MAX_CONFIG_CHARS = 1 << 20


class ProbabilityModel(nn.Module):
    """uint8 NHWC RGB in, float32 probability (N, 1, H, W) out; normalization inside."""

    def __init__(self, model: DBNet):
        super().__init__()
        self.model = model
        normalization = model.normalization
        self.register_buffer("mean", torch.tensor(normalization.mean, dtype=torch.float32).view(1, 3, 1, 1) * 255.0)
        self.register_buffer("inv_std", 1.0 / (torch.tensor(normalization.std, dtype=torch.float32)
                                               .view(1, 3, 1, 1) * 255.0))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        pixels = (image.permute(0, 3, 1, 2).to(torch.float32) - self.mean) * self.inv_std
        return torch.sigmoid(self.model(pixels)["prob_logits"].float())


def export_onnx(checkpoint: str | Path | Checkpoint, out: str | Path, sample_size: int = 320) -> Path:
    """Write ``checkpoint``'s detector to ``out`` as ONNX (see the module docstring)."""
    checkpoint = open_checkpoint(checkpoint)
    out = Path(out)
    model = checkpoint.model(torch.device("cpu")).to(memory_format=torch.contiguous_format)
    wrapper = ProbabilityModel(model).eval()
    sample = torch.zeros(1, sample_size, sample_size, 3, dtype=torch.uint8)
    out.parent.mkdir(parents=True, exist_ok=True)
    temporary = out.with_name(f".{out.name}.tmp")
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # The model's input checks are Python conditions on sizes; traced once they are constants,
            # which is what they are for any input the file accepts (sides that are multiples of 32).
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(wrapper, (sample,), str(temporary), dynamo=False, opset_version=OPSET,
                              input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              dynamic_axes={INPUT_NAME: {0: "batch", 1: "height", 2: "width"},
                                            OUTPUT_NAME: {0: "batch", 2: "height", 3: "width"}})
        _add_config(temporary, checkpoint.config)
        temporary.replace(out)
    finally:
        temporary.unlink(missing_ok=True)
    return out


def _onnx() -> Any:
    try:
        import onnx
    except ImportError as exc:
        raise ConfigError(f"ONNX files need the onnx package ({exc}): pip install 'wds-ocr[ppocr]'") from None
    return onnx


def _add_config(path: Path, config: Config) -> None:
    onnx = _onnx()
    model = onnx.load(str(path))
    entry = model.metadata_props.add()
    entry.key, entry.value = CONFIG_KEY, json.dumps(config.model_dump(mode="json"), sort_keys=True)
    onnx.save(model, str(path))


class OnnxDetector:
    """An exported detector run by onnxruntime: ``probability_maps(images)`` like the torch path."""

    def __init__(self, path: str | Path, threads: int | None = None):
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"ONNX model {path} does not exist" if not path.exists()
                                  else f"ONNX model {path} is not a regular file")
        if path.stat().st_size > MAX_ONNX_BYTES:
            raise CheckpointError(f"ONNX model {path} is larger than {MAX_ONNX_BYTES} bytes: not a wds-ocr export")
        try:
            import onnxruntime
        except ImportError as exc:
            raise ConfigError(f"running an ONNX model needs onnxruntime ({exc}): pip install 'wds-ocr[ppocr]'") \
                from None
        options = onnxruntime.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types for a bad file
            raise CheckpointError(f"ONNX model {path} cannot be loaded: {str(exc).strip().splitlines()[0]}") from None
        inputs = self.session.get_inputs()
        if len(inputs) != 1 or inputs[0].name != INPUT_NAME or inputs[0].type != "tensor(uint8)":
            raise CheckpointError(f"ONNX model {path} is not a wds-ocr export: it must take one uint8 input "
                                  f"{INPUT_NAME!r} (export it with `wds-ocr export`)")
        raw = self.session.get_modelmeta().custom_metadata_map.get(CONFIG_KEY)
        if raw is None or len(raw) > MAX_CONFIG_CHARS:
            raise CheckpointError(f"ONNX model {path} carries no wds-ocr settings ({CONFIG_KEY!r} metadata): "
                                  "export it with `wds-ocr export`")
        try:
            self.config = build_config(recorded(jsonio.loads(raw)))
        except (ValueError, ConfigError) as exc:
            raise CheckpointError(f"ONNX model {path}: its wds-ocr settings are not valid here: {exc}") from None
        self.path = path

    def probability_maps(self, images: np.ndarray, window: tuple[slice, slice] | None = None) -> np.ndarray:
        """(N, H, W) float32 probabilities of (N, H, W, 3) uint8 RGB images (``window``: run on that
        part only, 0 elsewhere, as ``detect.probability_maps``)."""
        if window is not None:
            full = np.zeros(images.shape[:3], dtype=np.float32)
            full[:, window[0], window[1]] = self.probability_maps(images[:, window[0], window[1]])
            return full
        (maps,) = self.session.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(images, dtype=np.uint8)})
        return maps[:, 0]


def check_export(checkpoint: Checkpoint, path: Path, side: int, seed: int = 0) -> float:
    """The largest |probability| difference between ``path`` (onnxruntime) and ``checkpoint``
    (torch, float32) on a deterministic random image ``side`` high and half as wide (a receipt's
    shape, and not the square the file was traced with)."""
    width = max(32, side // 64 * 32)
    image = np.random.default_rng(seed).integers(0, 256, (1, side, width, 3), dtype=np.uint8)
    exported = OnnxDetector(path).probability_maps(image)
    model = ProbabilityModel(checkpoint.model(torch.device("cpu"))).eval()
    with torch.no_grad():
        reference = model(torch.from_numpy(image))[:, 0].numpy()
    return float(np.abs(exported - reference).max())
