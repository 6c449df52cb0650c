"""The DBNet training loop, nanoGPT style: ``train`` reads top to bottom, one optimizer step per
turn of its inner loop; ``_Run`` holds the run's objects and does each part (set-up in ``train.setup``).

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
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel

from wds_ocr.config import Config
from wds_ocr.errors import ConfigError
from wds_ocr.eval.metric import DetectionScore
from wds_ocr.infer.detect import reduce_metric, resolve_post_workers, run_detection, truth_from_info
from wds_ocr.loader.batch import Batch
from wds_ocr.loader.device import Augmenter, content_regions, prepare, to_device
from wds_ocr.loader.loaders import make_loader
from wds_ocr.loader.plan import batches_per_epoch
from wds_ocr.loader.stream import ShardStream
from wds_ocr.model.backbones import resolve_model
from wds_ocr.model.dbnet import DBNet
from wds_ocr.model.loss import DBLoss
from wds_ocr.model.state import StateFit
from wds_ocr.run.checkpoint import BEST_NAME, LAST_NAME, Checkpoint, init_weights, rng_state, save_checkpoint
from wds_ocr.run.runtime import Runtime, allow_tf32, autocast, resolve_precision, start_runtime, stop_runtime
from wds_ocr.train.curves import draw_run_curves
from wds_ocr.train.log import MetricsLog
from wds_ocr.train.setup import (Meter, Position, check_shards, make_optimizer, restore, schedule_for, stand_in,
                                 train_mode)

LOSS_PARTS = ("total", "bce", "l1", "dice")
# last.pt is rewritten at an epoch's end when this long has passed since it was last written (and
# always after a validation and at the end of the run): short epochs do not spend their time saving.
CHECKPOINT_SECONDS = 300.0


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


def _validate(model: DBNet, loader: Iterable[Batch], config: Config, precision: str,
              runtime: Runtime) -> tuple[DetectionScore, dict[str, Any]]:
    """The validation score (all ranks) and this rank's time breakdown (``EvalTimes.as_dict``)."""
    batches = ((batch.images, [truth_from_info(info) for info in batch.info]) for batch in loader if len(batch))
    post_workers = resolve_post_workers(config.evaluation.post_workers, config.loader.workers, runtime)
    run = run_detection(model, batches, config.postprocess, precision, runtime.device, post_workers=post_workers,
                        crop_to_content=config.evaluation.crop_to_content,
                        capacity=config.loader.batch_size)
    return reduce_metric(run.metric, runtime).score(), run.times.as_dict()  # every rank joins the all-reduce


class _Run:
    """One training run: its data, model, optimizer and schedule, where it stands, and each part of
    a step, a validation and a checkpoint."""

    def __init__(self, config: Config, train_shards: str | Path, val_shards: str | Path | None, out_dir: Path,
                 runtime: Runtime, precision: str, log: MetricsLog, resume: str | Path | None,
                 init: Checkpoint | None, init_partial: bool, stop_after: int | None):
        tc = config.train
        self.config, self.tc, self.out_dir, self.runtime, self.precision, self.log = (
            config, tc, out_dir, runtime, precision, log)
        allow_tf32(runtime.device)
        torch.manual_seed(tc.seed)  # the same initial weights on every rank (DDP broadcasts rank 0's anyway)

        # Data: this rank's batches of the training shards; the validation shards, if any.
        self.stream = ShardStream(train_shards, config.loader, train=True, rank=runtime.rank,
                                  world_size=runtime.world_size)
        check_shards(self.stream, config, train_shards)
        if config.augment.crop_size > self.stream.size:
            raise ConfigError(f"augment.crop_size={config.augment.crop_size} is larger than the records of "
                              f"{train_shards} ({self.stream.size}x{self.stream.size}); use at most "
                              f"{self.stream.size}, or 0 for whole records")
        batch_size = config.loader.batch_size
        steps_per_epoch = batches_per_epoch(self.stream.manifest, batch_size, runtime.world_size,
                                            train=True) // tc.accumulate
        if steps_per_epoch == 0:
            raise ConfigError(f"{train_shards} holds {self.stream.manifest.total_samples} samples: too few for one "
                              f"step of {tc.accumulate} x {batch_size} per rank on {runtime.world_size} rank(s); "
                              "lower loader.batch_size or train.accumulate")
        self.micro_per_epoch = steps_per_epoch * tc.accumulate
        self.schedule = schedule_for(tc, steps_per_epoch)
        self.stop_at = self.schedule.total_steps if stop_after is None else min(stop_after, self.schedule.total_steps)
        self.loader = make_loader(self.stream)
        self.val_loader = None
        if val_shards is not None:
            val_stream = ShardStream(val_shards, config.loader, rank=runtime.rank, world_size=runtime.world_size)
            check_shards(val_stream, config, val_shards)
            self.val_loader = make_loader(val_stream)

        # Model, loss, optimizer: fresh, from --init's weights, or as the resumed checkpoint left them.
        raw_model = DBNet(config.model, load_weights=resume is None and init is None)
        self.fit: StateFit | None = None
        if init is not None:
            self.fit = fit = init_weights(raw_model, init, init_partial)
            log.write({"event": "init", "step": 0, "checkpoint": str(init.path), "loaded": len(fit.fitting),
                       "missing": list(fit.missing), "unexpected": list(fit.unexpected),
                       "mismatched": list(fit.mismatched)})
        self.raw_model = raw_model.to(runtime.device, memory_format=torch.channels_last)
        self.criterion = DBLoss(config.loss, raw_model.k)
        self.optimizer = make_optimizer(self.raw_model, tc, runtime.device)
        self.scaler = torch.amp.GradScaler(runtime.device.type, enabled=precision == "16-mixed")
        self.position, self.best_hmean = Position(), None
        if resume is not None:
            self.position, self.best_hmean = restore(Path(resume), config, self.raw_model, self.optimizer,
                                                     self.scaler, runtime.world_size, runtime.device, self.schedule)
            log.truncate_after(self.position.step)  # steps after the checkpoint are logged again, once
        model: torch.nn.Module = torch.compile(self.raw_model) if tc.compile else self.raw_model
        if runtime.distributed:
            model = DistributedDataParallel(model, device_ids=[runtime.device.index]
                                            if runtime.device.type == "cuda" else None)
        self.model = model
        self.augmenter = Augmenter(config.augment, config.targets.thresh_min, seed=tc.seed)

        now = time.perf_counter()
        self.saved_at, self.saved_step, self.validated_step = now, None, None
        self.total, self.window, self.final_loss = Meter(now), Meter(now), None

    # -- one optimizer step ----------------------------------------------------------------------

    def set_lr(self) -> float:
        lr = self.schedule(self.position.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        return lr

    def step(self, batches: Iterator[Batch]) -> torch.Tensor:
        """``train.accumulate`` micro-batches, then the optimizer step; the summed loss parts (on the device)."""
        tc, runtime, position = self.tc, self.runtime, self.position
        step_parts = torch.zeros(len(LOSS_PARTS), device=runtime.device)
        for micro in range(tc.accumulate):
            waiting = time.perf_counter()
            batch = next(batches)  # blocks until the loader has a batch ready: the data wait
            waited = time.perf_counter() - waiting
            self.window.wait, self.total.wait = self.window.wait + waited, self.total.wait + waited
            empty = len(batch) == 0  # every sample skipped as corrupt (loader.on_error=skip)
            if empty and not runtime.distributed:
                position.batch += 1
                continue
            # non_blocking copy from pinned memory: the CPU queues it and moves on
            images, maps = prepare(to_device(stand_in(batch) if empty else batch, runtime.device), self.augmenter,
                                   position.epoch, batch.index, runtime.rank, content_regions(batch.info),
                                   self.raw_model.normalization)
            last_micro = micro == tc.accumulate - 1
            no_sync = self.model.no_sync() if runtime.distributed and not last_micro else contextlib.nullcontext()
            with no_sync:  # DDP all-reduces gradients only in the last micro-batch's backward
                with autocast(runtime.device, self.precision):
                    outputs = self.model(images)
                loss, parts = self.criterion(outputs, maps)
                # an empty batch under DDP still runs (zero-weighted) so every rank joins the all-reduce
                self.scaler.scale(loss * (0.0 if empty else 1.0) / tc.accumulate).backward()
            step_parts += torch.stack([parts[name] for name in LOSS_PARTS])  # stays on the device
            position.batch += 1
            self.window.samples, self.total.samples = self.window.samples + len(batch), self.total.samples + len(batch)
        if tc.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), tc.grad_clip)
        self.scaler.step(self.optimizer)  # with fp16 the scaler reads the inf/NaN check: a CPU-GPU sync
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        position.step += 1
        return step_parts

    def log_train(self, step_parts: torch.Tensor, lr: float) -> dict[str, Any]:
        """Log the step's losses and the window's rates; the record written."""
        values = (step_parts / self.tc.accumulate).tolist()  # sync: the CPU waits for the GPU here
        self.final_loss = values[0]
        samples_per_s, data_wait = self.window.rates(self.runtime.world_size)
        record = {"event": "train", "step": self.position.step, "epoch": self.position.epoch, "lr": lr,
                  **{("loss" if n == "total" else n): v for n, v in zip(LOSS_PARTS, values)},
                  "samples_per_s": samples_per_s, "data_wait": data_wait}
        self.log.write(record)
        self.window = Meter(time.perf_counter())
        return record

    # -- validation and checkpoints ----------------------------------------------------------------

    def validate(self, epoch: int) -> tuple[DetectionScore, tuple[str, ...]]:
        """Score the model on the validation shards and log it; the score and the checkpoints to write."""
        evaluated = time.perf_counter()
        score, times = _validate(self.raw_model, self.val_loader, self.config, self.precision, self.runtime)
        self.validated_step = self.position.step
        self.log.write({"event": "eval", "step": self.position.step, "epoch": epoch,
                        "precision": score.precision, "recall": score.recall, "hmean": score.hmean,
                        "matched": score.matched, "gt_care": score.gt_care, "det_care": score.det_care,
                        "images": score.images, "seconds": time.perf_counter() - evaluated,
                        **{name: value for name, value in times.items() if name != "images"}})
        if self.runtime.is_main:
            draw_run_curves(self.out_dir)
        if self.best_hmean is None or score.hmean > self.best_hmean:
            self.best_hmean = score.hmean
            return score, (LAST_NAME, BEST_NAME)
        return score, (LAST_NAME,)

    def checkpoint(self, names: tuple[str, ...]) -> None:
        self.saved_at, self.saved_step = time.perf_counter(), self.position.step
        if self.runtime.is_main:
            state = {"config": self.config.model_dump(mode="json"), "model": self.raw_model.state_dict(),
                     "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
                     "scheduler": self.schedule.state(self.position.step), "position": vars(self.position).copy(),
                     "rng": rng_state(self.runtime.device), "best_hmean": self.best_hmean,
                     "world_size": self.runtime.world_size}
            for name in names:  # torch.save copies device tensors to the host: a CPU-GPU sync
                save_checkpoint(self.out_dir / name, state)
        self.window = Meter(time.perf_counter())  # validation and saving are not training time


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
    report = progress if progress is not None and runtime.is_main else (lambda _: None)
    try:
        run = _Run(config, train_shards, val_shards, out_dir, runtime, precision, log, resume, init, init_partial,
                   stop_after)
        position = run.position
        report(TrainProgress("start", position.step, run.stop_at, position.epoch))
        while position.step < run.stop_at:
            run.stream.set_epoch(position.epoch, position.batch)
            batches = iter(run.loader)
            train_mode(run.model, run.raw_model, tc)
            while position.batch < run.micro_per_epoch and position.step < run.stop_at:
                lr = run.set_lr()
                step_parts = run.step(batches)
                report(TrainProgress("step", position.step, run.stop_at, position.epoch, lr=lr))
                if position.step % tc.log_every == 0 or position.step == run.stop_at:
                    logged = run.log_train(step_parts, lr)
                    report(TrainProgress("train", position.step, run.stop_at, position.epoch, logged["loss"], lr,
                                         logged["samples_per_s"], logged["data_wait"]))
            if position.batch < run.micro_per_epoch:
                break  # stopped mid-epoch: the run's last step, or stop_after
            position.epoch, position.batch = position.epoch + 1, 0
            if run.val_loader is not None and tc.eval_every and position.epoch % tc.eval_every == 0:
                score, names = run.validate(position.epoch - 1)
                report(TrainProgress("eval", position.step, run.stop_at, position.epoch - 1, score=score))
                run.checkpoint(names)
            elif time.perf_counter() - run.saved_at >= checkpoint_seconds:
                run.checkpoint((LAST_NAME,))
        finished = position.step == run.schedule.total_steps
        if finished and run.val_loader is not None and run.validated_step != position.step:
            epoch = position.epoch if position.batch else position.epoch - 1
            score, names = run.validate(epoch)  # the final model
            report(TrainProgress("eval", position.step, run.stop_at, epoch, score=score))
            run.checkpoint(names)
        if run.saved_step != position.step:
            run.checkpoint((LAST_NAME,))
        if runtime.is_main:
            draw_run_curves(out_dir)
        samples_per_s, data_wait = run.total.rates(runtime.world_size)
        skips = run.stream.policy.summary()  # the loader's SkipPolicy counted every record it skipped
        if skips["skipped"]:
            log.write({"event": "skips", "step": position.step, **skips})
        best = out_dir / BEST_NAME if run.best_hmean is not None else None
        return TrainResult(out_dir, position.step, position.epoch, out_dir / LAST_NAME, best, run.best_hmean,
                           run.final_loss, time.perf_counter() - started, samples_per_s, data_wait,
                           runtime.world_size, skipped=skips["skipped"], init_fit=run.fit)
    finally:
        log.close()
        stop_runtime(runtime)
