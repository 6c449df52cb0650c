"""wds-ocr report: one offline HTML page whose P/R/H are evaluate's, with the worst images drawn."""

from __future__ import annotations

import builtins
import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from wds_ocr.cli import cli
from wds_ocr.config import load_config
from wds_ocr.data.synth import synthesize
from wds_ocr.infer.evaluate import evaluate_shards
from wds_ocr.model.dbnet import DBNet
from wds_ocr.report import DET_COLOR, DONT_CARE_COLOR, GT_COLOR, ImageResult
from wds_ocr.run.checkpoint import save_checkpoint
from wds_ocr.shards.build import build_shards

torch.set_num_threads(2)

# A random tiny model at 64 px finds plenty of (mostly wrong) boxes with box_thresh 0.3: images with
# different H-means to rank. Same settings as infer/test_evaluate.py's RANDOM_MODEL.
SETTINGS = ["transform.size=64", "model.neck_channels=32", "postprocess.box_thresh=0.3", "loader.workers=0"]
ODD_NAME = "<b>rec&\"1'.jpg"
WORST = 3
IMAGES = 5  # synthesize(6, val_fraction=0) puts 5 receipts into train


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> dict[str, Path]:
    """Five synthetic receipts (one with HTML in its name) as val shards, a run folder with a random
    best.pt and a metrics.jsonl of two validations."""
    root = tmp_path_factory.mktemp("report")
    source = root / "data"
    synthesize(source, 6, seed=5, val_fraction=0.0, min_side=160, max_side=240)
    annotations = source / "jsons" / "train.json"
    doc = json.loads(annotations.read_text())
    first = sorted(doc["images"])[0]
    doc["images"][ODD_NAME] = doc["images"].pop(first)
    annotations.write_text(json.dumps(doc))
    (source / "images" / "train" / first).rename(source / "images" / "train" / ODD_NAME)
    config = load_config(None, SETTINGS)
    build_shards(source, "train", root / "shards", config)
    run = root / "run"
    run.mkdir()
    torch.manual_seed(0)
    save_checkpoint(run / "best.pt", {"config": config.model_dump(mode="json"), "model": DBNet(config.model).state_dict()})
    lines = [{"event": "train", "step": s, "epoch": s // 4, "loss": 3.0 / s, "bce": 0.5 / s, "l1": 0.1, "dice": 0.4,
              "lr": 1e-3} for s in range(1, 9)]
    lines.insert(4, {"event": "eval", "step": 4, "epoch": 0, "precision": 0.25, "recall": 0.5, "hmean": 1 / 3,
                     "matched": 1, "gt_care": 2, "det_care": 4, "images": 6})
    lines.append({"event": "eval", "step": 8, "epoch": 1, "precision": 0.5, "recall": 0.5, "hmean": 0.5,
                  "matched": 2, "gt_care": 4, "det_care": 4, "images": 6})
    (run / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return {"root": root, "source": source, "shards": root / "shards", "run": run}


@pytest.fixture(scope="module")
def report(run_dir) -> dict:
    out = run_dir["root"] / "page"
    result = CliRunner().invoke(cli, ["report", str(run_dir["run"]), "--shards", str(run_dir["shards"]), "--out",
                                      str(out), "--worst", str(WORST), "--device", "cpu", "--workers", "0",
                                      "--precision", "32", "--quiet"])
    assert result.exit_code == 0, result.output
    return {"out": out, "output": result.output, "html": (out / "index.html").read_text(encoding="utf-8"),
            "json": json.loads((out / "report.json").read_text())}


def test_the_page_shows_evaluates_precision_recall_and_hmean(run_dir, report):
    expected = evaluate_shards(run_dir["run"] / "best.pt", run_dir["shards"], precision="32", batch_size=8,
                               workers=0, device="cpu")
    score = expected.score
    # (A random model matches nothing: the images rank by missed words, then false detections.)
    assert score.det_care > 0 and score.gt_care > 0 and expected.images == IMAGES
    body = report["json"]
    assert {k: body[k] for k in ("precision", "recall", "hmean", "matched", "gt_care", "det_care", "images")} == \
           {"precision": score.precision, "recall": score.recall, "hmean": score.hmean, "matched": score.matched,
            "gt_care": score.gt_care, "det_care": score.det_care, "images": expected.images}
    page = report["html"]
    for name in ("precision", "recall", "hmean"):
        assert f'<td id="{name}">{getattr(score, name):.4f}</td>' in page
    assert (f"precision {score.precision:.4f}  recall {score.recall:.4f}  H-mean {score.hmean:.4f}  "
            f"({score.matched} matched / {score.gt_care} ground truth") in report["output"]
    # Per image too: the same counts as evaluate's, in the same order.
    by_index = sorted(body["per_image"], key=lambda r: r["index"])
    assert [(r["name"], r["matched"], r["gt_care"], r["det_care"], r["detections"]) for r in by_index] == \
           [(i.name, i.matched, i.gt_care, i.det_care, i.detections) for i in expected.per_image]


def test_the_worst_images_are_ranked_drawn_and_escaped(run_dir, report):
    out, page, body = report["out"], report["html"], report["json"]
    ranked = body["per_image"]
    keys = [(r["hmean"], -r["missed"], -r["false_detections"], r["name"], r["index"]) for r in ranked]
    assert keys == sorted(keys) and len(ranked) == IMAGES
    assert [w["name"] for w in body["worst"]] == [r["name"] for r in ranked[:WORST]]
    start = page.index('<table class="worst"')
    table = page[start : page.index("</table>", start)]
    assert table.count("<tr>") == WORST + 1  # header + one row per worst image
    overlays = re.findall(r'<img class="overlay" src="([^"]+)"', page)
    assert overlays == [f"worst-{i:03d}.png" for i in range(1, WORST + 1)]
    for name in overlays:
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        picture = cv2.imread(str(out / name))
        assert picture is not None and min(picture.shape[:2]) >= 100 and picture.std() > 5
    # Names come from user data: escaped everywhere (the odd one is in the table when it ranks worst).
    assert ODD_NAME not in page and "<b>" not in page
    assert html.escape(ODD_NAME, quote=True) in page or ODD_NAME not in [w["name"] for w in body["worst"]]
    # Offline: relative links only, nothing to fetch.
    assert not re.search(r"(src|href)=\"(https?:|file:|/)", page) and "<script" not in page
    # The legend explains the three colours the overlays use.
    for color in (GT_COLOR, DONT_CARE_COLOR, DET_COLOR):
        assert "#{:02x}{:02x}{:02x}".format(*color) in page
    assert "don&#x27;t-care ground truth" in page
    # Curves (drawn here when matplotlib is installed) and the validations of metrics.jsonl.
    assert page.count('<tr class="best">') == 1 and "<td>8</td><td>1</td><td>0.5000</td>" in page
    assert str(run_dir["run"] / "best.pt") in html.unescape(page) and "generated" in page


def test_an_odd_name_in_the_worst_table_is_escaped(run_dir, tmp_path):
    """Every image drawn: the odd name is certainly in the table, escaped."""
    result = CliRunner().invoke(cli, ["report", str(run_dir["run"]), "--shards", str(run_dir["shards"]), "--out",
                                      str(tmp_path), "--worst", "10", "--device", "cpu", "--workers", "0", "--quiet"])
    assert result.exit_code == 0, result.output
    page = (tmp_path / "index.html").read_text(encoding="utf-8")
    assert "&lt;b&gt;rec&amp;&quot;1&#x27;.jpg" in page and ODD_NAME not in page
    assert len(list(tmp_path.glob("worst-*.png"))) == IMAGES


def test_the_live_path_gives_the_same_page_numbers(run_dir, report, tmp_path):
    result = CliRunner().invoke(cli, ["report", str(run_dir["run"]), "--source", str(run_dir["source"]), "--split",
                                      "train", "--out", str(tmp_path), "--worst", str(WORST), "--device", "cpu",
                                      "--workers", "0", "--precision", "32", "--quiet"])
    assert result.exit_code == 0, result.output
    live = json.loads((tmp_path / "report.json").read_text())
    keys = ("precision", "recall", "hmean", "matched", "gt_care", "det_care", "images")
    assert {k: live[k] for k in keys} == {k: report["json"][k] for k in keys}
    assert [w["name"] for w in live["worst"]] == [w["name"] for w in report["json"]["worst"]]


def test_validation_data_comes_from_run_json_or_a_usage_error(run_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(run_dir["run"], run)
    common = ["--device", "cpu", "--workers", "0", "--quiet", "--worst", "1"]
    missing = CliRunner().invoke(cli, ["report", str(run), *common])
    assert missing.exit_code == 2
    assert "pass --shards VAL_SHARDS or --source DIR --split val" in missing.output
    assert f"{run / 'run.json'} does not exist" in missing.output and "Traceback" not in missing.output
    (run / "run.json").write_text(json.dumps({"train_shards": "x", "val_shards": None}))
    none = CliRunner().invoke(cli, ["report", str(run), *common])
    assert none.exit_code == 2 and "names no validation shards" in none.output
    (run / "run.json").write_text(json.dumps({"train_shards": "x", "val_shards": str(run_dir["shards"])}))
    named = CliRunner().invoke(cli, ["report", str(run), *common])
    assert named.exit_code == 0, named.output
    assert (run / "report" / "index.html").is_file() and (run / "report" / "worst-001.png").is_file()
    assert f"on shards {run_dir['shards']}" in named.output


def test_bad_inputs_are_one_clear_error(run_dir, tmp_path):
    runner = CliRunner()
    shards = ["--shards", str(run_dir["shards"]), "--device", "cpu", "--workers", "0", "--quiet"]
    empty = tmp_path / "empty"
    empty.mkdir()
    result = runner.invoke(cli, ["report", str(empty), *shards])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    assert f"error: {empty} holds no metrics.jsonl: give the --out folder of a training run" in result.output
    (empty / "metrics.jsonl").write_text("")
    result = runner.invoke(cli, ["report", str(empty), *shards])
    assert result.exit_code == 1 and f"error: {empty} holds neither best.pt nor last.pt: pass --checkpoint" in \
        result.output
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint\n")
    result = runner.invoke(cli, ["report", str(run_dir["run"]), "--checkpoint", str(text), *shards])
    assert result.exit_code == 1 and "is not a torch checkpoint" in result.output
    result = runner.invoke(cli, ["report", str(run_dir["run"]), "--shards", str(tmp_path / "nowhere"), "--quiet"])
    assert result.exit_code == 1 and f"error: {tmp_path / 'nowhere' / 'manifest.json'} does not exist" in \
        result.output
    result = runner.invoke(cli, ["report", str(run_dir["run"]), *shards, "--source", str(run_dir["source"])])
    assert result.exit_code == 2 and "error: give at most one of --shards or --source" in result.output
    result = runner.invoke(cli, ["report", str(tmp_path / "absent"), *shards])
    assert result.exit_code == 2 and "does not exist" in result.output


def test_without_matplotlib_the_page_copies_the_runs_curves_or_says_how(run_dir, tmp_path, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(run_dir["run"], run)
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    common = ["--shards", str(run_dir["shards"]), "--device", "cpu", "--workers", "0", "--quiet", "--worst", "1"]
    result = CliRunner().invoke(cli, ["report", str(run), *common])
    assert result.exit_code == 0, result.output
    page = (run / "report" / "index.html").read_text()
    assert "matplotlib is not installed" in page and "pip install &#x27;wds-ocr[plot]&#x27;" in page
    assert f"wds-ocr plot {run}" in html.unescape(page) and not (run / "report" / "curves.png").exists()
    (run / "curves.png").write_bytes((run_dir["root"] / "page" / "worst-001.png").read_bytes())  # any PNG
    result = CliRunner().invoke(cli, ["report", str(run), *common])
    assert result.exit_code == 0, result.output
    page = (run / "report" / "index.html").read_text()
    assert '<img id="curves" src="curves.png"' in page and "Copied from" in page
    assert (run / "report" / "curves.png").read_bytes() == (run / "curves.png").read_bytes()


def test_per_image_hmean_and_ranking():
    empty = ImageResult(0, "a", None, 0, 0, 0, 0, 0)
    assert empty.hmean == 1.0 and empty.precision is None and empty.recall is None
    missed = ImageResult(1, "b", None, 0, 3, 0, 0, 0)
    false = ImageResult(2, "c", None, 0, 0, 2, 2, 0)
    half = ImageResult(3, "d", None, 2, 4, 4, 5, 1)
    assert missed.hmean == false.hmean == 0.0 and half.hmean == 0.5 and half.precision == half.recall == 0.5
    ranked = sorted([empty, half, false, missed], key=ImageResult.rank_key)
    assert [r.name for r in ranked] == ["b", "c", "d", "a"]  # lowest H, then most missed words


# ---------------------------------------------------------------- a real browser

CHROMIUM = next((path for path in (shutil.which("chromium"), shutil.which("chromium-browser"),
                                   shutil.which("google-chrome")) if path), None)
# After the load event: how many images the page has and how many decoded (naturalWidth > 0).
PROBE = ("<script>window.addEventListener('load', () => { const all = Array.from(document.images); "
         "document.body.setAttribute('data-images', all.length); document.body.setAttribute('data-loaded', "
         "all.filter(i => i.complete && i.naturalWidth > 0).length); });</script>")


def _chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                           "--disable-background-networking", "--disable-component-update", "--disable-sync",
                           f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1280,2000", *args],
                          capture_output=True, text=True, timeout=90)


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium/chrome on PATH to render the page with")
def test_a_headless_browser_renders_the_page_with_its_images(report, tmp_path):
    out = report["out"]
    shot = tmp_path / "page.png"
    done = _chromium(tmp_path, f"--screenshot={shot}", (out / "index.html").as_uri())
    assert shot.is_file(), done.stderr[-2000:]
    picture = cv2.cvtColor(cv2.imread(str(shot)), cv2.COLOR_BGR2RGB)
    assert picture.shape[:2] == (2000, 1280)
    not_white = (picture < 235).any(axis=2).mean()
    colours = len(np.unique((picture // 16).reshape(-1, 3), axis=0))
    assert not_white > 0.05 and colours > 50, (not_white, colours)  # text, tables, curves, pictures: not blank
    # The overlays decoded: a copy of the page with a probe script (same folder, same relative links)
    # reports after the load event how many of its images have pixels.
    probe = out / "probe.html"
    probe.write_text(report["html"].replace("</body>", PROBE + "</body>"), encoding="utf-8")
    try:
        dom = _chromium(tmp_path, "--dump-dom", probe.as_uri()).stdout
    finally:
        probe.unlink()
    images = re.search(r'data-images="(\d+)"', dom)
    loaded = re.search(r'data-loaded="(\d+)"', dom)
    assert images and loaded, dom[:2000]
    expected = WORST + (1 if (out / "curves.png").is_file() else 0)
    assert int(images.group(1)) == int(loaded.group(1)) == expected


@pytest.mark.parametrize("post_workers", [0, 2])
def test_counts_come_from_evaluates_run_and_the_pictures_redraw_the_same_detections(run_dir, post_workers):
    """The report counts through run_detection (inline or in scoring workers); each worst image's
    record is read again and its detections made again on its batch's window: as many as counted."""
    from wds_ocr.report.images import batches_from_shards, batches_from_source, evaluate_images
    from wds_ocr.run.checkpoint import open_checkpoint

    checkpoint = open_checkpoint(run_dir["run"] / "best.pt")
    config = checkpoint.configured(["loader.batch_size=2", "evaluation.crop_to_content=true"])
    runs = []
    for make in (lambda s: batches_from_shards(str(run_dir["shards"]), config.loader, s),
                 lambda s: batches_from_source(run_dir["source"], "train", config, config.loader, s)):
        batches, total, fetch = make([])
        results, kept = evaluate_images(checkpoint, batches, config, "32", torch.device("cpu"), IMAGES, fetch,
                                        post_workers=post_workers, capacity=2, total=total)
        assert total == len(results) == len(kept) == IMAGES
        assert [len(k.detections) for k in kept] == [k.result.detections for k in kept]
        assert sum(k.result.detections for k in kept) > IMAGES  # the random model finds boxes
        runs.append([(r.name, r.matched, r.gt_care, r.det_care) for r in results])
    assert runs[0] == runs[1]  # shards and the live path: the same counts
