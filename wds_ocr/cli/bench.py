"""The loader benchmark command: wds-ocr bench."""

from __future__ import annotations

import json
from pathlib import Path

import click

from wds_ocr.cli.base import (
    cli,
    config_options,
    fail,
    handle_errors,
    load_with_base,
)




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
