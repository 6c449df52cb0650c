"""Shared pieces of the CLI: the click group, error handling, config options, output helpers."""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import Any, Callable

import click

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


def counter_bar(total: int, desc: str, quiet: bool):
    """A tqdm bar driven by (done, total) callbacks."""
    from tqdm import tqdm

    bar = tqdm(total=total or None, unit="img", desc=desc, disable=quiet or not is_rank0(), file=sys.stderr)

    def update(done: int, count: int) -> None:
        if count and bar.total != count:
            bar.total = count
        bar.n = done
        bar.refresh()

    return bar, update


def load_with_base(base: dict, config_file: Path | None, overrides: tuple[str, ...]):
    from wds_ocr.config import load_config

    return load_config(config_file, overrides, base=base)
