"""Where a run executes: device choice, DDP from the environment, and mixed precision.

DDP is detected the way torchrun announces it: ``WORLD_SIZE`` > 1 with ``RANK`` and ``LOCAL_RANK``
(and ``MASTER_ADDR``/``MASTER_PORT`` for the rendezvous). The process group uses NCCL when the
device is CUDA and gloo otherwise. ``Precision`` names the three supported modes: "bf16-mixed"
and "16-mixed" run the forward pass under ``torch.autocast``; "32" runs in float32 (TF32
matmuls allowed on CUDA). Only "16-mixed" needs loss scaling (``GradScaler``), since bfloat16
has float32's exponent range.
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist

from wds_ocr.errors import ConfigError

Precision = Literal["auto", "bf16-mixed", "16-mixed", "32"]
PRECISIONS: tuple[str, ...] = ("auto", "bf16-mixed", "16-mixed", "32")
_AUTOCAST_DTYPES = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


@dataclass(frozen=True)
class Runtime:
    """This process's place in the run."""

    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # True when this process group was started here (and is ended here)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"environment variable {name}={raw!r} must be a whole number (set by torchrun)") from None


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """"auto" -> this rank's CUDA device when CUDA is present, else the CPU; otherwise torch's name."""
    if name == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"device {name!r} is not a device name (use auto, cpu, cuda or cuda:N): {exc}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {name!r} asked for CUDA, but this torch build or machine has no CUDA device")
        if device.index is None:
            device = torch.device("cuda", local_rank)
    return device


def start_runtime(device: str = "auto") -> Runtime:
    """Resolve the device and, under torchrun (WORLD_SIZE > 1), join the process group."""
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(f"RANK={rank} does not fit WORLD_SIZE={world_size} (set by torchrun)")
    resolved = resolve_device(device, local_rank)
    if world_size == 1:
        return Runtime(resolved)
    if resolved.type == "cuda":
        torch.cuda.set_device(resolved)
    owns = False
    if not dist.is_initialized():
        backend = "nccl" if resolved.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
        owns = True
    return Runtime(resolved, rank, world_size, local_rank, owns)


def stop_runtime(runtime: Runtime) -> None:
    """Leave the process group this runtime started (others are left to their owner).

    Called from a ``finally``: after a clean run every rank waits for the others before any tears
    down (rank 0 hosts the rendezvous store); while an exception propagates it does not wait,
    since the other ranks may never arrive.
    """
    if runtime.owns_group and dist.is_initialized():
        if sys.exc_info()[0] is None:
            dist.barrier()
        dist.destroy_process_group()


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


@contextlib.contextmanager
def cpu_threads_beside(processes: int, device: torch.device):
    """Torch's intra-op threads for a CPU device that shares the cores with ``processes`` busy
    worker processes (evaluation's post-processing pool): the cores left over, at least one, for
    the duration. An OpenMP parallel region waits for its slowest thread, and a thread the OS
    preempted for a worker stalls every op: on 2 cores beside 2 workers, one torch thread did the
    evaluation's normalize and sigmoid in 40% of the CPU time two threads took. CUDA devices, and
    no workers, leave the setting alone."""
    if device.type != "cpu" or processes <= 0:
        yield
        return
    before = torch.get_num_threads()
    wanted = max(1, min(before, usable_cores() - processes))
    torch.set_num_threads(wanted)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ConfigError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    return precision


def resolve_precision(precision: str, device: torch.device) -> str:
    """The concrete mode for ``precision`` on ``device``: "auto" becomes bf16-mixed on a CUDA device
    with bfloat16 support, 16-mixed on an older CUDA device, and 32 elsewhere (CPU autocast in
    bfloat16 trained the demo 7.5x slower than float32)."""
    if check_precision(precision) != "auto":
        return precision
    if device.type != "cuda":
        return "32"
    return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"


def autocast_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """The dtype autocast runs in for ``precision`` on ``device`` (None for "32")."""
    return _AUTOCAST_DTYPES.get(resolve_precision(precision, device))


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The forward-pass context for ``precision`` ("32": no autocast at all; "auto": see resolve_precision)."""
    dtype = autocast_dtype(device, precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def allow_tf32(device: torch.device) -> None:
    """Let float32 matmuls and convolutions use TF32 tensor cores on CUDA (a speed/precision trade
    the DBNet reference makes implicitly on Ampere+)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
