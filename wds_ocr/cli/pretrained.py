"""Commands for models that come from elsewhere or go elsewhere: import-ppocr, export."""

from __future__ import annotations

from pathlib import Path

import click

from wds_ocr.cli.base import cli, config_options, fail, handle_errors, plural


@cli.command("import-ppocr")
@click.option("--onnx", "onnx_file", type=click.Path(dir_okay=False, path_type=Path),
              help="The PP-OCRv4 detector's ONNX file [ch_PP-OCRv4_det_infer.onnx from the installed "
                   "rapidocr-onnxruntime].")
@click.option("--out", default=Path("pretrained/ppocrv4_det.pt"), show_default=True,
              type=click.Path(dir_okay=False, path_type=Path), help="The checkpoint to write.")
@config_options
@handle_errors
def import_ppocr(onnx_file: Path | None, out: Path, config_file: Path | None, overrides: tuple[str, ...]) -> None:
    """Turn PaddleOCR's PP-OCRv4 mobile detector into a wds-ocr checkpoint.

    The result evaluates and predicts like any checkpoint, and starts a fine-tuning run with
    `wds-ocr train --init OUT`. The model section is the detector's (pplcnetv3 backbone, rsefpn neck,
    96 channels, PaddleOCR's normalization); post-processing defaults to PaddleOCR's for it (box_thresh
    0.5, unclip_ratio 1.6); everything else comes from --config/--set, else the defaults (e.g.
    --set transform.size=1600 for receipts). The threshold head is not in the file (inference drops
    it): it starts as a copy of the probability head.
    """
    from wds_ocr.config import load_config
    from wds_ocr.model.ppocr import PPOCR_POSTPROCESS, WHEEL_MODEL, WHEEL_PACKAGE, import_ppocr as run_import
    from wds_ocr.model.ppocr import wheel_model_path
    from wds_ocr.run.checkpoint import save_checkpoint

    if onnx_file is None:
        onnx_file = wheel_model_path()
        if onnx_file is None:
            fail(f"no --onnx given and {WHEEL_PACKAGE} is not installed; install its wheel (it carries "
                 f"{WHEEL_MODEL.name}): pip install --no-deps rapidocr-onnxruntime==1.4.4, or pass --onnx FILE", 2)
    base = load_config(config_file, overrides, base={"postprocess": dict(PPOCR_POSTPROCESS)})
    config, state = run_import(onnx_file, base)
    save_checkpoint(out, {"config": config.model_dump(mode="json"), "model": state,
                          "source": {"onnx": str(onnx_file)}})
    tensors = sum(value.numel() for value in state.values())
    click.echo(f"imported {onnx_file} ({plural(len(state), 'tensor')}, {tensors:,} values) -> {out}\n"
               f"fine-tune it: wds-ocr train --init {out} --shards SHARDS --val-shards VAL")


@cli.command()
@click.option("--checkpoint", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="The .onnx file to write.")
@click.option("--check-size", default=640, show_default=True, type=click.IntRange(32, 4096),
              help="After writing, run the file (onnxruntime) and the checkpoint (torch) on a random image this "
                   "high and half as wide, and print the largest difference of their probabilities.")
@handle_errors
def export(checkpoint: Path, out: Path, check_size: int) -> None:
    """Write a checkpoint's detector as ONNX: uint8 RGB (N, H, W, 3) in, probability (N, 1, H, W) out.

    H and W: any multiples of 32. The model's normalization and the sigmoid are inside; the file's
    metadata holds the settings, so `wds-ocr predict --model OUT` resizes and post-processes as the
    checkpoint would.
    """
    from wds_ocr.infer.export import check_export, export_onnx
    from wds_ocr.run.checkpoint import open_checkpoint

    if check_size % 32:
        fail(f"--check-size must be a multiple of 32, got {check_size}", 2)
    opened = open_checkpoint(checkpoint)
    path = export_onnx(opened, out)
    click.echo(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
    difference = check_export(opened, path, check_size)
    click.echo(f"onnxruntime vs torch on a {check_size}-pixel-high random image: largest probability "
               f"difference {difference:.2e}")
