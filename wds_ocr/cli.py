"""The ``wds-ocr`` command line. The only module that prints to the user or picks exit codes.

Commands import their modules lazily so ``wds-ocr --help`` stays fast and light.
Exit codes: 0 success, 1 a problem found or an operation failed, 2 bad usage or configuration.
"""

from __future__ import annotations

import functools
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Callable

import click

from wds_ocr.errors import WdsOcrError


def _fail(message: str, code: int) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def handle_errors(func: Callable) -> Callable:
    """Turn package errors into one clear message and their exit code."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except WdsOcrError as exc:
            _fail(str(exc), exc.exit_code)
        except KeyboardInterrupt:
            _fail("interrupted", 130)

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


def _load(config_file: Path | None, overrides: tuple[str, ...]):
    from wds_ocr.config import load_config

    return load_config(config_file, overrides)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="wds-ocr")
def cli() -> None:
    """Text-detection data prepared once, offline, into verifiable WebDataset shards,
    streamed to a mixed-precision DBNet trainer."""


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
        _fail(str(exc), 2)
    splits = ", ".join(f"{name} {n}" for name, n in summary.counts.items())
    click.echo(f"wrote {sum(summary.counts.values())} receipts to {out} ({splits}); "
               f"{summary.words} words, {summary.exif_tagged} stored with an EXIF orientation tag")


@cli.command("build-shards")
@click.argument("source", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--split", required=True, help="Split folder to build, e.g. train or val.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), help="Output folder [shards/<split>].")
@click.option("--workers", default=1, show_default=True, type=click.IntRange(1, 512), help="Worker processes.")
@click.option("--partition", help="Build only part i of n (i from 0), e.g. 0/4; join with wds-ocr merge.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@config_options
@handle_errors
def build_shards_command(source: Path, split: str, out: Path | None, workers: int, partition: str | None,
                         quiet: bool, config_file: Path | None, overrides: tuple[str, ...]) -> None:
    """Pre-transform SOURCE's SPLIT into WebDataset shards with a manifest."""
    from tqdm import tqdm

    from wds_ocr.shards.build import Partition, build_shards

    config = _load(config_file, overrides)
    out = out or Path("shards") / split
    part = Partition.parse(partition) if partition else None
    started = time.perf_counter()
    bar = None

    def progress(p) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=p.total, initial=p.done - 1, unit="sample", desc="build", disable=quiet, file=sys.stderr)
        bar.update(1)
        bar.set_postfix(written=p.written, rejected=p.rejected, refresh=False)

    try:
        result = build_shards(source, split, out, config, workers=workers, partition=part, progress=progress)
    finally:
        if bar is not None:
            bar.close()
    elapsed = time.perf_counter() - started
    counts = result.manifest.counts
    if result.up_to_date:
        click.echo(f"{result.manifest_path} is up to date ({counts['written']} samples in "
                   f"{len(result.manifest.shards)} shards); nothing to do")
        return
    nbytes = sum(entry.bytes for entry in result.manifest.shards)
    click.echo(
        f"samples in {counts['samples_in']}: written {counts['written']}, rejected {counts['rejected']}; "
        f"words skipped {counts['words_skipped']}\n"
        f"{len(result.manifest.shards)} shards, {nbytes / 1e6:.1f} MB"
        f"{f', {result.reused_shards} reused from an earlier run' if result.reused_shards else ''}; "
        f"{elapsed:.1f} s ({counts['written'] / max(elapsed, 1e-9):.1f} samples/s)\n"
        f"manifest: {result.manifest_path}"
    )
    if counts["rejected"] or counts["words_skipped"]:
        reasons: dict[str, int] = {}
        for item in result.rejects:
            group = f"{item['kind']}: {_reason_group(item['reason'])}"
            reasons[group] = reasons.get(group, 0) + 1
        for reason, n in sorted(reasons.items(), key=lambda kv: -kv[1])[:10]:
            click.echo(f"  {n:5d} x {reason}")
        click.echo(f"details: {result.rejects_path}")


def _reason_group(reason: str) -> str:
    """A reason without its file/line prefix, numbers and details, for counting similar ones."""
    reason = re.sub(r"^\S+ line \d+: ", "", reason)
    reason = re.sub(r"-?\d+(\.\d+)?", "#", reason)
    return reason.split(":")[0].split(" (")[0]


@cli.command()
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
@handle_errors
def merge(folder: Path) -> None:
    """Join the part manifests of a partitioned build in FOLDER into manifest.json."""
    from wds_ocr.shards.merge import merge_parts

    manifest, path = merge_parts(folder)
    click.echo(f"merged {manifest.counts['written']} samples in {len(manifest.shards)} shards into {path}")


@cli.command()
@click.argument("shards", type=click.Path(exists=True, path_type=Path))
@click.option("--against-source", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Re-run the live pipeline on this source and require bit-equal records.")
@click.option("--sample", type=click.IntRange(1), help="With --against-source: compare K random records only.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed for --sample.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@config_options
@handle_errors
def verify(shards: Path, against_source: Path | None, sample: int | None, seed: int, as_json: bool,
           config_file: Path | None, overrides: tuple[str, ...]) -> None:
    """Check SHARDS (folder or manifest): hashes, tar structure, records, staleness.

    Staleness is checked against the code's pipeline version, and against --config/--set
    when given. Exit 1 on any problem.
    """
    from wds_ocr.shards.verify import verify_shards

    config = _load(config_file, overrides) if (config_file or overrides) else None
    report = verify_shards(shards, config, against_source, sample, seed)
    if as_json:
        click.echo(json.dumps(report.as_dict(), indent=1, sort_keys=True))
    else:
        for problem in report.problems:
            click.echo(problem.line())
        compared = f", {report.compared_with_source} equal-checked against the source" if against_source else ""
        verdict = "OK" if report.ok else f"{len(report.problems)} problem(s)" + (" (stale)" if report.stale else "")
        click.echo(f"{report.shards_checked} shards, {report.samples_checked} records checked{compared}: {verdict}")
    sys.exit(0 if report.ok else 1)


@cli.command()
@click.argument("shards", type=click.Path(exists=True, path_type=Path))
@click.option("--key", help="Show this record (default: the first).")
@click.option("--png", type=click.Path(dir_okay=False, path_type=Path), help="Write image | polygons | gt | thresh_map.")
@handle_errors
def inspect(shards: Path, key: str | None, png: Path | None) -> None:
    """Counts, sizes, dtypes and bytes per sample of SHARDS; optionally a PNG of one record."""
    from wds_ocr.shards.inspect import inspect_shards

    summary = inspect_shards(shards, key, png)
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
@click.option("--no-stock", is_flag=True, help="Skip the stock-webdataset (.npy members) comparison.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
@config_options
@handle_errors
def bench(source: Path, shards: Path, split: str | None, workers: int, batch_size: int, min_seconds: float,
          no_stock: bool, as_json: bool, config_file: Path | None, overrides: tuple[str, ...]) -> None:
    """Side by side: the live per-epoch path on SOURCE against streaming --shards."""
    from wds_ocr.bench import run_bench
    from wds_ocr.shards.manifest import load_manifest
    from wds_ocr.shards.verify import config_from_manifest

    manifest = load_manifest(shards)
    config = _load(config_file, overrides) if (config_file or overrides) else config_from_manifest(manifest)
    if config.fingerprint() != manifest.fingerprint:
        _fail("the live path would not produce these shards (settings differ); pass the config they were built "
              "with, or omit --config/--set to take it from the manifest", 2)
    split = split or manifest.source["split"]
    result = run_bench(source, split, shards, config, workers, batch_size, min_seconds, not no_stock,
                       progress=None if as_json else lambda text: click.echo(f"... {text}", err=True))
    if as_json:
        click.echo(json.dumps(result.as_dict(), indent=1, sort_keys=True))
        return
    rows = [result.live, result.shards, result.shards_processes]
    rows += [result.stock_webdataset] if result.stock_webdataset else []
    click.echo(f"{result.samples_per_epoch} samples per epoch, batch {batch_size}, {workers} workers; "
               f"normalization: {result.normalize_on}")
    click.echo(f"{'path':22s} {'samples/s':>10s} {'MB/s':>9s} {'1st batch s':>11s} {'peak RSS MB':>11s} {'epochs':>6s}")
    for row in rows:
        click.echo(f"{row.name:22s} {row.samples_per_second:10.1f} {row.mb_per_second:9.1f} "
                   f"{row.first_batch_seconds:11.3f} {row.peak_rss_mb:11.0f} {row.epochs:6d}")
    click.echo(f"raw sequential read of the shard files: {result.raw_read_mb_per_second:.0f} MB/s")
    click.echo(f"shards / live: {result.speedup:.1f}x samples/s; shard loader reads at "
               f"{100 * result.raw_fraction:.0f}% of the raw read rate")
    if result.stock_webdataset:
        click.echo(f"shards / stock webdataset (.npy): "
                   f"{result.shards.samples_per_second / max(result.stock_webdataset.samples_per_second, 1e-12):.1f}x")


def _plural(count: int, one: str, many: str | None = None) -> str:
    return f"{count} {one if count == 1 else many or one + 's'}"


def _is_rank0() -> bool:
    """Under torchrun only rank 0 talks to the user."""
    return int(os.environ.get("RANK", "0")) == 0


def _score_line(score) -> str:
    return (f"precision {score.precision:.4f}  recall {score.recall:.4f}  H-mean {score.hmean:.4f}  "
            f"({score.matched} matched / {score.gt_care} ground truth / {score.det_care} detections, "
            f"{score.images} images)")


def _counter_bar(total: int, desc: str, quiet: bool):
    """A tqdm bar driven by (done, total) callbacks."""
    from tqdm import tqdm

    bar = tqdm(total=total or None, unit="img", desc=desc, disable=quiet or not _is_rank0(), file=sys.stderr)

    def update(done: int, count: int) -> None:
        if count and bar.total != count:
            bar.total = count
        bar.n = done
        bar.refresh()

    return bar, update


@cli.command()
@click.option("--shards", "train_shards", required=True, help="Training shards (folder, manifest or URL).")
@click.option("--val-shards", help="Validation shards; the best checkpoint is chosen by their H-mean.")
@click.option("--out", default=Path("runs/train"), show_default=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--resume", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Continue exactly from a checkpoint (last.pt).")
@click.option("--max-steps", type=click.IntRange(1), help="Stop after this many optimizer steps in total.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@config_options
@handle_errors
def train(train_shards: str, val_shards: str | None, out: Path, device: str, resume: Path | None,
          max_steps: int | None, quiet: bool, config_file: Path | None, overrides: tuple[str, ...]) -> None:
    """Train DBNet on shards (mixed precision per train.precision; torchrun for DDP).

    Settings start from those the shards were built with; --config/--set go on top. Run several
    processes with: torchrun --nproc-per-node N -m wds_ocr train ...
    """
    from tqdm import tqdm

    from wds_ocr.loader.remote import open_location
    from wds_ocr.shards.verify import config_from_manifest
    from wds_ocr.train.loop import train as run_training

    manifest, _ = open_location(train_shards)
    base = config_from_manifest(manifest).model_dump(mode="json")
    config = _load_with_base(base, config_file, overrides)
    bar = tqdm(unit="step", desc="train", disable=quiet or not _is_rank0(), file=sys.stderr)

    def progress(p) -> None:
        if p.event == "train":
            bar.total = p.total_steps
            bar.n = p.step
            bar.set_postfix(epoch=p.epoch, loss=f"{p.loss:.4f}", lr=f"{p.lr:.2e}",
                            samples_s=f"{p.samples_per_s:.1f}", data_wait=f"{p.data_wait:.0%}", refresh=False)
            bar.refresh()
        elif p.score is not None:
            bar.write(f"epoch {p.epoch} validation: {_score_line(p.score)}", file=sys.stderr)

    try:
        result = run_training(config, train_shards, val_shards, out, device, resume, progress, max_steps)
    finally:
        bar.close()
    if not _is_rank0():
        return
    best = f"; best H-mean {result.best_hmean:.4f} ({result.best_checkpoint})" if result.best_checkpoint else ""
    loss = f", final loss {result.final_loss:.4f}" if result.final_loss is not None else ""
    click.echo(f"trained {_plural(result.steps, 'step')} over {_plural(result.epochs, 'epoch')} on "
               f"{_plural(result.world_size, 'process', 'processes')} in "
               f"{result.seconds:.1f} s ({result.samples_per_s:.1f} samples/s, "
               f"{result.data_wait:.0%} of the time waiting for data){loss}\n"
               f"checkpoint: {result.last_checkpoint}{best}\nmetrics: {out / 'metrics.jsonl'}")


def _load_with_base(base: dict, config_file: Path | None, overrides: tuple[str, ...]):
    from wds_ocr.config import load_config

    return load_config(config_file, overrides, base=base)


@cli.command()
@click.option("--checkpoint", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--shards", help="Evaluate on these shards (folder, manifest or URL).")
@click.option("--source", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Evaluate through the live path on this source folder instead (with --split).")
@click.option("--split", default="val", show_default=True, help="Split of --source.")
@click.option("--precision", type=click.Choice(["bf16-mixed", "16-mixed", "32"]),
              help="Autocast mode [the checkpoint's train.precision].")
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(1, 4096))
@click.option("--workers", default=2, show_default=True, type=click.IntRange(0, 256))
@click.option("--device", default="auto", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--set", "overrides", multiple=True, metavar="SECTION.FIELD=VALUE",
              help="Override a setting of the checkpoint's config, e.g. postprocess.box_thresh=0.5.")
@handle_errors
def evaluate(checkpoint: Path, shards: str | None, source: Path | None, split: str, precision: str | None,
             batch_size: int, workers: int, device: str, as_json: bool, quiet: bool,
             overrides: tuple[str, ...]) -> None:
    """Precision, recall and H-mean (ICDAR 2015 IoU protocol) of a checkpoint, in original coordinates."""
    from wds_ocr.infer.evaluate import evaluate_shards, evaluate_source
    from wds_ocr.train.checkpoint import config_from_checkpoint

    if (shards is None) == (source is None):
        _fail("give exactly one of --shards or --source", 2)
    config = config_from_checkpoint(checkpoint, overrides)
    precision = precision or config.train.precision
    bar, update = _counter_bar(0, "evaluate", quiet or as_json)
    try:
        if shards is not None:
            result = evaluate_shards(checkpoint, shards, config, precision, batch_size, workers, device, update)
        else:
            result = evaluate_source(checkpoint, source, split, config, precision, batch_size, workers, device, update)
    finally:
        bar.close()
    if not _is_rank0():
        return
    score = result.score
    if as_json:
        body = {"precision": score.precision, "recall": score.recall, "hmean": score.hmean, "matched": score.matched,
                "gt_care": score.gt_care, "det_care": score.det_care, "images": result.images,
                "seconds": result.seconds, "images_per_s": result.images_per_s, "precision_mode": result.mode,
                "skipped": list(result.skipped)}
        click.echo(json.dumps(body, indent=1, sort_keys=True))
        return
    for item in result.skipped:
        click.echo(f"skipped {item}", err=True)
    click.echo(f"{_score_line(score)}\n{result.images} images in {result.seconds:.1f} s "
               f"({result.images_per_s:.1f} images/s, {result.mode})")


@cli.command()
@click.option("--checkpoint", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--precision", type=click.Choice(["bf16-mixed", "16-mixed", "32"]),
              help="Autocast mode [the checkpoint's train.precision].")
@click.option("--batch-size", default=4, show_default=True, type=click.IntRange(1, 1024))
@click.option("--device", default="auto", show_default=True)
@click.option("--no-overlay", is_flag=True, help="JSON only, no overlay PNGs.")
@click.option("--skip-bad", is_flag=True, help="Report unreadable images and go on instead of stopping.")
@click.option("--set", "overrides", multiple=True, metavar="SECTION.FIELD=VALUE",
              help="Override a setting of the checkpoint's config, e.g. postprocess.box_thresh=0.5.")
@handle_errors
def predict(checkpoint: Path, images: tuple[Path, ...], out: Path, precision: str | None, batch_size: int,
            device: str, no_overlay: bool, skip_bad: bool, overrides: tuple[str, ...]) -> None:
    """Detect text in IMAGES: <stem>.json (polygons in original coordinates) and <stem>.png overlays."""
    from wds_ocr.infer.predict import predict as run_predict
    from wds_ocr.train.checkpoint import config_from_checkpoint

    config = config_from_checkpoint(checkpoint, overrides)
    result = run_predict(checkpoint, list(images), out, config, precision or config.train.precision, batch_size,
                         device, overlay=not no_overlay, on_error="skip" if skip_bad else "raise")
    for item in result.failed:
        click.echo(f"skipped {item}", err=True)
    regions = sum(p.polygons for p in result.predictions)
    click.echo(f"{len(result.predictions)} images predicted into {out}, {regions} text regions "
               f"({result.images_per_s:.1f} images/s); {len(result.failed)} skipped")
    if result.failed:
        sys.exit(1)


# The demo's settings: small receipts at 128 px so a CPU trains a useful model in about a minute.
DEMO_SETTINGS = (
    "transform.size=128",
    "shards.max_samples=8",
    "model.neck_channels=64",
    "loader.batch_size=4",
    "augment.affine=false",
    "augment.hflip=0.0",
    "train.epochs=30",
    "train.lr=0.01",
    "train.warmup_steps=10",
    "train.precision=32",
    "train.eval_every=0",
    "postprocess.box_thresh=0.5",
)


@cli.command()
@click.option("--out", default=Path("demo"), show_default=True, type=click.Path(file_okay=False, path_type=Path),
              help="Working folder (data/, shards/, run/); reused if it exists.")
@click.option("--n", "count", default=32, show_default=True, type=click.IntRange(4), help="Synthetic receipts.")
@click.option("--workers", default=2, show_default=True, type=click.IntRange(1, 64))
@click.option("--device", default="auto", show_default=True)
@click.option("--set", "overrides", multiple=True, metavar="SECTION.FIELD=VALUE",
              help="Change a demo setting, e.g. train.epochs=5.")
@handle_errors
def demo(out: Path, count: int, workers: int, device: str, overrides: tuple[str, ...]) -> None:
    """The whole story on built-in synthetic receipts:
    synth -> build-shards -> verify -> train -> evaluate (shards and live path)."""
    from wds_ocr.config import load_config
    from wds_ocr.data.synth import synthesize
    from wds_ocr.infer.evaluate import evaluate_shards, evaluate_source
    from wds_ocr.shards.build import build_shards
    from wds_ocr.shards.verify import verify_shards
    from wds_ocr.train.loop import train as run_training

    config = load_config(None, DEMO_SETTINGS + overrides)
    data, shards, run = out / "data", out / "shards", out / "run"
    timings: list[tuple[str, float]] = []

    def stage(name: str):
        click.echo(f"== {name}")
        timings.append((name, time.perf_counter()))

    stage("synth")
    if (data / "jsons").is_dir():
        click.echo(f"reusing {data}")
    else:
        try:
            summary = synthesize(data, count, seed=0, min_side=160, max_side=256)
        except ValueError as exc:
            _fail(str(exc), 2)
        click.echo(f"{sum(summary.counts.values())} receipts ({summary.counts}), {summary.words} words, "
                   f"{summary.exif_tagged} with EXIF orientation tags")
    stage("build-shards")
    for split in ("train", "val"):
        result = build_shards(data, split, shards / split, config, workers=workers)
        counts = result.manifest.counts
        state = "up to date" if result.up_to_date else f"{len(result.manifest.shards)} shards"
        click.echo(f"{split}: {counts['written']} written, {counts['rejected']} rejected ({state})")
    stage("verify")
    for split in ("train", "val"):
        report = verify_shards(shards / split, config, against_source=data)
        for problem in report.problems:
            click.echo(problem.line())
        click.echo(f"{split}: {report.samples_checked} records, {report.compared_with_source} bit-equal to the live "
                   f"pipeline: {'OK' if report.ok else 'PROBLEMS'}")
        if not report.ok:
            sys.exit(1)
    stage("train")
    trained = run_training(config, shards / "train", None, run, device)
    click.echo(f"{trained.steps} steps, {trained.samples_per_s:.1f} samples/s, "
               f"{trained.data_wait:.0%} waiting for data, final loss {trained.final_loss:.4f}")
    stage("evaluate")
    from_shards = evaluate_shards(trained.last_checkpoint, shards / "val", config, config.train.precision,
                                  device=device)
    live = evaluate_source(trained.last_checkpoint, data, "val", config, config.train.precision, device=device)
    click.echo(f"val from shards:    {_score_line(from_shards.score)}")
    click.echo(f"val from live path: {_score_line(live.score)}")
    same = from_shards.score == live.score
    click.echo(f"shards and live path agree: {'yes' if same else 'NO'}")
    timings.append(("end", time.perf_counter()))
    click.echo("== timings")
    for (name, started), (_, ended) in zip(timings, timings[1:]):
        click.echo(f"{name:14s} {ended - started:7.1f} s")
    click.echo(f"val H-mean: {from_shards.score.hmean:.4f}  (checkpoint {trained.last_checkpoint})")
    if not same:
        sys.exit(1)


def main() -> None:
    cli(prog_name="wds-ocr")
