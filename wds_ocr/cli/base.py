"""Shared pieces of the CLI: the click group, error handling, config options, output helpers."""

from __future__ import annotations

import functools
import os
import sys
import urllib.parse
from pathlib import Path
from typing import Any, Callable

import click

from wds_ocr.cli.progress import Progress
from wds_ocr.errors import WdsOcrError


def fail(message: str, code: int) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def handle_errors(func: Callable) -> Callable:
    """Turn package errors into one clear message and their exit code."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except WdsOcrError as exc:
            fail(str(exc), exc.exit_code)
        except KeyboardInterrupt:
            fail("interrupted", 130)

    return wrapper


def config_options(func: Callable) -> Callable:
    func = click.option(
        "--set", "overrides", multiple=True, metavar="SECTION.FIELD=VALUE",
        help="Override one setting, e.g. --set transform.size=512 (repeatable).",
    )(func)
    func = click.option(
        "--config", "config_file", type=click.Path(dir_okay=False, path_type=Path),
        help="TOML or YAML config file.",
    )(func)
    return func


def load_settings(config_file: Path | None, overrides: tuple[str, ...]):
    from wds_ocr.config import load_config

    return load_config(config_file, overrides)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="wds-ocr")
def cli() -> None:
    """Text-detection data prepared once, offline, into verifiable WebDataset shards,
    streamed to a mixed-precision DBNet trainer."""


def plural(count: int, one: str, many: str | None = None) -> str:
    return f"{count} {one if count == 1 else many or one + 's'}"


def is_rank0() -> bool:
    """Under torchrun only rank 0 talks to the user."""
    return int(os.environ.get("RANK", "0")) == 0


def score_line(score) -> str:
    return (f"precision {score.precision:.4f}  recall {score.recall:.4f}  H-mean {score.hmean:.4f}  "
            f"({score.matched} matched / {score.gt_care} ground truth / {score.det_care} detections, "
            f"{score.images} images)")


class _CounterBar:
    """Progress driven by (done, total) callbacks, made at the first callback (so a command that
    fails before its work starts prints its error alone)."""

    def __init__(self, total: int, desc: str, quiet: bool):
        self.progress = Progress(desc, "img", quiet or not is_rank0())
        self.total = total

    def __call__(self, done: int, count: int) -> None:
        self.progress.update(done, count or self.total or None)

    def close(self) -> None:
        self.progress.close()


def counter_bar(total: int, desc: str, quiet: bool):
    """(bar, update): update(done, total) drives the bar; bar.close() ends it."""
    bar = _CounterBar(total, desc, quiet)
    return bar, bar


def load_with_base(base: dict, config_file: Path | None, overrides: tuple[str, ...]):
    from wds_ocr.config import load_config

    return load_config(config_file, overrides, base=base)


def shards_phrase(manifest) -> str:
    """'3 shards (at most 8 samples or 1.1 GB each: shards.max_samples, shards.max_bytes)'."""
    settings = manifest.shard_settings or {}
    count = len(manifest.shards)
    limits = ""
    if "max_samples" in settings and "max_bytes" in settings:
        limits = (f" (at most {settings['max_samples']} samples or {settings['max_bytes'] / 1e9:.1f} GB each: "
                  "shards.max_samples, shards.max_bytes)")
    return plural(count, "shard") + limits


class _TrainBar:
    """Progress of optimizer steps, begun at training's "start" event (when the run's length is
    known), fed by its progress events; validations are printed as lines."""

    def __init__(self, quiet: bool):
        self.disabled = quiet or not is_rank0()
        self.progress = Progress("train", "step", self.disabled)

    def __call__(self, p) -> None:
        if p.event in ("start", "step"):
            self.progress.update(p.step, p.total_steps)
        elif p.event == "train":
            self.progress.update(p.step, p.total_steps, epoch=p.epoch, loss=f"{p.loss:.4f}", lr=f"{p.lr:.2e}",
                                 samples_s=f"{p.samples_per_s:.1f}", data_wait=f"{p.data_wait:.0%}")
        elif p.score is not None and not self.disabled:
            self.progress.write(f"epoch {p.epoch} validation: {score_line(p.score)}")

    def close(self) -> None:
        self.progress.close()


def train_bar(quiet: bool):
    """(bar, callback) for training's progress events; call bar.close() when training ends."""
    bar = _TrainBar(quiet)
    return bar, bar


def local_path(location: str) -> Path:
    """A local folder or file given as a path or a file:// URL."""
    if location.lower().startswith("file://"):
        return Path(urllib.parse.unquote(urllib.parse.urlsplit(location).path))
    return Path(location)
