"""The demo: the whole story on built-in synthetic receipts."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click

from wds_ocr.cli.base import cli, fail, handle_errors, load_with_base, score_line, shards_phrase, train_bar

# The demo's settings: small receipts at 128 px so a CPU trains a useful model in about a minute.
# Its synthetic receipts are annotated by word, as scene text is, so they keep MhLiao/DB's target
# and post-processing settings; the package defaults suit real receipts annotated by line (README).
DEMO_SETTINGS = (
    "transform.size=128",
    "targets.shrink_ratio=0.4",
    "targets.min_text_size=8",
    "postprocess.min_size=3",
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

    config = load_with_base(load_config(None, DEMO_SETTINGS).model_dump(mode="json"), None, overrides)
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
            fail(str(exc), 2)
        splits = ", ".join(f"{name} {n}" for name, n in summary.counts.items())
        click.echo(f"{sum(summary.counts.values())} receipts ({splits}), {summary.words} words, "
                   f"{summary.exif_tagged} stored with an EXIF orientation tag")
    stage("build-shards")
    for split in ("train", "val"):
        # The demo's own folder: shards an older wds-ocr or other --set values built are rebuilt.
        result = build_shards(data, split, shards / split, config, workers=workers, overwrite=True)
        counts = result.manifest.counts
        state = "up to date, reused" if result.up_to_date else "built"
        click.echo(f"{split}: {counts.written} written, {counts.rejected} rejected; "
                   f"{shards_phrase(result.manifest)}, {state}")
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
    bar, progress = train_bar(quiet=False)
    try:
        trained = run_training(config, shards / "train", None, run, device, progress=progress)
    finally:
        bar.close()
    click.echo(f"{trained.steps} steps, {trained.samples_per_s:.1f} samples/s, "
               f"{trained.data_wait:.0%} waiting for data, final loss {trained.final_loss:.4f}")
    stage("evaluate")
    from_shards = evaluate_shards(trained.last_checkpoint, shards / "val", config, config.train.precision,
                                  device=device)
    live = evaluate_source(trained.last_checkpoint, data, "val", config, config.train.precision, device=device)
    click.echo(f"val from shards:    {score_line(from_shards.score)}")
    click.echo(f"val from live path: {score_line(live.score)}")
    same = from_shards.score == live.score
    click.echo(f"shards and live path agree: {'yes' if same else 'NO'}")
    timings.append(("end", time.perf_counter()))
    click.echo("== timings")
    for (name, started), (_, ended) in zip(timings, timings[1:]):
        click.echo(f"{name:14s} {ended - started:7.1f} s")
    click.echo(f"val H-mean: {from_shards.score.hmean:.4f}  (checkpoint {trained.last_checkpoint})")
    if not same:
        sys.exit(1)
