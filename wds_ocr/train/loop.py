"""The DBNet training loop, nanoGPT style: the whole loop on one page, no globals.

Data: ``ShardStream(train=True)`` plans this rank's batches for an epoch (every rank the same
count) and ``make_loader`` streams them (threads or processes, per ``loader.mode``), pinned when
CUDA is present; the shards must have been built with this config's record settings (they are
what evaluate_source and predict later apply to images). On the device each batch is
copied (``to_device``, non-blocking), normalized and jointly augmented (``prepare``), run through
the model under autocast and scored by ``DBLoss`` (in float32). AdamW, linear warmup then cosine
or poly decay, gradient clipping, gradient accumulation (DDP all-reduces on the last micro-batch
only), optional ``torch.compile``. GradScaler is enabled for "16-mixed" only.

DDP comes from the environment (torchrun): rank 0 alone logs (its own loss; samples/s counts
all ranks) and writes checkpoints. Checkpoints (``last.pt`` after each validation, at an epoch's
end every ``checkpoint_seconds`` and at the end; ``best.pt`` on a new best H-mean) hold all a
resume needs: model, optimizer, scaler, schedule step, loader position and RNG states; ``resume``
continues exactly where the run stopped (the next step's loss is the uninterrupted run's).

Timing: ``data_wait`` is the share of wall time spent blocked in ``next(loader)``; samples/s and
data_wait are measured between log steps, which end with a CPU-GPU synchronization (``.tolist()``
of the losses), so the window's wall time is real device time too.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel

from wds_ocr.config import Config, TrainConfig, settings_changes
from wds_ocr.errors import CheckpointError, ConfigError, StaleShardsError
from wds_ocr.infer.detect import reduce_metric, resolve_post_workers, run_detection, truth_from_info
from wds_ocr.eval.metric import DetectionScore
from wds_ocr.loader.device import Augmenter, content_regions, prepare, to_device
from wds_ocr.loader.plan import batches_per_epoch
from wds_ocr.loader.batch import Batch
from wds_ocr.loader.loaders import make_loader
from wds_ocr.loader.stream import ShardStream
from wds_ocr.model.dbnet import DBNet
from wds_ocr.model.loss import DBLoss
from wds_ocr.model.backbones import resolve_model
from wds_ocr.model.state import StateFit
from wds_ocr.run.checkpoint import (BEST_NAME, LAST_NAME, Checkpoint, checkpoint_config, init_weights,
                                    load_checkpoint, load_model_state, restore_rng_state, rng_state, save_checkpoint)
from wds_ocr.train.log import MetricsLog
from wds_ocr.train.curves import draw_run_curves
from wds_ocr.run.runtime import Runtime, allow_tf32, autocast, resolve_precision, start_runtime, stop_runtime
from wds_ocr.train.schedule import LrSchedule

LOSS_PARTS = ("total", "bce", "l1", "dice")
# last.pt is rewritten at an epoch's end when this long has passed since it was last written (and
# always after a validation and at the end of the run): short epochs do not spend their time saving.
CHECKPOINT_SECONDS = 300.0
# Settings that fix what a saved position means (which samples it has consumed, where it stands in
# the learning-rate schedule): a resume must not change them.
RESUME_FIXED = (("loader", "batch_size"), ("loader", "seed"), ("loader", "shuffle_block"), ("train", "accumulate"),
                ("train", "epochs"), ("train", "max_steps"), ("train", "warmup_steps"), ("train", "schedule"),
                ("train", "backbone_lr_scale"), ("augment", "crop_size"))
# Warmup takes at most this share of the run, so the decay always follows it.
MAX_WARMUP_SHARE = 0.2


@dataclass(frozen=True)
class TrainProgress:
    """What the progress callback sees: "start" once (with total_steps), "step" after every
    optimizer step (no losses: reading them would make the CPU wait for the device), "train" at
    each log step and "eval" after each validation."""

    event: str
    step: int  # optimizer steps taken
    total_steps: int  # the step this run stops at (the schedule's end, or stop_after)
    epoch: int  # 0-based epoch: in progress ("train") or just finished ("eval")
    loss: float | None = None
    lr: float | None = None
    samples_per_s: float | None = None  # all ranks together
    data_wait: float | None = None  # fraction of wall time blocked waiting for the next batch
    score: DetectionScore | None = None


@dataclass(frozen=True)
class TrainResult:
    out_dir: Path
    steps: int  # optimizer steps taken in total (including those before a resume)
    epochs: int  # epochs completed
    last_checkpoint: Path
    best_checkpoint: Path | None
    best_hmean: float | None
    final_loss: float | None  # the last logged step's loss
    seconds: float
    samples_per_s: float
    data_wait: float
    world_size: int
    skipped: int = 0  # training records skipped as bad (loader.on_error=skip), this rank
    init_fit: StateFit | None = None  # how the --init checkpoint fitted the model


@dataclass
class Position:
    epoch: int = 0  # epoch in progress
    batch: int = 0  # micro-batches of it already consumed
    step: int = 0  # optimizer steps taken


@dataclass
class _Meter:
    """Samples and data-wait seconds since ``start`` (one log window, or the whole run)."""

    start: float
    samples: int = 0
    wait: float = 0.0

    def rates(self, world_size: int) -> tuple[float, float]:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        return self.samples * world_size / elapsed, self.wait / elapsed


def _optimizer(model: DBNet, config: TrainConfig, device: torch.device) -> torch.optim.AdamW:
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


def _train_mode(model: torch.nn.Module, raw_model: DBNet, config: TrainConfig) -> None:
    """Training mode, except a frozen backbone (whose BatchNorm statistics stay as they were) and,
    with ``train.freeze_batchnorm``, every BatchNorm layer (normalizing with its stored statistics)."""
    model.train()
    if config.backbone_lr_scale == 0.0:
        raw_model.backbone.eval()
    if config.freeze_batchnorm:
        for module in raw_model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.eval()


def _restore(path: Path, config: Config, model: DBNet, optimizer: torch.optim.Optimizer,
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


def _check_shards(stream: ShardStream, config: Config, location: str | Path) -> None:
    """The shards must hold what this config's live path would produce (the checkpoint's config
    is what evaluate_source and predict later transform images with)."""
    if stream.manifest.fingerprint != config.fingerprint():
        changes = "; ".join(settings_changes(stream.manifest.record_settings, config.record_settings(),
                                             "{field}: built with {built!r}, config has {now!r}"))
        raise StaleShardsError(f"{location} was built with other settings ({changes or 'settings differ'}); "
                               "train with the settings the shards were built with (drop the --set/--config "
                               "values that change them), or rebuild the shards with those settings")


def _validate(model: DBNet, loader: Iterable[Batch], config: Config, precision: str,
              runtime: Runtime) -> tuple[DetectionScore, dict[str, Any]]:
    """The validation score (all ranks) and this rank's time breakdown (``EvalTimes.as_dict``)."""
    batches = ((batch.images, [truth_from_info(info) for info in batch.info]) for batch in loader if len(batch))
    post_workers = resolve_post_workers(config.evaluation.post_workers, config.loader.workers, runtime)
    run = run_detection(model, batches, config.postprocess, precision, runtime.device, post_workers=post_workers,
                        crop_to_content=config.evaluation.crop_to_content,
                        capacity=config.loader.batch_size)
    return reduce_metric(run.metric, runtime).score(), run.times.as_dict()  # every rank joins the all-reduce


def _stand_in(batch: Batch) -> Batch:
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


def train(config: Config, train_shards: str | Path, val_shards: str | Path | None = None,
          out_dir: str | Path = Path("runs/train"), device: str = "auto", resume: str | Path | None = None,
          progress: Callable[[TrainProgress], None] | None = None, stop_after: int | None = None,
          checkpoint_seconds: float = CHECKPOINT_SECONDS, init: Checkpoint | None = None,
          init_partial: bool = False) -> TrainResult:
    """Train DBNet on ``train_shards``, validating on ``val_shards`` each ``train.eval_every`` epochs.

    The run lasts ``train.max_steps`` optimizer steps (else ``train.epochs`` epochs) and the
    learning-rate schedule spans exactly that. ``stop_after`` interrupts it after that many steps
    in total (the schedule is unchanged), leaving a ``last.pt`` that ``resume`` continues exactly.
    ``last.pt`` is also written after each validation and at an epoch's end ``checkpoint_seconds``
    after the previous write. ``curves.png`` is redrawn after each validation and at the end.
    ``init``: start from that checkpoint's model weights (a fresh optimizer, schedule and step 0);
    they must fit the model exactly unless ``init_partial``.
    """
    tc, out_dir, started = config.train, Path(out_dir), time.perf_counter()
    if stop_after is not None and stop_after < 1:
        raise ConfigError(f"stop_after must be at least 1, got {stop_after}")
    if init is not None and resume is not None:
        raise ConfigError("--init starts a new run from a checkpoint's weights, --resume continues a run: give one")
    config = resolve_model(config)  # the checkpoints carry the model's input normalization
    runtime = start_runtime(device)
    precision = resolve_precision(tc.precision, runtime.device)
    log = MetricsLog(out_dir, enabled=runtime.is_main)
    try:
        allow_tf32(runtime.device)
        torch.manual_seed(tc.seed)  # the same initial weights on every rank (DDP broadcasts rank 0's anyway)
        loader_config = config.loader
        stream = ShardStream(train_shards, loader_config, train=True, rank=runtime.rank, world_size=runtime.world_size)
        _check_shards(stream, config, train_shards)
        if config.augment.crop_size > stream.size:
            raise ConfigError(f"augment.crop_size={config.augment.crop_size} is larger than the records of "
                              f"{train_shards} ({stream.size}x{stream.size}); use at most {stream.size}, or 0 for "
                              "whole records")
        steps_per_epoch = batches_per_epoch(stream.manifest, loader_config.batch_size, runtime.world_size,
                                            train=True) // tc.accumulate
        if steps_per_epoch == 0:
            raise ConfigError(f"{train_shards} holds {stream.manifest.total_samples} samples: too few for one step "
                              f"of {tc.accumulate} x {loader_config.batch_size} per rank on {runtime.world_size} "
                              "rank(s); lower loader.batch_size or train.accumulate")
        micro_per_epoch = steps_per_epoch * tc.accumulate
        schedule = schedule_for(tc, steps_per_epoch)
        stop_at = schedule.total_steps if stop_after is None else min(stop_after, schedule.total_steps)
        loader = make_loader(stream)
        val_loader = None
        if val_shards is not None:
            val_stream = ShardStream(val_shards, loader_config, rank=runtime.rank, world_size=runtime.world_size)
            _check_shards(val_stream, config, val_shards)
            val_loader = make_loader(val_stream)

        raw_model = DBNet(config.model, load_weights=resume is None and init is None)
        fit = None
        if init is not None:
            fit = init_weights(raw_model, init, init_partial)
            log.write({"event": "init", "step": 0, "checkpoint": str(init.path), "loaded": len(fit.fitting),
                       "missing": list(fit.missing), "unexpected": list(fit.unexpected),
                       "mismatched": list(fit.mismatched)})
        raw_model = raw_model.to(runtime.device, memory_format=torch.channels_last)
        criterion = DBLoss(config.loss, raw_model.k)
        optimizer = _optimizer(raw_model, tc, runtime.device)
        scaler = torch.amp.GradScaler(runtime.device.type, enabled=precision == "16-mixed")
        position, best_hmean = Position(), None
        if resume is not None:
            position, best_hmean = _restore(Path(resume), config, raw_model, optimizer, scaler,
                                             runtime.world_size, runtime.device, schedule)
            log.truncate_after(position.step)  # steps after the checkpoint are logged again, once
        if progress is not None and runtime.is_main:
            progress(TrainProgress("start", position.step, stop_at, position.epoch))
        model: torch.nn.Module = torch.compile(raw_model) if tc.compile else raw_model
        if runtime.distributed:
            model = DistributedDataParallel(model, device_ids=[runtime.device.index] if runtime.device.type == "cuda"
                                            else None)
        augmenter = Augmenter(config.augment, config.targets.thresh_min, seed=tc.seed)

        saved_at, saved_step = time.perf_counter(), None

        def checkpoint(names: tuple[str, ...]) -> None:
            nonlocal saved_at, saved_step
            saved_at, saved_step = time.perf_counter(), position.step
            if runtime.is_main:
                state = {"config": config.model_dump(mode="json"), "model": raw_model.state_dict(),
                         "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                         "scheduler": schedule.state(position.step), "position": vars(position).copy(),
                         "rng": rng_state(runtime.device), "best_hmean": best_hmean,
                         "world_size": runtime.world_size}
                for name in names:  # torch.save copies device tensors to the host: a CPU-GPU sync
                    save_checkpoint(out_dir / name, state)

        validated_step: int | None = None

        def validate(epoch: int) -> tuple[str, ...]:
            """Score the model on the validation shards, log it; the checkpoints to write."""
            nonlocal best_hmean, validated_step
            evaluated = time.perf_counter()
            score, times = _validate(raw_model, val_loader, config, precision, runtime)
            validated_step = position.step
            log.write({"event": "eval", "step": position.step, "epoch": epoch,
                       "precision": score.precision, "recall": score.recall, "hmean": score.hmean,
                       "matched": score.matched, "gt_care": score.gt_care, "det_care": score.det_care,
                       "images": score.images, "seconds": time.perf_counter() - evaluated,
                       **{name: value for name, value in times.items() if name != "images"}})
            if progress is not None and runtime.is_main:
                progress(TrainProgress("eval", position.step, stop_at, epoch, score=score))
            if runtime.is_main:
                draw_run_curves(out_dir)
            if best_hmean is None or score.hmean > best_hmean:
                best_hmean = score.hmean
                return (LAST_NAME, BEST_NAME)
            return (LAST_NAME,)

        total, window, final_loss = _Meter(time.perf_counter()), _Meter(time.perf_counter()), None
        while position.step < stop_at:
            stream.set_epoch(position.epoch, position.batch)
            batches = iter(loader)
            _train_mode(model, raw_model, tc)
            while position.batch < micro_per_epoch and position.step < stop_at:
                lr = schedule(position.step)
                for group in optimizer.param_groups:
                    group["lr"] = lr * group.get("lr_scale", 1.0)
                step_parts = torch.zeros(len(LOSS_PARTS), device=runtime.device)
                for micro in range(tc.accumulate):
                    waiting = time.perf_counter()
                    batch = next(batches)  # blocks until the loader has a batch ready: the data wait
                    waited = time.perf_counter() - waiting
                    window.wait, total.wait = window.wait + waited, total.wait + waited
                    empty = len(batch) == 0  # every sample skipped as corrupt (loader.on_error=skip)
                    if empty and not runtime.distributed:
                        position.batch += 1
                        continue
                    # non_blocking copy from pinned memory: the CPU queues it and moves on
                    images, maps = prepare(to_device(_stand_in(batch) if empty else batch, runtime.device), augmenter,
                                           position.epoch, batch.index, runtime.rank, content_regions(batch.info),
                                           raw_model.normalization)
                    last_micro = micro == tc.accumulate - 1
                    no_sync = model.no_sync() if runtime.distributed and not last_micro else contextlib.nullcontext()
                    with no_sync:  # DDP all-reduces gradients only in the last micro-batch's backward
                        with autocast(runtime.device, precision):
                            outputs = model(images)
                        loss, parts = criterion(outputs, maps)
                        # an empty batch under DDP still runs (zero-weighted) so every rank joins the all-reduce
                        scaler.scale(loss * (0.0 if empty else 1.0) / tc.accumulate).backward()
                    step_parts += torch.stack([parts[name] for name in LOSS_PARTS])  # stays on the device
                    position.batch += 1
                    window.samples, total.samples = window.samples + len(batch), total.samples + len(batch)
                if tc.grad_clip > 0:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(raw_model.parameters(), tc.grad_clip)
                scaler.step(optimizer)  # with fp16 the scaler reads the inf/NaN check: a CPU-GPU sync
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                position.step += 1
                if progress is not None and runtime.is_main:
                    progress(TrainProgress("step", position.step, stop_at, position.epoch, lr=lr))
                if position.step % tc.log_every == 0 or position.step == stop_at:
                    values = (step_parts / tc.accumulate).tolist()  # sync: the CPU waits for the GPU here
                    final_loss = values[0]
                    samples_per_s, data_wait = window.rates(runtime.world_size)
                    record = {"event": "train", "step": position.step, "epoch": position.epoch, "lr": lr,
                              **{("loss" if n == "total" else n): v for n, v in zip(LOSS_PARTS, values)},
                              "samples_per_s": samples_per_s, "data_wait": data_wait}
                    log.write(record)
                    if progress is not None and runtime.is_main:
                        progress(TrainProgress("train", position.step, stop_at, position.epoch, values[0], lr,
                                               samples_per_s, data_wait))
                    window = _Meter(time.perf_counter())
            if position.batch < micro_per_epoch:
                break  # stopped mid-epoch: the run's last step, or stop_after
            position = Position(position.epoch + 1, 0, position.step)
            names: tuple[str, ...] = ()
            if val_loader is not None and tc.eval_every and position.epoch % tc.eval_every == 0:
                names = validate(position.epoch - 1)
            elif time.perf_counter() - saved_at >= checkpoint_seconds:
                names = (LAST_NAME,)
            if names:
                checkpoint(names)
                window = _Meter(time.perf_counter())  # validation and saving are not training time
        finished = position.step == schedule.total_steps
        if finished and val_loader is not None and validated_step != position.step:
            checkpoint(validate(position.epoch if position.batch else position.epoch - 1))  # the final model
        if saved_step != position.step:
            checkpoint((LAST_NAME,))
        if runtime.is_main:
            draw_run_curves(out_dir)
        samples_per_s, data_wait = total.rates(runtime.world_size)
        best_path = out_dir / BEST_NAME
        skips = stream.policy.summary()  # the loader's SkipPolicy counted every record it skipped
        if skips["skipped"]:
            log.write({"event": "skips", "step": position.step, **skips})
        return TrainResult(out_dir, position.step, position.epoch, out_dir / LAST_NAME,
                           best_path if best_hmean is not None else None, best_hmean, final_loss,
                           time.perf_counter() - started, samples_per_s, data_wait, runtime.world_size,
                           skipped=skips["skipped"], init_fit=fit)
    finally:
        log.close()
        stop_runtime(runtime)
