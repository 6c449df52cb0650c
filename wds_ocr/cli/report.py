"""The report command: one offline HTML page of a training run and where its detector fails."""

from __future__ import annotations

from pathlib import Path

import click

from wds_ocr.cli.base import cli, counter_bar, fail, handle_errors, plural, score_line


@cli.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--checkpoint", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Checkpoint to evaluate [RUN_DIR/best.pt, else RUN_DIR/last.pt].")
@click.option("--shards", help="Validation shards (folder, manifest or URL) [RUN_DIR/run.json's val_shards].")
@click.option("--source", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Evaluate through the live path on this source folder instead (with --split).")
@click.option("--split", default="val", show_default=True, help="Split of --source.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              help="Folder for index.html and its PNG files [RUN_DIR/report].")
@click.option("--worst", default=12, show_default=True, type=click.IntRange(0, 10000),
              help="How many of the worst images (by H-mean) to show with overlays.")
@click.option("--precision", type=click.Choice(["auto", "bf16-mixed", "16-mixed", "32"]),
              help="Autocast mode [the checkpoint's train.precision].")
@click.option("--batch-size", type=click.IntRange(1, 4096), help="Images per batch [loader.batch_size, 8].")
@click.option("--workers", type=click.IntRange(0, 256), help="Loader workers [loader.workers, 2].")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--set", "overrides", multiple=True, metavar="SECTION.FIELD=VALUE",
              help="Override a setting of the checkpoint's config, e.g. postprocess.box_thresh=0.5.")
@handle_errors
def report(run_dir: Path, checkpoint: Path | None, shards: str | None, source: Path | None, split: str,
           out: Path | None, worst: int, precision: str | None, batch_size: int | None, workers: int | None, device: str,
           quiet: bool, overrides: tuple[str, ...]) -> None:
    """Write one HTML page for RUN_DIR: learning curves, validations, the checkpoint's P/R/H (equal to
    evaluate's) and the worst images by H-mean with ground truth and detections drawn on them.

    Validation data: --shards, or --source DIR --split val, or else the val_shards that train wrote
    into RUN_DIR/run.json. The page (RUN_DIR/report/index.html by default) needs nothing online.
    """
    from wds_ocr.report import write_report

    if shards is not None and source is not None:
        fail("give at most one of --shards or --source", 2)
    bar, update = counter_bar(0, "report", quiet)
    try:
        result = write_report(run_dir, out, checkpoint=checkpoint, shards=shards, source=source, split=split,
                              worst=worst, device=device, batch_size=batch_size, workers=workers,
                              precision=precision, overrides=overrides, progress=update)
    finally:
        bar.close()
    for item in result.skipped:
        click.echo(f"skipped {item}", err=True)
    click.echo(score_line(result.score))
    click.echo(f"checkpoint {result.checkpoint} on {result.data}; "
               f"{plural(len(result.worst), 'worst image')} drawn, {plural(result.validations, 'validation')} "
               f"from metrics.jsonl")
    click.echo(f"wrote {result.index}")
