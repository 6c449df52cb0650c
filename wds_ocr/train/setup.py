"""What a training run is made of: the optimizer, the learning-rate schedule, the train mode, the
shards check, and restoring a checkpoint to resume (``train.loop`` puts them together)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from wds_ocr.config import Config, TrainConfig, settings_changes
from wds_ocr.errors import CheckpointError, ConfigError, StaleShardsError
from wds_ocr.loader.batch import Batch
from wds_ocr.loader.stream import ShardStream
from wds_ocr.model.backbones import resolve_model
from wds_ocr.model.dbnet import DBNet
from wds_ocr.run.checkpoint import LAST_NAME, checkpoint_config, load_checkpoint, load_model_state, restore_rng_state
from wds_ocr.train.schedule import LrSchedule

# Settings that fix what a saved position means (which samples it has consumed, where it stands in
# the learning-rate schedule): a resume must not change them.
RESUME_FIXED = (("loader", "batch_size"), ("loader", "seed"), ("loader", "shuffle_block"), ("train", "accumulate"),
                ("train", "epochs"), ("train", "max_steps"), ("train", "warmup_steps"), ("train", "schedule"),
                ("train", "backbone_lr_scale"), ("augment", "crop_size"))
# Warmup takes at most this share of the run, so the decay always follows it.
MAX_WARMUP_SHARE = 0.2




@dataclass
class Position:
    epoch: int = 0  # epoch in progress
    batch: int = 0  # micro-batches of it already consumed
    step: int = 0  # optimizer steps taken


@dataclass
class Meter:
    """Samples and data-wait seconds since ``start`` (one log window, or the whole run)."""

    start: float
    samples: int = 0
    wait: float = 0.0

    def rates(self, world_size: int) -> tuple[float, float]:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        return self.samples * world_size / elapsed, self.wait / elapsed


def make_optimizer(model: DBNet, config: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW; weight decay on convolution/linear weights only, not on BatchNorm or biases. With
    ``train.backbone_lr_scale`` other than 1 the backbone's parameters form groups of their own
    whose ``lr_scale`` the schedule applies; at 0 they get no gradients at all (``freeze``)."""
    parts = [(list(model.parameters()), 1.0)]
    if config.backbone_lr_scale != 1.0:
        backbone = {id(p) for p in model.backbone.parameters()}
        parts = [([p for p in model.parameters() if id(p) in backbone], config.backbone_lr_scale),
                 ([p for p in model.parameters() if id(p) not in backbone], 1.0)]
        if config.backbone_lr_scale == 0.0:
            for parameter in parts[0][0]:
                parameter.requires_grad_(False)
    groups = []
    for params, scale in parts:
        groups += [{"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay,
                    "lr_scale": scale},
                   {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0, "lr_scale": scale}]
    return torch.optim.AdamW(groups, lr=config.lr, fused=device.type == "cuda")


def train_mode(model: torch.nn.Module, raw_model: DBNet, config: TrainConfig) -> None:
    """Training mode, except a frozen backbone (whose BatchNorm statistics stay as they were) and,
    with ``train.freeze_batchnorm``, every BatchNorm layer (normalizing with its stored statistics)."""
    model.train()
    if config.backbone_lr_scale == 0.0:
        raw_model.backbone.eval()
    if config.freeze_batchnorm:
        for module in raw_model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.eval()


def restore(path: Path, config: Config, model: DBNet, optimizer: torch.optim.Optimizer,
             scaler: torch.amp.GradScaler, world_size: int, device: torch.device,
             schedule: LrSchedule) -> tuple[Position, float | None]:
    """Load a checkpoint into the run's objects; its position and best H-mean."""
    path = path / LAST_NAME if path.is_dir() else path
    body = load_checkpoint(path)
    # Compared as validated settings: a checkpoint older than a setting holds its default.
    stored_config = checkpoint_config(body, path)
    stored, current = stored_config.model_dump(mode="json"), config.model_dump(mode="json")
    stored_model = _model_settings(resolve_model(stored_config))
    current_model = _model_settings(config)
    if stored_model != current_model:
        raise ConfigError(f"cannot resume from {path}: model settings {stored_model} differ from {current_model}; "
                          "resume without model overrides (a resume takes its settings from the checkpoint)")
    for section, name in RESUME_FIXED:
        if stored.get(section, {}).get(name) != current[section][name]:
            raise ConfigError(f"cannot resume from {path}: {section}.{name} is {stored.get(section, {}).get(name)!r} "
                                  f"in the checkpoint, {current[section][name]!r} now; changing it would change what "
                                  "the saved position means. Resume without that override (a resume takes its "
                                  "settings from the checkpoint), or start a new run in another --out folder")
    if body.get("world_size") != world_size:
        raise CheckpointError(f"cannot resume from {path}: it was written by a run of {body.get('world_size')} "
                              f"rank(s), this run has {world_size}; resume with the same number of ranks")
    load_model_state(model, body["model"], path)
    optimizer.load_state_dict(body["optimizer"])
    if scaler.is_enabled() and body["scaler"]:
        scaler.load_state_dict(body["scaler"])
    restore_rng_state(body["rng"], device)
    stored_schedule = body.get("scheduler") or {}
    if isinstance(stored_schedule, dict) and stored_schedule.get("total_steps") not in (None, schedule.total_steps):
        raise ConfigError(f"cannot resume from {path}: its run lasts {stored_schedule['total_steps']} steps, this one "
                          f"would last {schedule.total_steps} (do the shards hold a different number of samples?); "
                          "resume on the shards the run started with")
    return Position(**body["position"]), body.get("best_hmean")


def _model_settings(config: Config) -> dict[str, Any]:
    """The model settings a resume must keep (where the backbone's first weights came from is not one)."""
    ignored = ("backbone_weights", "pretrained")
    return {k: v for k, v in config.model.model_dump(mode="json").items() if k not in ignored}


def check_shards(stream: ShardStream, config: Config, location: str | Path) -> None:
    """The shards must hold what this config's live path would produce (the checkpoint's config
    is what evaluate_source and predict later transform images with)."""
    if stream.manifest.fingerprint != config.fingerprint():
        changes = "; ".join(settings_changes(stream.manifest.record_settings, config.record_settings(),
                                             "{field}: built with {built!r}, config has {now!r}"))
        raise StaleShardsError(f"{location} was built with other settings ({changes or 'settings differ'}); "
                               "train with the settings the shards were built with (drop the --set/--config "
                               "values that change them), or rebuild the shards with those settings")


def stand_in(batch: Batch) -> Batch:
    """A one-sample all-zero batch for a rank whose batch came back empty under DDP."""
    shapes = {name: (1, *t.shape[1:]) for name, t in batch.tensors().items()}
    return Batch(**{name: torch.zeros(shape, dtype=batch.tensors()[name].dtype) for name, shape in shapes.items()},
                 info=[], index=batch.index, skipped=batch.skipped)


def schedule_for(config: TrainConfig, steps_per_epoch: int) -> LrSchedule:
    """The run's learning-rate schedule: ``train.max_steps`` long (else ``train.epochs`` whole
    epochs), warmup capped at ``MAX_WARMUP_SHARE`` of it."""
    total = config.max_steps if config.max_steps is not None else config.epochs * steps_per_epoch
    warmup = min(config.warmup_steps, int(total * MAX_WARMUP_SHARE))
    return LrSchedule(config.lr, warmup, total, config.schedule)


__all__ = ["MAX_WARMUP_SHARE", "Meter", "Position", "RESUME_FIXED", "check_shards", "make_optimizer", "restore",
           "schedule_for", "stand_in", "train_mode"]
