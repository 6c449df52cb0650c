"""Checkpoints as plain containers: saved with ``torch.save``, read with ``weights_only=True``.

A checkpoint is a dict of tensors, numbers, strings, lists and dicts only:

    format, version      "wds-ocr/checkpoint", 1
    config               the resolved Config as a JSON-able dict (``model_dump(mode="json")``)
    model                the DBNet state dict (unwrapped: no DDP / torch.compile prefixes)
    optimizer, scaler    their ``state_dict()`` (both plain containers)
    scheduler            {"schedule", "base_lr", "warmup_steps", "total_steps", "step"}
    position             {"epoch", "batch", "step"}: the epoch in progress, the micro-batches of it
                         already consumed, and optimizer steps taken; resume starts right there
    rng                  torch CPU/CUDA generator states and Python/NumPy states, as tensors/ints
    best_hmean           the best validation H-mean so far (None before any validation)
    world_size           ranks of the run that wrote it

Reading never unpickles code: ``torch.load(..., weights_only=True)`` refuses anything but
tensors and plain containers, and a file that needs more is reported as a ``CheckpointError``; so is
a file that is not a torch zip archive at all (a text file, a legacy-format pickle), checked from
its first bytes before torch parses it. Every field a reader uses is checked (``run.fields``).
Files are written under a temporary name and renamed, so a crash never leaves half a checkpoint;
a temporary left by a writer that died is removed by the next checkpoint written into that folder.

A command opens a checkpoint once (``open_checkpoint``) and passes the ``Checkpoint`` down: its
stored config, the same with ``--set`` overrides, and the model built from it.
"""

from __future__ import annotations

import os
import pickle
import random
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wds_ocr.config import Config, build_config, load_config, recorded
from wds_ocr.errors import CheckpointError, ConfigError
from wds_ocr.model.dbnet import DBNet
from wds_ocr.model.state import StateFit, state_fit
from wds_ocr.run.fields import check_body

CHECKPOINT_FORMAT = "wds-ocr/checkpoint"
CHECKPOINT_VERSION = 1
LAST_NAME = "last.pt"
BEST_NAME = "best.pt"
# torch.save has written zip archives since torch 1.6; the legacy format is a bare pickle stream.
ZIP_SIGNATURE = b"PK\x03\x04"
# Records in a checkpoint archive: one per tensor storage plus a few (a model of 10,000 tensors
# with its optimizer state has ~30,000); more is not a checkpoint wds-ocr wrote.
MAX_ARCHIVE_MEMBERS = 200_000
# A checkpoint's temporary while it is written: ".<name>.tmp" next to it.
TEMPORARY_PREFIX, TEMPORARY_SUFFIX = ".", ".tmp"


def _temporary(path: Path) -> Path:
    return path.with_name(f"{TEMPORARY_PREFIX}{path.name}{TEMPORARY_SUFFIX}")


def remove_leftovers(folder: Path) -> list[Path]:
    """Remove the temporaries of checkpoints (``.<name>.pt.tmp``) in ``folder``; the removed paths.

    Only one process writes checkpoints into a run folder (rank 0) and it writes them one at a
    time, so when it is about to write, any such temporary is a leftover of a writer that died.
    """
    removed = []
    for candidate in Path(folder).glob(f"{TEMPORARY_PREFIX}*.pt{TEMPORARY_SUFFIX}"):
        if candidate.is_file():
            candidate.unlink(missing_ok=True)
            removed.append(candidate)
    return removed


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` (plain containers) atomically: temp file in the same folder, then rename.

    Leftover temporaries of earlier, interrupted writes in that folder are removed first; a write
    that fails (disk full, interrupt) removes its own temporary.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(path.parent)
    body = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **state}
    temporary = _temporary(path)
    try:
        torch.save(body, temporary)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def _first_bytes(path: Path, count: int) -> bytes:
    try:
        with open(path, "rb") as handle:
            return handle.read(count)
    except OSError as exc:
        raise CheckpointError(f"checkpoint {path} cannot be read: {exc.strerror or exc}") from None


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint's dict, on the CPU, every field checked; CheckpointError for a missing,
    unsafe, foreign or damaged file."""
    return open_checkpoint(path).body


def _read_body(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist" if not path.exists()
                              else f"checkpoint {path} is not a regular file")
    start = _first_bytes(path, len(ZIP_SIGNATURE))
    if start != ZIP_SIGNATURE:
        shown = f"starts with {start!r}" if start else "is empty"
        raise CheckpointError(f"checkpoint {path} is not a torch checkpoint: the file {shown}, while torch.save "
                              f"writes a zip archive (starting with {ZIP_SIGNATURE!r}); pass the last.pt or best.pt "
                              "that wds-ocr train wrote")
    _check_archive(path)
    try:
        body = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"checkpoint {path} holds objects that need unpickling, which is refused "
            f"(only tensors and plain containers are read): {first_line}"
        ) from None
    except Exception as exc:  # noqa: BLE001 - any failure to parse a damaged archive is the file's fault
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"checkpoint {path} cannot be read (truncated or damaged torch file): {reason}") from None
    if not isinstance(body, dict) or body.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"checkpoint {path} is not a wds-ocr checkpoint (no format {CHECKPOINT_FORMAT!r})")
    if body.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(
            f"checkpoint {path} has version {body.get('version')!r}; this wds-ocr reads version {CHECKPOINT_VERSION}"
        )
    for key in ("config", "model"):
        if not isinstance(body.get(key), dict):
            raise CheckpointError(f"checkpoint {path} has no {key!r} section")
    check_body(body, path)
    return body


def _check_archive(path: Path) -> None:
    """Bound what torch.load will allocate: torch.save stores every record uncompressed, so the
    records add up to at most the file's size. A compressed record (which could inflate far beyond
    the file: a 2 MB file to gigabytes) or records larger in total than the file are refused before
    anything is unpacked."""
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError) as exc:
        raise CheckpointError(f"checkpoint {path} cannot be read (truncated or damaged torch file): {exc}") from None
    if len(members) > MAX_ARCHIVE_MEMBERS:
        raise CheckpointError(f"checkpoint {path} holds {len(members):,} records; a wds-ocr checkpoint holds at "
                              f"most {MAX_ARCHIVE_MEMBERS:,}")
    for member in members:
        if member.compress_type != zipfile.ZIP_STORED:
            raise CheckpointError(f"checkpoint {path}: record {member.filename[:200]!r} is compressed (zip method "
                                  f"{member.compress_type}); torch.save stores records uncompressed, and a compressed "
                                  "one could unpack to far more than the file's size, so the file is refused")
    unpacked, size = sum(member.file_size for member in members), path.stat().st_size
    if unpacked > size:
        raise CheckpointError(f"checkpoint {path}: its records declare {unpacked:,} bytes, more than the file's "
                              f"{size:,}; the file is damaged or forged")


@dataclass(frozen=True, eq=False)
class Checkpoint:
    """A checkpoint read and checked once: its file, its fields and its stored configuration."""

    path: Path
    body: dict[str, Any]
    config: Config

    def configured(self, overrides: tuple[str, ...] | list[str] = ()) -> Config:
        """The stored config with ``section.field=value`` overrides applied, validated again."""
        return load_config(None, overrides, base=recorded(self.body["config"]))

    def model(self, device: torch.device) -> DBNet:
        """A DBNet with these weights in eval mode, channels_last on ``device``."""
        model = DBNet(self.config.model, load_weights=False)
        load_model_state(model, self.body["model"], self.path)
        model.to(device, memory_format=torch.channels_last)
        return model.eval()


def open_checkpoint(path: str | Path | Checkpoint) -> Checkpoint:
    """Read and check a checkpoint file (a ``Checkpoint`` is passed through)."""
    if isinstance(path, Checkpoint):
        return path
    path = Path(path)
    body = _read_body(path)
    return Checkpoint(path, body, checkpoint_config(body, path))


def checkpoint_config(body: dict[str, Any], path: str | Path) -> Config:
    """The Config stored in a checkpoint, validated again."""
    try:
        return build_config(recorded(body["config"]))
    except ConfigError as exc:
        raise CheckpointError(f"checkpoint {path}: its stored configuration is not valid here: {exc}") from None


def config_from_checkpoint(path: str | Path | Checkpoint, overrides: tuple[str, ...] | list[str] = ()) -> Config:
    """A checkpoint's config with ``section.field=value`` overrides applied (for evaluate and
    predict: post-processing thresholds, loader settings), validated again."""
    return open_checkpoint(path).configured(overrides)


def load_model_state(model: torch.nn.Module, state: dict[str, torch.Tensor], path: str | Path) -> None:
    """Load a state dict strictly; a mismatch names the first keys that differ."""
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        reason = str(exc).splitlines()
        raise CheckpointError(
            f"checkpoint {path} was made for another model: {' '.join(line.strip() for line in reason[:4])}"
        ) from None


def init_weights(model: torch.nn.Module, checkpoint: Checkpoint, partial: bool = False) -> StateFit:
    """Copy ``checkpoint``'s model weights into ``model`` (``train --init``: weights only).

    Every key must fit (same names, same shapes) unless ``partial``: then the weights that fit are
    loaded and the rest of ``model`` keeps its initialization. The fit is returned either way, so
    the caller can name what was left out.
    """
    fit = state_fit(model.state_dict(), checkpoint.body["model"])
    if not fit.exact and not partial:
        raise ConfigError(f"--init {checkpoint.path} does not fit the model: {fit.problems()}. Start from a "
                          "checkpoint of the same model settings (train --init takes the model section from it; "
                          "drop the --set model.* values that change it), or pass --init-partial to load only "
                          "the weights that fit")
    if not fit.fitting:
        raise ConfigError(f"--init {checkpoint.path}: none of its weights fit the model ({fit.problems()})")
    model.load_state_dict({key: checkpoint.body["model"][key] for key in fit.fitting}, strict=False)
    return fit


def load_model(path: str | Path | Checkpoint, device: torch.device) -> tuple[DBNet, Config]:
    """A DBNet in eval mode, channels_last on ``device``, and the checkpoint's config."""
    checkpoint = open_checkpoint(path)
    return checkpoint.model(device), checkpoint.config


def rng_state(device: torch.device | None = None) -> dict[str, Any]:
    """Every generator the process might draw from, as tensors and plain numbers.

    CUDA: only ``device``'s generator (touching every GPU would create a context on each).
    """
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    python_version, python_internal, python_gauss = random.getstate()
    on_cuda = device is not None and device.type == "cuda"
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if on_cuda else None,
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": {"version": python_version, "internal": list(python_internal), "gauss": python_gauss},
    }


def restore_rng_state(state: dict[str, Any], device: torch.device | None = None) -> None:
    """Set every generator from ``rng_state()``'s dict (as checked by ``load_checkpoint``)."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
    numpy_state = state["numpy"]
    np.random.set_state((numpy_state["kind"], numpy_state["keys"].numpy().astype(np.uint32),
                         numpy_state["position"], numpy_state["has_gauss"], numpy_state["gauss"]))
    python_state = state["python"]
    random.setstate((python_state["version"], tuple(python_state["internal"]), python_state["gauss"]))
