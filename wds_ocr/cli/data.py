"""Data commands: synth, build-shards, merge, verify, inspect, bench."""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path

import click

from wds_ocr.cli.base import (
    cli,
    config_options,
    fail,
    handle_errors,
    load_settings,
    load_with_base,
    plural,
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


def _reason_head(reason: str) -> str:
    """A reason without its file/line prefix and details (what follows ':' or ' (')."""
    return re.sub(r"^\S+ line \d+: ", "", reason).split(":")[0].split(" (")[0]


def _reason_group(reason: str) -> str:
    """The key similar reasons share: the head with its numbers blanked (never shown to users)."""
    return re.sub(r"-?\d+(\.\d+)?", "#", _reason_head(reason))


def reject_summary(rejects, limit: int = 10, width: int = 160) -> list[str]:
    """The build's rejects counted by kind of reason, most frequent first; each group shows its
    first reason as written (a group of different reasons says how many are like it)."""
    groups: dict[tuple[str, str], list] = {}
    for item in rejects:
        shown = re.sub(r"^\S+ line \d+: ", "", item.reason)
        group = groups.setdefault((item.kind, _reason_group(item.reason)), [0, shown, True])
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


@cli.command()
@click.argument("folder")
@handle_errors
def merge(folder: str) -> None:
    """Join the part manifests of a partitioned build in FOLDER (or s3://bucket/prefix) into manifest.json."""
    from wds_ocr.storage import output_kind

    if output_kind(folder, "FOLDER") == "s3":
        from wds_ocr.shards.bucket import merge_bucket
        from wds_ocr.storage.s3 import S3Url

        manifest, path = merge_bucket(S3Url.parse(folder))
    else:
        from wds_ocr.shards.merge import merge_parts

        manifest, path = merge_parts(local_path(folder))
    click.echo(f"merged {manifest.counts.written} samples in {len(manifest.shards)} shards into {path}")


def local_path(location: str) -> Path:
    """A local folder or file given as a path or a file:// URL."""
    if location.lower().startswith("file://"):
        return Path(urllib.parse.unquote(urllib.parse.urlsplit(location).path))
    return Path(location)


@contextlib.contextmanager
def readable_copy(location: str, key: str | None = "*"):
    """A local path for a shard location: itself, or for s3://... a temporary copy of the manifest,
    the rejects file and the shards (every one, or only the one holding ``key``)."""
    from wds_ocr.storage import scheme_of

    scheme = scheme_of(location)
    if scheme == "s3":
        from wds_ocr.shards.bucket import download
        from wds_ocr.storage.s3 import S3Url

        with tempfile.TemporaryDirectory(prefix="wds-ocr-copy-") as tmp:
            yield download(S3Url.parse(location), Path(tmp), key=key)
        return
    if scheme not in ("", "file"):
        raise UsageError(f"{location}: give a shard folder, a manifest or s3://bucket/prefix")
    path = local_path(location)
    if not path.exists():
        raise UsageError(f"{location} does not exist")
    yield path


VERIFY_SHOWN = 20  # problems printed one by one; more are summarized
VERIFY_EXAMPLES = 3
_LINE_WIDTH = 240


def problem_lines(problems, show_all: bool) -> list[str]:
    """verify's problems: every one when few or with --all, else counted by kind with examples."""
    if show_all or len(problems) <= VERIFY_SHOWN:
        return [problem.line() for problem in problems]
    groups: dict[str, list] = {}
    for problem in problems:
        groups.setdefault(_reason_group(problem.what), []).append(problem)
    lines = [f"{len(problems)} problems of {plural(len(groups), 'kind')} (--all prints every one):"]
    for members in sorted(groups.values(), key=len, reverse=True):
        heads = {_reason_head(problem.what) for problem in members}
        label = _reason_head(members[0].what) + ("" if len(heads) == 1 else " (and the like)")
        lines.append(f"  {len(members)} x {label}")
        for problem in members[:VERIFY_EXAMPLES]:
            line = problem.line()
            lines.append(f"      {line if len(line) <= _LINE_WIDTH else line[: _LINE_WIDTH - 3] + '...'}")
        if len(members) > VERIFY_EXAMPLES:
            lines.append(f"      ... and {len(members) - VERIFY_EXAMPLES} more")
    return lines


@cli.command()
@click.argument("shards")
@click.option("--against-source", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Re-run the live pipeline on this source and require bit-equal records.")
@click.option("--sample", type=click.IntRange(1), help="With --against-source: compare K random records only.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed for --sample.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--all", "show_all", is_flag=True,
              help=f"Print every problem (default: all of them up to {VERIFY_SHOWN}, else counts by kind and "
                   f"the first {VERIFY_EXAMPLES} of each).")
@config_options
@handle_errors
def verify(shards: str, against_source: Path | None, sample: int | None, seed: int, as_json: bool, show_all: bool,
           config_file: Path | None, overrides: tuple[str, ...]) -> None:
    """Check SHARDS (folder or manifest): hashes, tar structure, records, staleness.

    Staleness is checked against the code's pipeline version, and against --config/--set
    when given; these start from the settings the shards were built with (as train's do), so
    --set transform.size=512 asks "are these shards current if transform.size were 512?".
    Exit 1 on any problem.
    """
    from wds_ocr.data.coverage import Coverage
    from wds_ocr.errors import ManifestError
    from wds_ocr.shards.manifest import load_manifest
    from wds_ocr.shards.verify import config_from_manifest, verify_shards

    with readable_copy(shards) as local:
        config = None
        if config_file or overrides:
            try:
                base = config_from_manifest(load_manifest(local)).model_dump(mode="json")
            except ManifestError:
                base = {}  # verify reports what is wrong with the manifest; the settings start from the defaults
            config = load_with_base(base, config_file, overrides)
        report = verify_shards(local, config, against_source, sample, seed)
    if as_json:
        click.echo(json.dumps(report.as_dict(), indent=1, sort_keys=True))
    else:
        for line in problem_lines(report.problems, show_all):
            click.echo(line)
        if report.samples_checked:
            click.echo(Coverage.from_dict(report.coverage).summary())
        compared = f", {report.compared_with_source} equal-checked against the source" if against_source else ""
        verdict = "OK" if report.ok else f"{len(report.problems)} problem(s)" + (" (stale)" if report.stale else "")
        click.echo(f"{report.shards_checked} shards, {report.samples_checked} records checked{compared}: {verdict}")
    sys.exit(0 if report.ok else 1)


@cli.command()
@click.argument("shards")
@click.option("--key", help="Show this record (default: the first).")
@click.option("--png", type=click.Path(dir_okay=False, path_type=Path), help="Write a labelled picture: image + polygons (legend) | gt | mask | thresh_map (colour bar).")
@handle_errors
def inspect(shards: str, key: str | None, png: Path | None) -> None:
    """Counts, sizes, dtypes and bytes per sample of SHARDS; optionally a PNG of one record."""
    from wds_ocr.shards.inspect import inspect_shards

    with readable_copy(shards, key) as local:
        summary = inspect_shards(local, key, png)
    for line in summary.lines():
        click.echo(line)


@cli.command()
@click.argument("source", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--shards", "shards", required=True, type=click.Path(exists=True, path_type=Path),
              help="Shards built from SOURCE (folder or manifest).")
@click.option("--split", default=None, help="Split of SOURCE [the split the shards were built from].")
@click.option("--workers", default=2, show_default=True, type=click.IntRange(0, 256))
@click.option("--batch", "batch_size", default=8, show_default=True, type=click.IntRange(1, 4096))
@click.option("--seconds", "min_seconds", default=5.0, show_default=True, type=click.FloatRange(0.0),
              help="Run whole epochs of each path until this much time has passed.")
@click.option("--peers", default="webdataset,litdata,mosaic", show_default=True,
              help="Libraries to read the same arrays with (comma-separated; LitData and Mosaic are the 'bench' "
                   "extra; 'none' for no peers).")
@click.option("--no-stock", is_flag=True, help="Same as --peers none.")
@click.option("--http", "http", default="auto", show_default=True,
              type=click.Choice(["auto", "nginx", "python", "off"]),
              help="Local HTTP server for the HTTP row: nginx if installed (auto), a Python sendfile server, or none.")
@click.option("--no-live", is_flag=True, help="Skip the live per-sample path (slow: decode + targets per sample).")
@click.option("--rounds", default=1, show_default=True, type=click.IntRange(1, 100),
              help="Run every path once per round; report the median round and every round's ratios.")
@click.option("--integrity", is_flag=True,
              help="Also time the threaded shard path with no read-path check, the xxh3 checksum and sha256.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
@config_options
@handle_errors
def bench(source: Path, shards: Path, split: str | None, workers: int, batch_size: int, min_seconds: float,
          peers: str, no_stock: bool, http: str, no_live: bool, rounds: int, integrity: bool, as_json: bool,
          config_file: Path | None, overrides: tuple[str, ...]) -> None:
    """Side by side: streaming --shards against the raw read rate of their files, the same arrays read
    with webdataset / LitData / Mosaic, HTTP from 127.0.0.1, and the live per-epoch path on SOURCE."""
    from wds_ocr.bench.loader import run_bench
    from wds_ocr.bench.peers import PEERS
    from wds_ocr.shards.manifest import load_manifest
    from wds_ocr.shards.verify import config_from_manifest

    manifest = load_manifest(shards)
    config = load_with_base(config_from_manifest(manifest).model_dump(mode="json"), config_file, overrides)
    if config.fingerprint() != manifest.fingerprint:
        fail("the live path would not produce these shards (settings differ); pass the config they were built "
              "with, or omit --config/--set to take it from the manifest", 2)
    chosen = [] if no_stock or peers.strip() == "none" else [p.strip() for p in peers.split(",") if p.strip()]
    unknown = sorted(set(chosen) - set(PEERS))
    if unknown:
        fail(f"--peers: unknown {', '.join(unknown)}; choose from {', '.join(PEERS)} or none", 2)
    split = split or manifest.source["split"]
    from wds_ocr.data.sources import list_source

    list_source(source, split, config.source)  # a split the source lacks is bad usage (exit 2), before any path runs
    result = run_bench(source, split, shards, config, workers, batch_size, min_seconds, chosen,
                       progress=None if as_json else lambda text: click.echo(f"... {text}", err=True),
                       integrity=integrity, live=not no_live, http=None if http == "off" else http, rounds=rounds)
    if as_json:
        click.echo(json.dumps(result.as_dict(), indent=1, sort_keys=True))
        return
    for line in bench_lines(result):
        click.echo(line)


def bench_lines(result) -> list[str]:
    """The bench report as text: the median round of every path, then the ratios of each round."""
    sizes = result.sizes
    lines = [f"{result.samples_per_epoch} samples per epoch, batch {result.batch_size}, {result.workers} workers, "
             f"{len(result.rounds)} round(s); device ops: {result.device_ops}",
             f"bytes per record: mean {sizes.mean / 1e6:.3f} MB, median {sizes.median / 1e6:.3f} MB, largest "
             f"{sizes.largest / 1e6:.3f} MB (the full arrays: {sizes.full_arrays / 1e6:.2f} MB, "
             f"{sizes.full_arrays / max(sizes.mean, 1):.2f}x)"]
    if result.http_server:
        lines.append(f"HTTP server on 127.0.0.1: {result.http_server}")
    for peer, nbytes in result.peer_bytes.items():
        lines.append(f"peer {peer}: {nbytes / max(result.samples_per_epoch, 1) / 1e6:.3f} MB per sample on disk")
    lines.append(f"{'path (median round)':24s} {'samples/s':>10s} {'MB/s':>9s} {'1st batch s':>11s} "
                 f"{'peak RSS MB':>11s} {'epochs':>6s}")
    for name in result.path_names:
        row = result.median_path(name)
        lines.append(f"{name:24s} {row.samples_per_second:10.1f} {row.mb_per_second:9.1f} "
                     f"{row.first_batch_seconds:11.3f} {row.peak_rss_mb:11.0f} {row.epochs:6d}")
    lines.append(f"raw sequential read of the shard files: {result.raw_read_mb_per_second:.0f} MB/s (median round)")
    if result.bare_read_mb_per_second:
        lines.append(f"bare reads of the members into batch buffers, {result.workers} thread(s), no checks: "
                     f"{result.bare_read_mb_per_second:.0f} MB/s (median round)")
    labels = {"threads_fraction_of_raw_read": "threads MB/s / raw read (stored bytes)",
              "threads_expanded_fraction_of_raw_read": "threads MB/s / raw read (expanded bytes)",
              "threads_fraction_of_bare_reads": "threads MB/s / bare reads (stored bytes)",
              "bare_reads_fraction_of_raw_read": "bare reads / raw read",
              "threads_over_best_peer":
              "threads / best peer (samples/s)", "processes_over_threads": "processes / threads",
              "http_over_local": "HTTP / local (threads)", "threads_over_live": "threads / live"}
    for name, values in result.ratio_rounds().items():
        if any(v is not None for v in values):
            lines.append(f"{labels[name]}: " + " / ".join("-" if v is None else f"{v:.2f}" for v in values))
    if "threads, verify off" in result.path_names:
        off = max(result.median_path("threads, verify off").samples_per_second, 1e-12)
        lines.append("read-path check / none (threads): " + ", ".join(
            f"{name.split('verify ')[-1]} {result.median_path(name).samples_per_second / off:.3f}x"
            for name in result.path_names if name.startswith("threads, verify ") and not name.endswith("off")))
    for name, why in result.skipped.items():
        lines.append(f"skipped {name}: {why}")
    return lines
