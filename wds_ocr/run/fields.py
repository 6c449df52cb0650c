"""Every field of a checkpoint that a reader uses, checked before anything uses it.

A checkpoint is either a *model* checkpoint (``config`` and ``model``: enough to evaluate and
predict) or a *training* checkpoint, which the trainer marks with ``world_size`` and which holds
everything a resume reads: ``optimizer``, ``scaler``, ``scheduler``, ``position``, ``rng`` and
``best_hmean`` as well. Each of those fields is checked wherever it is present, and a file with
``world_size`` must have all of them. Each check raises ``CheckpointError`` naming the file and
the field (``position.step``, ``rng.numpy.keys``, ``optimizer.state.12.exp_avg``), so a damaged or
hostile file is refused with a sentence instead of surfacing later as a KeyError, a TypeError
from ``Position(**...)``, or a ValueError deep inside ``random.setstate``.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from wds_ocr.errors import CheckpointError

TRAINING_FIELDS = ("world_size", "optimizer", "scaler", "scheduler", "position", "rng", "best_hmean")
POSITION_FIELDS = ("epoch", "batch", "step")
SCHEDULER_FIELDS = ("schedule", "base_lr", "warmup_steps", "total_steps", "step")
SCALER_FIELDS = ("scale", "growth_factor", "backoff_factor", "growth_interval", "_growth_tracker")
# Model state entries that are buffers, not parameters (BatchNorm's running statistics).
BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")
# Counters and sizes above this are not plausible (and would overflow int64 arithmetic later).
MAX_COUNT = 1 << 62
MAX_WORLD_SIZE = 1 << 16
# MT19937: 624 32-bit words plus a position (NumPy) or an index word (Python).
MT_WORDS = 624
# A CUDA generator's state is its Philox seed and offset, 8 bytes each.
CUDA_RNG_BYTES = 16
# The dtypes of weights, buffers and optimizer moments the trainer writes (a model trained or
# saved in half precision keeps its dtype); anything else (bool, int8, complex, float64) would be
# cast silently by load_state_dict, so it is refused. Integer counters are named on their own.
WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
COUNTER_SUFFIXES = ("num_batches_tracked",)


class _Fields:
    """Checks on one file's fields; every failure names the file and the dotted field."""

    def __init__(self, path: str | Path):
        self.path = path

    def fail(self, field: str, problem: str) -> CheckpointError:
        return CheckpointError(f"checkpoint {self.path}: field {field!r} {problem}")

    def mapping(self, value: Any, field: str, keys: tuple[str, ...] | None = None) -> dict:
        if not isinstance(value, dict):
            raise self.fail(field, f"must be a dict, got {type(value).__name__}")
        if keys is not None:
            missing = [k for k in keys if k not in value]
            extra = sorted(str(k) for k in value if k not in keys)
            if missing or extra:
                parts = ([f"lacks {', '.join(missing)}"] if missing else []) + \
                        ([f"has unknown {', '.join(extra)}"] if extra else [])
                raise self.fail(field, f"{' and '.join(parts)} (expected exactly {', '.join(keys)})")
        return value

    def whole(self, value: Any, field: str, low: int = 0, high: int = MAX_COUNT) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(field, f"must be a whole number, got {type(value).__name__} {_short(value)}")
        if not low <= value <= high:
            raise self.fail(field, f"must lie in [{low}, {high}], got {value}")
        return value

    def real(self, value: Any, field: str, low: float = -math.inf, high: float = math.inf) -> float:
        if isinstance(value, torch.Tensor) and value.numel() == 1 and value.dtype.is_floating_point:
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.fail(field, f"must be a number, got {type(value).__name__} {_short(value)}")
        if not math.isfinite(value) or not low <= value <= high:
            raise self.fail(field, f"must be a finite number in [{low}, {high}], got {value!r}")
        return float(value)

    def tensor(self, value: Any, field: str, dtype: torch.dtype | tuple[torch.dtype, ...] | None = None,
               shape: tuple[int, ...] | None = None) -> torch.Tensor:
        """A dense CPU tensor laid out as torch writes one (contiguous or channels_last: no stride-0
        or overlapping views), of ``dtype`` (one or a tuple; None: a weight dtype) and ``shape``."""
        if not isinstance(value, torch.Tensor):
            raise self.fail(field, f"must be a tensor, got {type(value).__name__}")
        if value.layout != torch.strided or value.is_quantized or value.is_nested:
            raise self.fail(field, f"must be a dense tensor, got layout {value.layout}"
                                   + (" (quantized)" if value.is_quantized else ""))
        if value.device.type != "cpu":
            raise self.fail(field, f"must be a tensor with data (on the CPU), got one on device {value.device.type!r}")
        if not _plain_layout(value):
            raise self.fail(field, f"must be laid out contiguously, got shape {list(value.shape)} with strides "
                                   f"{list(value.stride())} (a view that repeats or skips memory)")
        allowed = WEIGHT_DTYPES if dtype is None else dtype if isinstance(dtype, tuple) else (dtype,)
        if value.dtype not in allowed:
            names = " or ".join(str(d) for d in allowed)
            raise self.fail(field, f"must be a {names} tensor, got {value.dtype}")
        if shape is not None and tuple(value.shape) != shape:
            raise self.fail(field, f"must have shape {list(shape)}, got {list(value.shape)}")
        if value.dtype.is_floating_point and not bool(torch.isfinite(value).all()):
            raise self.fail(field, "holds NaN or infinite values")
        return value


def _plain_layout(value: torch.Tensor) -> bool:
    if value.is_contiguous():
        return True
    if value.dim() == 4 and value.is_contiguous(memory_format=torch.channels_last):
        return True
    return value.dim() == 5 and value.is_contiguous(memory_format=torch.channels_last_3d)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check_body(body: dict[str, Any], path: str | Path) -> None:
    """Check the model state and, in a training checkpoint, every field a resume reads."""
    fields = _Fields(path)
    model = body["model"]
    for name, value in model.items():
        if not isinstance(name, str):
            raise fields.fail("model", f"has a non-text key {_short(name)}")
        counter = name.endswith(COUNTER_SUFFIXES)
        fields.tensor(value, f"model.{name}", (torch.int64,) if counter else None, () if counter else None)
    if "world_size" in body:
        missing = [name for name in TRAINING_FIELDS if name not in body]
        if missing:
            raise fields.fail(missing[0], "is missing: a training checkpoint (one with world_size) holds all of "
                                          f"{', '.join(TRAINING_FIELDS)}")
        fields.whole(body["world_size"], "world_size", 1, MAX_WORLD_SIZE)
    if body.get("best_hmean") is not None:
        fields.real(body["best_hmean"], "best_hmean", 0.0, 1.0)
    if "position" in body:
        position = fields.mapping(body["position"], "position", POSITION_FIELDS)
        for name in POSITION_FIELDS:
            fields.whole(position[name], f"position.{name}")
    if "scheduler" in body:
        _check_scheduler(fields, body["scheduler"])
    if "scaler" in body:
        _check_scaler(fields, body["scaler"])
    if "rng" in body:
        _check_rng(fields, body["rng"])
    if "optimizer" in body:
        _check_optimizer(fields, body["optimizer"], _parameter_shapes(model))


def _check_scheduler(fields: _Fields, value: Any) -> None:
    scheduler = fields.mapping(value, "scheduler", SCHEDULER_FIELDS)
    if scheduler["schedule"] not in ("cosine", "poly"):
        raise fields.fail("scheduler.schedule", f"must be 'cosine' or 'poly', got {_short(scheduler['schedule'])}")
    fields.real(scheduler["base_lr"], "scheduler.base_lr", 0.0)
    for name in ("warmup_steps", "total_steps", "step"):
        fields.whole(scheduler[name], f"scheduler.{name}")


def _check_scaler(fields: _Fields, value: Any) -> None:
    scaler = fields.mapping(value, "scaler")
    if not scaler:  # GradScaler disabled (every precision but 16-mixed) saves {}
        return
    fields.mapping(scaler, "scaler", SCALER_FIELDS)
    for name in ("scale", "growth_factor", "backoff_factor"):
        fields.real(scaler[name], f"scaler.{name}", 0.0)
    for name in ("growth_interval", "_growth_tracker"):
        fields.whole(scaler[name], f"scaler.{name}")


def _check_rng(fields: _Fields, value: Any) -> None:
    rng = fields.mapping(value, "rng", ("torch", "cuda", "numpy", "python"))
    expected = tuple(torch.get_rng_state().shape)
    fields.tensor(rng["torch"], "rng.torch", torch.uint8, expected)
    if rng["cuda"] is not None:
        fields.tensor(rng["cuda"], "rng.cuda", torch.uint8, (CUDA_RNG_BYTES,))
    numpy_state = fields.mapping(rng["numpy"], "rng.numpy", ("kind", "keys", "position", "has_gauss", "gauss"))
    if numpy_state["kind"] != "MT19937":
        raise fields.fail("rng.numpy.kind", f"must be 'MT19937', got {_short(numpy_state['kind'])}")
    keys = fields.tensor(numpy_state["keys"], "rng.numpy.keys", torch.int64, (MT_WORDS,))
    if bool(((keys < 0) | (keys >= 1 << 32)).any()):
        raise fields.fail("rng.numpy.keys", "must hold 32-bit unsigned words")
    fields.whole(numpy_state["position"], "rng.numpy.position", 0, MT_WORDS)
    fields.whole(numpy_state["has_gauss"], "rng.numpy.has_gauss", 0, 1)
    fields.real(numpy_state["gauss"], "rng.numpy.gauss")
    python_state = fields.mapping(rng["python"], "rng.python", ("version", "internal", "gauss"))
    fields.whole(python_state["version"], "rng.python.version", 3, 3)
    internal = python_state["internal"]
    if not isinstance(internal, (list, tuple)) or len(internal) != MT_WORDS + 1:
        raise fields.fail("rng.python.internal", f"must be a list of {MT_WORDS + 1} whole numbers")
    for index, word in enumerate(internal[:MT_WORDS]):
        fields.whole(word, f"rng.python.internal.{index}", 0, (1 << 32) - 1)
    fields.whole(internal[MT_WORDS], f"rng.python.internal.{MT_WORDS}", 0, MT_WORDS)
    if python_state["gauss"] is not None:
        fields.real(python_state["gauss"], "rng.python.gauss")


def _parameter_shapes(model: dict[str, torch.Tensor]) -> Counter:
    return Counter(tuple(t.shape) for name, t in model.items() if not name.endswith(BUFFER_SUFFIXES))


def _check_optimizer(fields: _Fields, value: Any, parameter_shapes: Counter) -> None:
    """AdamW's state dict: groups that list every parameter id once, per-id moments with a
    parameter's shape, finite hyperparameters. Which id is which parameter depends on how the
    trainer grouped them, so shapes are checked as a whole: the moments must have the shapes of
    the model's parameters (``load_state_dict`` then checks the group sizes)."""
    optimizer = fields.mapping(value, "optimizer", ("state", "param_groups"))
    groups = optimizer["param_groups"]
    if not isinstance(groups, list) or not groups:
        raise fields.fail("optimizer.param_groups", "must be a non-empty list")
    ids: list[int] = []
    for index, group in enumerate(groups):
        where = f"optimizer.param_groups.{index}"
        fields.mapping(group, where)
        params = group.get("params")
        if not isinstance(params, list):
            raise fields.fail(f"{where}.params", "must be a list of parameter ids")
        ids.extend(fields.whole(p, f"{where}.params") for p in params)
        fields.real(group.get("lr"), f"{where}.lr", 0.0)
        fields.real(group.get("eps"), f"{where}.eps", 0.0)
        fields.real(group.get("weight_decay"), f"{where}.weight_decay", 0.0)
        betas = group.get("betas")
        if not isinstance(betas, (list, tuple)) or len(betas) != 2:
            raise fields.fail(f"{where}.betas", "must be two numbers")
        for beta in betas:
            fields.real(beta, f"{where}.betas", 0.0, 1.0)
    count = sum(parameter_shapes.values())
    if sorted(ids) != list(range(count)):
        raise fields.fail("optimizer.param_groups", f"must list the ids 0..{count - 1} of the model's {count} "
                                                    f"parameters once each, got {len(ids)} ids")
    state = fields.mapping(optimizer["state"], "optimizer.state")
    shapes: Counter = Counter()
    for key, entry in state.items():
        if isinstance(key, bool) or not isinstance(key, int) or not 0 <= key < count:
            raise fields.fail("optimizer.state", f"has key {_short(key)}, not a parameter id in 0..{count - 1}")
        where = f"optimizer.state.{key}"
        fields.mapping(entry, where, ("step", "exp_avg", "exp_avg_sq"))
        fields.real(entry["step"], f"{where}.step", 0.0)
        average = fields.tensor(entry["exp_avg"], f"{where}.exp_avg")
        fields.tensor(entry["exp_avg_sq"], f"{where}.exp_avg_sq", average.dtype, tuple(average.shape))
        shapes[tuple(average.shape)] += 1
    if state and shapes - parameter_shapes:
        extra = sorted(shapes - parameter_shapes)[0]
        raise fields.fail("optimizer.state", f"holds moments of shape {list(extra)}, which no parameter of the "
                                             "model has (a state for another model)")
