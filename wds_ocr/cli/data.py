"""Data commands: synth, build-shards, merge, verify, inspect, bench."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import click

from wds_ocr.cli.base import (
    cli,
    local_path,
    config_options,
    fail,
    handle_errors,
    load_settings,
    shards_phrase,
)
from wds_ocr.errors import UsageError


@cli.command()
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Folder to create.")
@click.option("--n", "count", default=32, show_default=True, type=click.IntRange(1), help="Number of receipts.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0), help="Random seed.")
@click.option("--val-fraction", default=0.25, show_default=True, type=click.FloatRange(0.0, 1.0, max_open=True))
@handle_errors
def synth(out: Path, count: int, seed: int, val_fraction: float) -> None:
    """Write N synthetic receipts (images/<split>/, jsons/<split>.json) to OUT."""
    from wds_ocr.data.synth import synthesize

    try:
        summary = synthesize(out, count, seed, val_fraction=val_fraction)
    except ValueError as exc:
        fail(str(exc), 2)
    splits = ", ".join(f"{name} {n}" for name, n in summary.counts.items())
    click.echo(f"wrote {sum(summary.counts.values())} receipts to {out} ({splits}); "
               f"{summary.words} words, {summary.exif_tagged} stored with an EXIF orientation tag")


# The default build worker count: the usable cores, at most this many (each worker holds a decoded
# photo, a few hundred MB for a large one; more than 8 is a choice to make with the memory in view).
AUTO_BUILD_WORKERS = 8


class BuildWorkers(click.ParamType):
    """``auto`` (the usable cores, at most AUTO_BUILD_WORKERS) or a count from 1 to 512."""

    name = "auto|N"

    def convert(self, value, param, ctx) -> int:
        if isinstance(value, int):
            return value
        text = str(value).strip().lower()
        if text == "auto":
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
            return max(1, min(cores, AUTO_BUILD_WORKERS))
        if text.isdigit() and 1 <= int(text) <= 512:
            return int(text)
        self.fail(f"{value!r} is not auto or a whole number from 1 to 512", param, ctx)


@cli.command("build-shards")
@click.argument("source", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--split", required=True, help="Split folder to build, e.g. train or val.")
@click.option("--out", help="Output folder or s3://bucket/prefix [shards/<split>].")
@click.option("--staging", type=click.Path(file_okay=False, path_type=Path),
              help="With --out s3://...: the local folder shards are built in before upload [a folder in the "
                   "system temp named after the URL, removed after a finished build].")
@click.option("--workers", default="auto", show_default=True, type=BuildWorkers(),
              help=f"Worker processes: auto = the usable cores, at most {AUTO_BUILD_WORKERS}. Any count gives the "
                   "same bytes.")
@click.option("--partition", help="Build only part i of n (i from 0), e.g. 0/4; join with wds-ocr merge.")
@click.option("--overwrite", is_flag=True,
              help="Replace shards in --out that were built with other settings (refused without it).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@config_options
@handle_errors
def build_shards_command(source: Path, split: str, out: str | None, staging: Path | None, workers: int,
                         partition: str | None, overwrite: bool, quiet: bool, config_file: Path | None,
                         overrides: tuple[str, ...]) -> None:
    """Pre-transform SOURCE's SPLIT into WebDataset shards with a manifest.

    A folder holding shards built with other settings is refused unless --overwrite; a run
    reading those shards then stops with an error saying they were rebuilt."""
    from wds_ocr.cli.progress import Progress
    from wds_ocr.shards.build import Partition, build_shards
    from wds_ocr.storage import output_kind

    config = load_settings(config_file, overrides)
    out = out or str(Path("shards") / split)
    kind = output_kind(out)
    if staging is not None and kind != "s3":
        raise UsageError("--staging is for --out s3://bucket/prefix only")
    part = Partition.parse(partition) if partition else None
    started = time.perf_counter()
    bar = Progress("build", "sample", quiet)

    def progress(p) -> None:
        bar.update(p.done, p.total, written=p.written, rejected=p.rejected)

    bucket = None
    try:
        if kind == "s3":
            from wds_ocr.shards.bucket import build_to_bucket
            from wds_ocr.storage.s3 import S3Url

            bucket = build_to_bucket(source, split, S3Url.parse(out), config, workers=workers, partition=part,
                                     progress=progress, overwrite=overwrite, staging=staging)
            result = bucket.result
        else:
            result = build_shards(source, split, local_path(out), config, workers=workers, partition=part,
                                  progress=progress, overwrite=overwrite)
    finally:
        bar.close()
    if bucket is not None:
        click.echo(f"{bucket.url}: {bucket.uploaded} shards uploaded, {bucket.kept} already there"
                   + (f", {bucket.deleted} of an earlier build deleted" if bucket.deleted else ""))
    elapsed = time.perf_counter() - started
    counts = result.manifest.counts
    if result.up_to_date and bucket is None:
        click.echo(f"{result.manifest_path} is up to date ({counts.written} samples in "
                   f"{len(result.manifest.shards)} shards); nothing to do")
        return
    nbytes = sum(entry.bytes for entry in result.manifest.shards)
    click.echo(
        f"samples in {counts.samples_in}: written {counts.written}, rejected {counts.rejected}; "
        f"words skipped {counts.words_skipped}\n"
        f"{shards_phrase(result.manifest)}, {nbytes / 1e6:.1f} MB"
        f"{f', {result.reused_shards} reused from an earlier run' if result.reused_shards else ''}; "
        f"{elapsed:.1f} s ({counts.written / max(elapsed, 1e-9):.1f} samples/s)\n"
        f"manifest: {result.manifest_path if bucket is None else bucket.url.describe(result.manifest_path.name)}"
    )
    _echo_coverage(result.manifest)
    if counts.rejected or counts.words_skipped:
        for line in reject_summary(result.rejects):
            click.echo(line)
        click.echo(f"details: {result.rejects_path}")


def _echo_coverage(manifest) -> None:
    """The words the training targets hold and leave out, and a warning when size leaves out too many."""
    coverage = manifest.coverage
    click.echo(coverage.summary())
    settings = manifest.record_settings
    warning = coverage.size_warning(settings["targets"]["min_text_size"], settings["transform"]["size"],
                                    settings["targets"]["shrink_ratio"])
    if warning:
        click.echo(warning, err=True)


def reason_head(reason: str) -> str:
    """A reason without its file/line prefix and details (what follows ':' or ' (')."""
    return re.sub(r"^\S+ line \d+: ", "", reason).split(":")[0].split(" (")[0]


def reason_group(reason: str) -> str:
    """The key similar reasons share: the head with its numbers blanked (never shown to users)."""
    return re.sub(r"-?\d+(\.\d+)?", "#", reason_head(reason))


def reject_summary(rejects, limit: int = 10, width: int = 160) -> list[str]:
    """The build's rejects counted by kind of reason, most frequent first; each group shows its
    first reason as written (a group of different reasons says how many are like it)."""
    groups: dict[tuple[str, str], list] = {}
    for item in rejects:
        shown = re.sub(r"^\S+ line \d+: ", "", item.reason)
        group = groups.setdefault((item.kind, reason_group(item.reason)), [0, shown, True])
        group[0] += 1
        group[2] = group[2] and shown == group[1]
    lines = []
    ordered = sorted(groups.items(), key=lambda kv: (-kv[1][0], kv[0]))
    for (kind, _), (n, first, same) in ordered[:limit]:
        first = first if len(first) <= width else first[: width - 3] + "..."
        lines.append(f"  {n:5d} x {kind}: {first}" + ("" if same or n == 1 else f"  (and {n - 1} like it)"))
    if len(ordered) > limit:
        rest = sum(n for _, (n, *_) in ordered[limit:])
        lines.append(f"  {rest:5d} x other reasons ({len(ordered) - limit} kinds)")
    return lines
