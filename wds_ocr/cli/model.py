"""Model commands: train, evaluate, predict."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from wds_ocr.cli.base import (
    cli,
    config_options,
    counter_bar,
    fail,
    train_bar,
    handle_errors,
    is_rank0,
    load_with_base,
    plural,
    score_line,
)


@cli.command()
@click.option("--shards", "train_shards", required=True, help="Training shards (folder, manifest or URL).")
@click.option("--val-shards", help="Validation shards; the best checkpoint is chosen by their H-mean.")
@click.option("--out", default=Path("runs/train"), show_default=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--resume", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Continue exactly from a checkpoint (last.pt), with its settings.")
@click.option("--init", "init", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Start from a checkpoint's model weights (and its model settings): a fresh optimizer, schedule "
                   "and step 0. E.g. the PP-OCRv4 detector from `wds-ocr import-ppocr`, or an earlier run's best.pt.")
@click.option("--init-partial", is_flag=True,
              help="With --init: load the weights that fit and keep the rest freshly initialized (each left-out "
                   "key is named), instead of refusing a checkpoint that does not fit the model.")
@click.option("--max-steps", type=click.IntRange(1),
              help="The run's length in optimizer steps (sets train.max_steps; the schedule spans it).")
@click.option("--stop-after", type=click.IntRange(1),
              help="Stop after this many optimizer steps in total, leaving last.pt to --resume (the schedule "
                   "is unchanged).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@config_options
@handle_errors
def train(train_shards: str, val_shards: str | None, out: Path, device: str, resume: Path | None,
          init: Path | None, init_partial: bool, max_steps: int | None, stop_after: int | None, quiet: bool,
          config_file: Path | None, overrides: tuple[str, ...]) -> None:
    """Train DBNet on shards (mixed precision per train.precision; torchrun for DDP).

    Settings start from those the shards were built with (with --resume: the checkpoint's; with
    --init: the shards', and the model section from the checkpoint); --config/--set go on top.
    Run several processes with: torchrun --nproc-per-node N -m wds_ocr train ...
    """
    from wds_ocr.storage.location import open_location
    from wds_ocr.shards.verify import config_from_manifest
    from wds_ocr.config import recorded
    from wds_ocr.run.checkpoint import load_checkpoint, open_checkpoint
    from wds_ocr.train.loop import train as run_training

    if init is not None and resume is not None:
        fail("--init and --resume cannot be combined: --resume continues a run (its weights, optimizer and "
             "position), --init starts a new one from a checkpoint's weights", 2)
    if init_partial and init is None:
        fail("--init-partial needs --init CHECKPOINT", 2)
    if max_steps is not None:
        overrides = (*overrides, f"train.max_steps={max_steps}")
    start = None
    if resume is not None:
        base = recorded(load_checkpoint(resume)["config"])
    else:
        manifest, _ = open_location(train_shards)
        base = config_from_manifest(manifest).model_dump(mode="json")
        if init is not None:
            start = open_checkpoint(init)
            base["model"] = start.config.model.model_dump(mode="json")
    config = load_with_base(base, config_file, overrides)
    if is_rank0():
        _write_run_record(out, train_shards, val_shards, resume, init)
    bar, progress = train_bar(quiet)
    try:
        result = run_training(config, train_shards, val_shards, out, device, resume, progress, stop_after,
                              init=start, init_partial=init_partial)
    finally:
        bar.close()
    if not is_rank0():
        return
    if result.init_fit is not None and not result.init_fit.exact:
        fit = result.init_fit
        click.echo(f"--init {init}: loaded {plural(len(fit.fitting), 'tensor')}; left at their fresh initialization "
                   f"or ignored: {fit.problems()}")
    best = f"; best H-mean {result.best_hmean:.4f} ({result.best_checkpoint})" if result.best_checkpoint else ""
    loss = f", final loss {result.final_loss:.4f}" if result.final_loss is not None else ""
    curves = out / "curves.png"
    click.echo(f"trained {plural(result.steps, 'step')} over {plural(result.epochs, 'epoch')} on "
               f"{plural(result.world_size, 'process', 'processes')} in "
               f"{result.seconds:.1f} s ({result.samples_per_s:.1f} samples/s, "
               f"{result.data_wait:.0%} of the time waiting for data){loss}\n"
               f"checkpoint: {result.last_checkpoint}{best}\nmetrics: {out / 'metrics.jsonl'}"
               + (f"\ncurves: {curves}" if curves.is_file() else ""))


def _write_run_record(out: Path, train_shards: str, val_shards: str | None, resume: Path | None,
                      init: Path | None = None) -> None:
    """RUN_DIR/run.json: where the run's data came from (``wds-ocr report`` finds the val shards there)."""
    import datetime

    from wds_ocr.report import RUN_FILE

    def where(location: str | None) -> str | None:
        if location is None or "://" in location:
            return location
        return str(Path(location).resolve())

    out.mkdir(parents=True, exist_ok=True)
    record = {"train_shards": where(train_shards), "val_shards": where(val_shards),
              "resumed_from": None if resume is None else str(resume.resolve()),
              "initialized_from": None if init is None else str(init.resolve()),
              "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    (out / RUN_FILE).write_text(json.dumps(record, indent=1) + "\n")


@cli.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="Where to write [RUN_DIR/curves.png].")
@handle_errors
def plot(run_dir: Path, out: Path | None) -> None:
    """Redraw RUN_DIR/curves.png (losses, learning rate, validation P/R/H) from its metrics.jsonl."""
    from wds_ocr.train.curves import plot_run

    click.echo(f"wrote {plot_run(run_dir, out)}")


class _PostWorkers(click.ParamType):
    """--post-workers: "auto" or a whole number 0..256."""

    name = "auto|N"

    def convert(self, value, param, ctx):
        if isinstance(value, int) or value is None:
            return value
        if str(value).strip().lower() == "auto":
            return "auto"
        try:
            number = int(value)
        except ValueError:
            self.fail(f"{value!r} is neither 'auto' nor a whole number", param, ctx)
        if not 0 <= number <= 256:
            self.fail(f"{number} is not in the range 0<=x<=256", param, ctx)
        return number


def _time_line(times) -> str:
    workers = (f"{plural(times.post_workers, 'post-processing worker')}" if times.post_workers
               else "post-processing in the main process")
    summed = " (summed over the workers)" if times.post_workers > 1 else ""
    device = "CUDA events" if times.device_timing == "cuda-events" else "wall time"
    return (f"time: data wait {times.data_wait_s:.2f} s, device {times.device_s:.2f} s ({device}; busy "
            f"{times.device_busy:.0%}), device wait {times.device_wait_s:.2f} s, post-processing "
            f"{times.postprocess_s:.2f} s, matching {times.matching_s:.2f} s{summed}, result wait "
            f"{times.result_wait_s:.2f} s, total {times.total_s:.2f} s; {workers}"
            + (f" (up after {times.worker_start_s:.2f} s; {plural(times.inline_images, 'image')} scored in the main "
               f"process meanwhile)" if times.post_workers else ""))


def _cleval_line(cleval) -> str:
    counts = cleval.counts
    return (f"CLEval: precision {cleval.precision:.4f}  recall {cleval.recall:.4f}  H-mean {cleval.hmean:.4f}  "
            f"({counts.char_gt} ground-truth / {counts.char_det} detected characters, {counts.splits} splits, "
            f"{counts.merges} merges)")


@cli.command()
@click.option("--checkpoint", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--shards", help="Evaluate on these shards (folder, manifest or URL).")
@click.option("--source", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Evaluate through the live path on this source folder instead (with --split).")
@click.option("--split", default="val", show_default=True, help="Split of --source.")
@click.option("--precision", type=click.Choice(["auto", "bf16-mixed", "16-mixed", "32"]),
              help="Autocast mode [the checkpoint's train.precision].")
@click.option("--batch-size", type=click.IntRange(1, 4096), help="Images per batch [loader.batch_size, 8].")
@click.option("--workers", type=click.IntRange(0, 256), help="Loader workers [loader.workers, 2].")
@click.option("--post-workers", type=_PostWorkers(),
              help="Processes that post-process and match while the model runs the next batch; 0: the main "
                   "process does it; auto: the usable cores minus --workers [evaluation.post_workers, auto].")
@click.option("--metric", type=click.Choice(["iou", "cleval"]), default="iou", show_default=True,
              help="iou: ICDAR 2015 IoU protocol; cleval: CLEval as well (needs the cleval extra).")
@click.option("--device", default="auto", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--set", "overrides", multiple=True, metavar="SECTION.FIELD=VALUE",
              help="Override a setting of the checkpoint's config, e.g. postprocess.box_thresh=0.5.")
@click.option("--sweep", "sweeps", multiple=True, metavar="FIELD=V1,V2,...",
              help="Also score every combination of these post-processing values on the same maps, e.g. "
                   "--sweep thresh=0.3,0.5,0.7 --sweep unclip_ratio=1.2,1.5 (fields: thresh, box_thresh, "
                   "unclip_ratio, min_size, min_unclip, glyph_height, glyph_size; at most 256 combinations); "
                   "prints the best as --set options.")
@click.option("--save-best", type=click.Path(dir_okay=False, path_type=Path),
              help="With --sweep: write a copy of the checkpoint (weights and config, no optimizer state) whose "
                   "postprocess section is the best setting found, for evaluate, predict and export.")
@handle_errors
def evaluate(checkpoint: Path, shards: str | None, source: Path | None, split: str, precision: str | None,
             batch_size: int | None, workers: int | None, post_workers, metric: str, device: str, as_json: bool,
             quiet: bool, overrides: tuple[str, ...], sweeps: tuple[str, ...], save_best: Path | None) -> None:
    """Precision, recall and H-mean (ICDAR 2015 IoU protocol, optionally CLEval) of a checkpoint, in
    original coordinates, with the time breakdown of the pass.

    With --sweep, the same probability maps are also post-processed and scored under each
    combination of the given values, to choose thresholds on a training split (never on the split
    you report)."""
    from dataclasses import asdict

    from wds_ocr.infer.evaluate import SWEEP_FIELDS, evaluate_shards, evaluate_source, postprocess_grid
    from wds_ocr.run.checkpoint import open_checkpoint

    if (shards is None) == (source is None):
        fail("give exactly one of --shards or --source", 2)
    if post_workers is not None:
        overrides = (*overrides, f"evaluation.post_workers={'null' if post_workers == 'auto' else post_workers}")
    opened = open_checkpoint(checkpoint)
    config = opened.configured(overrides)
    try:
        grid = postprocess_grid(config.postprocess, sweeps) if sweeps else []
    except ValueError as exc:
        fail(str(exc), 2)
    if save_best is not None and not sweeps:
        fail("--save-best needs --sweep (the settings to choose from)", 2)
    if save_best is not None and save_best.exists() and save_best.resolve() == checkpoint.resolve():
        fail(f"--save-best {save_best} is the checkpoint being evaluated; name another file", 2)
    precision = precision or config.train.precision
    bar, update = counter_bar(0, "evaluate", quiet or as_json)
    try:
        if shards is not None:
            result = evaluate_shards(opened, shards, config, precision, batch_size, workers, device, update,
                                     metric=metric, sweep=grid)
        else:
            result = evaluate_source(opened, source, split, config, precision, batch_size, workers, device, update,
                                     metric=metric, sweep=grid)
    finally:
        bar.close()
    if not is_rank0():
        return
    score = result.score
    ranked = sorted(result.sweep, key=lambda item: -item[1].hmean)  # stable: ties keep the grid's order
    if save_best is not None:
        from wds_ocr.run.checkpoint import save_checkpoint

        best = config.model_copy(update={"postprocess": ranked[0][0]})
        try:
            save_checkpoint(save_best, {"config": best.model_dump(mode="json"), "model": opened.body["model"],
                                        "source": {"checkpoint": str(checkpoint), "postprocess": "evaluate --sweep on "
                                                   + (str(shards) if shards is not None else f"{source} ({split})")}})
        except OSError as exc:
            fail(f"--save-best {save_best} cannot be written: {exc.strerror or exc}; name a file in a writable "
                 "folder", 1)
    if as_json:
        body = {"precision": score.precision, "recall": score.recall, "hmean": score.hmean, "matched": score.matched,
                "gt_care": score.gt_care, "det_care": score.det_care, "images": result.images,
                "seconds": result.seconds, "images_per_s": result.images_per_s, "precision_mode": result.mode,
                "postprocess_mode": result.postprocess_mode, "metric": metric, "times": result.times.as_dict(),
                "skipped": list(result.skipped), "coverage": result.coverage.as_dict(),
                "gt_left_out_for_size": result.coverage.left_out_for_size}
        if result.cleval is not None:
            body["cleval"] = {"precision": result.cleval.precision, "recall": result.cleval.recall,
                              "hmean": result.cleval.hmean, **asdict(result.cleval.counts)}
        if sweeps:
            body["sweep"] = [{"postprocess": {name: getattr(settings, name) for name in SWEEP_FIELDS},
                              "precision": s.precision, "recall": s.recall, "hmean": s.hmean, "matched": s.matched,
                              "gt_care": s.gt_care, "det_care": s.det_care} for settings, s in ranked]
        click.echo(json.dumps(body, indent=1, sort_keys=True))
        return
    for item in result.skipped:
        click.echo(f"skipped {item}", err=True)
    click.echo(score_line(score))
    if result.cleval is not None:
        click.echo(_cleval_line(result.cleval))
    click.echo(f"{result.images} images in {result.seconds:.1f} s ({result.images_per_s:.1f} images/s, {result.mode}, "
               f"post-processing mode {result.postprocess_mode})\n{_time_line(result.times)}")
    coverage = result.coverage
    if coverage.trainable:
        click.echo(f"ground truth: {coverage.trainable} words; {coverage.left_out_for_size} "
                   f"({coverage.size_share:.1%}) of them were left out of the training targets for size "
                   f"({coverage.too_small} too small, {coverage.shrink_vanished} vanished when shrunk): the "
                   "model was never trained on them")
    if ranked:
        _print_sweep(ranked, config.postprocess)
    if save_best is not None:
        click.echo(f"saved {save_best}: {checkpoint} with the best post-processing above")


def _print_sweep(ranked, current) -> None:
    from wds_ocr.infer.evaluate import SWEEP_FIELDS

    shown = ranked[:10]
    click.echo(f"sweep: {len(ranked)} post-processing settings on the same maps (IoU), best {len(shown)}:")
    click.echo("  " + "  ".join(f"{name:>12}" for name in SWEEP_FIELDS) + "  precision  recall  H-mean")
    for settings, s in shown:
        click.echo("  " + "  ".join(f"{getattr(settings, name):>12g}" for name in SWEEP_FIELDS)
                   + f"  {s.precision:9.4f}  {s.recall:6.4f}  {s.hmean:6.4f}")
    best = shown[0][0]
    changed = [name for name in SWEEP_FIELDS if getattr(best, name) != getattr(current, name)]
    if changed:
        click.echo("best: " + " ".join(f"--set postprocess.{name}={getattr(best, name):g}" for name in changed))
    else:
        click.echo("best: the settings in use")


@cli.command()
@click.option("--checkpoint", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="A wds-ocr checkpoint (run by torch).")
@click.option("--model", "onnx_model", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Or a file from `wds-ocr export` (run by onnxruntime on the CPU; the ppocr extra).")
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--precision", type=click.Choice(["auto", "bf16-mixed", "16-mixed", "32"]),
              help="Autocast mode [the checkpoint's train.precision].")
@click.option("--batch-size", default=4, show_default=True, type=click.IntRange(1, 1024))
@click.option("--device", default="auto", show_default=True)
@click.option("--no-overlay", is_flag=True, help="JSON only, no overlay PNGs.")
@click.option("--skip-bad", is_flag=True,
              help="Report unreadable images and go on instead of stopping (exit 0 if any image was predicted).")
@click.option("--set", "overrides", multiple=True, metavar="SECTION.FIELD=VALUE",
              help="Override a setting of the checkpoint's config, e.g. postprocess.box_thresh=0.5.")
@handle_errors
def predict(checkpoint: Path | None, onnx_model: Path | None, images: tuple[Path, ...], out: Path,
            precision: str | None, batch_size: int, device: str, no_overlay: bool, skip_bad: bool,
            overrides: tuple[str, ...]) -> None:
    """Detect text in IMAGES: <stem>.json (polygons in original coordinates) and <stem>.png overlays."""
    from wds_ocr.config import load_config
    from wds_ocr.infer.export import OnnxDetector
    from wds_ocr.infer.predict import predict as run_predict
    from wds_ocr.run.checkpoint import open_checkpoint

    if (checkpoint is None) == (onnx_model is None):
        fail("give exactly one of --checkpoint or --model", 2)
    if onnx_model is not None:
        opened = OnnxDetector(onnx_model)
        config = load_config(None, overrides, base=opened.config.model_dump(mode="json"))
    else:
        opened = open_checkpoint(checkpoint)
        config = opened.configured(overrides)
    result = run_predict(opened, list(images), out, config, precision or config.train.precision, batch_size,
                         device, overlay=not no_overlay, on_error="skip" if skip_bad else "raise")
    for item in result.failed:
        click.echo(f"skipped {item}", err=True)
    regions = sum(p.polygons for p in result.predictions)
    where = f"into {out}" if result.predictions else f"(nothing written to {out})"
    click.echo(f"{len(result.predictions)} images predicted {where}, {regions} text regions "
               f"({result.images_per_s:.1f} images/s); {len(result.failed)} skipped")
    if not result.predictions:
        sys.exit(1)  # with --skip-bad, skips that were reported are not failures, but an empty result is
