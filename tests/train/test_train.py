"""Tests for wds_ocr.train: overfitting a few receipts, exact resume, checkpoints, schedule, bf16 loss."""

from __future__ import annotations

import json
import math
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from wds_ocr.config import Config, load_config
from wds_ocr.data.synth import synthesize
from wds_ocr.errors import CheckpointError, ConfigError, StaleShardsError
from wds_ocr.infer.evaluate import evaluate_shards, evaluate_source
from wds_ocr.loader.device import prepare, to_device
from wds_ocr.loader.stream import ShardStream
from wds_ocr.model.backbones import resolve_model
from wds_ocr.model.dbnet import DBNet
from wds_ocr.model.loss import DBLoss
from wds_ocr.shards.build import build_shards
from wds_ocr.run.checkpoint import (BEST_NAME, LAST_NAME, load_checkpoint, load_model, restore_rng_state,
                                    rng_state, save_checkpoint)
from wds_ocr.train.log import read_metrics
from wds_ocr.train.loop import TrainProgress, train
from wds_ocr.run.runtime import autocast
from wds_ocr.train.schedule import LrSchedule

torch.set_num_threads(2)

# Four small receipts (160..176 px, text ~13-24 px high) at 128 px: big enough text for DB's shrunk
# kernels, small enough for ~0.3 s per step on two CPU cores. They keep MhLiao/DB's target and
# post-processing settings (shrink 0.4, min_text_size 8, min_size 3), for which they were sized.
DB_TARGETS = ["targets.shrink_ratio=0.4", "targets.min_text_size=8", "postprocess.min_size=3"]
SMALL = ["transform.size=128", "model.neck_channels=32", "loader.workers=0", "augment.affine=false",
         "train.precision=32", "train.warmup_steps=2", "train.eval_every=0", "train.log_every=1", *DB_TARGETS]
# The overfit recipe: 200 steps of AdamW at lr 0.003 (5 warmup steps, cosine), batch = the 4 images.
# (At lr 0.01 the run reached H-mean >= 0.9 on one CPU and stalled at 0.64 on another, an AMD EPYC,
# where float kernels round differently; 0.003 reached 1.0 there and 0.001 had not learnt by step 200.)
OVERFIT = ["transform.size=128", "model.neck_channels=64", "loader.workers=0", "loader.batch_size=4",
           "augment.affine=false", "augment.hflip=0", "train.precision=32", "train.lr=0.003",
           "train.warmup_steps=5", "train.epochs=200", "train.log_every=20", "train.eval_every=100", *DB_TARGETS]


def _config(overrides: list[str], *more: str) -> Config:
    return load_config(None, [*overrides, *more])


@pytest.fixture(scope="module")
def receipts(tmp_path_factory) -> Path:
    """5 synthetic receipts: 4 in train (one stored with an EXIF orientation tag), 1 in val."""
    root = tmp_path_factory.mktemp("receipts")
    summary = synthesize(root, 5, seed=0, val_fraction=0.0, min_side=160, max_side=176)
    assert summary.counts == {"train": 4, "val": 1} and summary.exif_tagged == 1
    return root


@pytest.fixture(scope="module")
def small_shards(receipts, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    build_shards(receipts, "train", out, _config(SMALL))
    return out


# ---------------------------------------------------------------- overfitting


def test_overfits_four_receipts_to_high_hmean(receipts, small_shards, tmp_path):
    config = _config(OVERFIT)
    events: list[TrainProgress] = []
    result = train(config, small_shards, val_shards=small_shards, out_dir=tmp_path / "run", device="cpu",
                   progress=events.append)

    assert result.steps == 200 and result.epochs == 200 and result.world_size == 1
    assert result.best_hmean is not None and result.best_hmean >= 0.9
    assert result.best_checkpoint == tmp_path / "run" / BEST_NAME and result.best_checkpoint.is_file()
    assert result.last_checkpoint.is_file()
    records = read_metrics(tmp_path / "run")
    train_records = [r for r in records if r["event"] == "train"]
    eval_records = [r for r in records if r["event"] == "eval"]
    assert [r["step"] for r in train_records] == list(range(20, 201, 20))
    assert [r["step"] for r in eval_records] == [100, 200]
    assert train_records[-1]["loss"] == pytest.approx(result.final_loss)
    assert train_records[-1]["loss"] < 0.25 * train_records[0]["loss"]
    assert all(0.0 <= r["data_wait"] < 1.0 and r["samples_per_s"] > 0 for r in train_records)
    assert max(r["hmean"] for r in eval_records) == result.best_hmean
    assert [e.event for e in events].count("eval") == 2 and events[-1].score.hmean == eval_records[-1]["hmean"]

    # The trained model, evaluated from shards and through the live path, scores the same.
    shards_eval = evaluate_shards(result.last_checkpoint, small_shards, config, precision="32", batch_size=4,
                                  workers=0, device="cpu")
    live_eval = evaluate_source(result.last_checkpoint, receipts, "train", config, precision="32", batch_size=4,
                                workers=0, device="cpu")
    assert shards_eval.score.hmean >= 0.9
    assert shards_eval.score == live_eval.score and shards_eval.per_image == live_eval.per_image


# ---------------------------------------------------------------- resume


def _losses(out_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(out_dir) if r["event"] == "train"}


@pytest.mark.parametrize("accumulate", [1, 2])
def test_resume_reproduces_the_next_step_exactly(small_shards, tmp_path, accumulate):
    # Batches of 1 with augmentation on: 4 micro-batches per epoch, the stop falls mid-epoch.
    config = _config(SMALL, "loader.batch_size=1", f"train.accumulate={accumulate}", "augment.affine=true",
                     "augment.hflip=0.5", "train.epochs=3")
    steps = 5 if accumulate == 1 else 3
    whole = train(config, small_shards, out_dir=tmp_path / "whole", device="cpu", stop_after=steps + 1)
    first = train(config, small_shards, out_dir=tmp_path / "part", device="cpu", stop_after=steps)
    assert first.steps == steps and whole.steps == steps + 1
    saved = load_checkpoint(tmp_path / "part" / LAST_NAME)
    assert saved["position"] == {"epoch": steps * accumulate // 4, "batch": steps * accumulate % 4, "step": steps}
    resumed = train(config, small_shards, out_dir=tmp_path / "part", device="cpu", resume=tmp_path / "part",
                    stop_after=steps + 1)
    assert resumed.steps == steps + 1
    expected, got = _losses(tmp_path / "whole"), _losses(tmp_path / "part")
    assert sorted(got) == list(range(1, steps + 2))  # metrics.jsonl continued, one line per step
    assert got[steps + 1] == expected[steps + 1]
    assert all(got[s] == expected[s] for s in range(1, steps + 1))
    whole_state = load_checkpoint(tmp_path / "whole" / LAST_NAME)["model"]
    resumed_state = load_checkpoint(tmp_path / "part" / LAST_NAME)["model"]
    assert all(torch.equal(whole_state[k], resumed_state[k]) for k in whole_state)


def test_resume_refuses_changed_settings(small_shards, tmp_path):
    config = _config(SMALL, "loader.batch_size=2", "train.epochs=1")
    train(config, small_shards, out_dir=tmp_path, device="cpu", stop_after=1)
    with pytest.raises(ConfigError, match=r"loader\.batch_size is 2 in the checkpoint, 1 now"):
        train(_config(SMALL, "loader.batch_size=1"), small_shards, out_dir=tmp_path, device="cpu", resume=tmp_path)
    with pytest.raises(ConfigError, match="model settings"):
        train(_config(SMALL, "loader.batch_size=2", "model.neck_channels=64"), small_shards, out_dir=tmp_path,
              device="cpu", resume=tmp_path / LAST_NAME)


def test_too_few_samples_for_one_step_is_a_config_error(small_shards, tmp_path):
    with pytest.raises(ConfigError, match="too few for one step"):
        train(_config(SMALL, "loader.batch_size=8"), small_shards, out_dir=tmp_path, device="cpu")
    with pytest.raises(ConfigError, match="stop_after must be at least 1, got 0"):
        train(_config(SMALL), small_shards, out_dir=tmp_path, device="cpu", stop_after=0)


def test_shards_built_with_other_settings_are_refused(small_shards, tmp_path):
    with pytest.raises(StaleShardsError, match=r"transform\.size: built with 128, config has 256"):
        train(_config(SMALL, "transform.size=256"), small_shards, out_dir=tmp_path, device="cpu")
    assert not (tmp_path / LAST_NAME).exists()


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_mixed_precision_steps_train_and_save_the_scaler(small_shards, tmp_path, precision):
    config = _config(SMALL, "loader.batch_size=2", f"train.precision={precision}", "train.epochs=1")
    result = train(config, small_shards, out_dir=tmp_path, device="cpu")
    losses = _losses(tmp_path)
    assert sorted(losses) == [1, 2] and all(math.isfinite(v) and v > 0 for v in losses.values())
    scaler = load_checkpoint(result.last_checkpoint)["scaler"]
    assert (scaler != {}) == (precision == "16-mixed")  # GradScaler is enabled for fp16 only


# ---------------------------------------------------------------- checkpoints


def test_checkpoint_holds_plain_containers_and_loads_weights_only(small_shards, tmp_path):
    config = _config(SMALL, "loader.batch_size=2", "train.epochs=1")
    result = train(config, small_shards, out_dir=tmp_path, device="cpu")
    assert result.best_checkpoint is None and sorted(p.name for p in tmp_path.glob("*.pt")) == [LAST_NAME]
    body = torch.load(result.last_checkpoint, map_location="cpu", weights_only=True)
    assert body["format"] == "wds-ocr/checkpoint" and body["version"] == 1
    assert set(body) >= {"config", "model", "optimizer", "scaler", "scheduler", "position", "rng", "world_size"}
    assert body["position"] == {"epoch": 1, "batch": 0, "step": 2}
    # warmup_steps=2 is capped at a fifth of the 2-step run
    assert body["scheduler"] == {"schedule": "cosine", "base_lr": 1e-3, "warmup_steps": 0, "total_steps": 2, "step": 2}
    # the config as run: the model's input normalization resolved (ImageNet's, resnet18's own)
    resolved = resolve_model(config)
    assert resolved.model.input_mean == (0.485, 0.456, 0.406) and resolved.model.input_std == (0.229, 0.224, 0.225)
    assert json.loads(json.dumps(body["config"])) == resolved.model_dump(mode="json")
    model, stored = load_model(result.last_checkpoint, torch.device("cpu"))
    assert stored == resolved and not model.training


class _Custom:
    pass


def test_checkpoint_that_needs_unpickling_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": "wds-ocr/checkpoint", "version": 1, "payload": _Custom()}, path)
    with pytest.raises(CheckpointError, match="need unpickling, which is refused"):
        load_checkpoint(path)
    path.write_bytes(pickle.dumps({"a": 1}, protocol=2))
    with pytest.raises(CheckpointError, match="evil.pt"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    torch.save({"model": {}}, path)
    with pytest.raises(CheckpointError, match="not a wds-ocr checkpoint"):
        load_checkpoint(path)


def test_checkpoint_for_another_model_names_the_keys(tmp_path):
    config = load_config(None, ["model.neck_channels=32"])
    other = DBNet(load_config(None, ["model.neck_channels=64"]).model)
    save_checkpoint(tmp_path / "x.pt", {"config": config.model_dump(mode="json"), "model": other.state_dict()})
    with pytest.raises(CheckpointError, match="made for another model"):
        load_model(tmp_path / "x.pt", torch.device("cpu"))


def test_rng_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    save_checkpoint(tmp_path / "rng.pt", {"config": {}, "model": {}, "rng": rng_state()})
    expected = (torch.rand(3), __import__("numpy").random.rand(), __import__("random").random())
    restore_rng_state(load_checkpoint(tmp_path / "rng.pt")["rng"])
    again = (torch.rand(3), __import__("numpy").random.rand(), __import__("random").random())
    assert torch.equal(expected[0], again[0]) and expected[1:] == again[1:]


# ---------------------------------------------------------------- schedule and precision


def test_schedule_warms_up_linearly_then_decays():
    cosine = LrSchedule(base_lr=1.0, warmup_steps=4, total_steps=105, schedule="cosine")
    assert [cosine(s) for s in range(4)] == [0.2, 0.4, 0.6, 0.8]
    assert cosine(4) == 1.0
    assert cosine(54) == pytest.approx(0.01 + 0.5 * 0.99)
    # the run's last step (104) is at the floor: the decay completes inside the run
    assert cosine(103) > 0.01 and cosine(104) == pytest.approx(0.01) and cosine(500) == pytest.approx(0.01)
    poly = LrSchedule(base_lr=1.0, warmup_steps=0, total_steps=101, schedule="poly")
    assert poly(0) == 1.0 and poly(50) == pytest.approx(0.5**0.9) and poly(100) == 0.0


@pytest.fixture(scope="module")
def sroie_batch(sroie_root, tmp_path_factory):
    """One batch of 4 real receipts (a copy of the first 4 val images) from shards at 256 px."""
    root = tmp_path_factory.mktemp("sroie4")
    annotations = json.loads((sroie_root / "jsons" / "val.json").read_text(encoding="utf-8"))["images"]
    names = sorted(annotations)[:4]
    (root / "images" / "val").mkdir(parents=True)
    (root / "jsons").mkdir()
    for name in names:
        shutil.copyfile(sroie_root / "images" / "val" / name, root / "images" / "val" / name)
    (root / "jsons" / "val.json").write_text(json.dumps({"images": {n: annotations[n] for n in names}}))
    build_shards(root, "val", root / "shards", load_config(None, ["transform.size=256"]))
    return next(iter(ShardStream(root / "shards", batch_size=4)))


def test_bf16_autocast_loss_is_within_one_percent_of_fp32(sroie_batch):
    torch.manual_seed(0)
    model = DBNet(load_config(None, ["model.neck_channels=64"]).model).to(memory_format=torch.channels_last)
    criterion = DBLoss(load_config(None, []).loss, model.k)
    images, maps = prepare(to_device(sroie_batch, "cpu"))
    losses = {}
    for precision in ("32", "bf16-mixed"):
        with torch.no_grad():
            with autocast(torch.device("cpu"), precision):
                outputs = model(images)
            if precision == "bf16-mixed":
                assert outputs["prob_logits"].dtype == torch.bfloat16
            losses[precision] = criterion(outputs, maps)[0].item()
    assert math.isfinite(losses["32"]) and losses["32"] > 0
    assert abs(losses["bf16-mixed"] - losses["32"]) <= 1e-2 * losses["32"]


# ---------------------------------------------------------------- the GPU check script


def test_gpu_check_smoke_runs_on_the_cpu_and_prints_a_json_summary(tmp_path):
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[2] / "tools" / "gpu_check.py"
    completed = subprocess.run([sys.executable, str(script), "--smoke", "--device", "cpu", "--work", str(tmp_path)],
                               capture_output=True, text=True, timeout=240)
    assert completed.returncode == 0, completed.stderr[-3000:]
    summary = json.loads(completed.stdout)
    assert summary["smoke"] is True and summary["train"]["steps"] == 3
    assert summary["build"]["train"] > 0 and summary["build"]["val"] > 0
    assert 0.0 <= summary["train"]["data_wait_fraction"] < 1.0 and summary["train"]["samples_per_s"] > 0
    for precision in ("bf16-mixed", "32"):
        evaluation = summary["eval"][precision]
        assert evaluation["images"] == summary["build"]["val"] and evaluation["images_per_s"] > 0
        assert evaluation["forward_only"]["gpu_busy_fraction"] is None  # no CUDA events on a CPU
        assert evaluation["gpu_utilization_percent"] is None
    assert (tmp_path / "run" / "last.pt").is_file()


# ---------------------------------------------------------------- run length, progress, resume, curves


def test_max_steps_gives_the_schedule_its_length(small_shards, tmp_path):
    # 4 samples, batch 2: 2 steps per epoch. train.epochs=1 would be 2 steps; max_steps=7 runs 7,
    # through 4 epochs, warmup 50 is capped at a fifth of the run (1 step) and the last step is at the floor.
    config = _config(SMALL, "loader.batch_size=2", "train.epochs=1", "train.max_steps=7", "train.warmup_steps=50",
                     "train.lr=0.01")
    events: list[TrainProgress] = []
    result = train(config, small_shards, out_dir=tmp_path, device="cpu", progress=events.append)
    assert result.steps == 7 and result.epochs == 3  # 3 whole epochs, the 4th stopped after its first step
    rates = [r["lr"] for r in read_metrics(tmp_path) if r["event"] == "train"]
    assert len(rates) == 7 and rates[0] == pytest.approx(0.01 * 1 / 2)  # warmup: 1 step
    assert rates[1] == pytest.approx(0.01) and rates[-1] == pytest.approx(0.01 * 0.01)
    assert all(a >= b for a, b in zip(rates[1:], rates[2:]))
    schedule = load_checkpoint(result.last_checkpoint)["scheduler"]
    assert (schedule["warmup_steps"], schedule["total_steps"]) == (1, 7)
    # the progress callback hears of every step from the first, not only at log steps
    assert [(e.event, e.step) for e in events if e.event in ("start", "step")] == \
           [("start", 0)] + [("step", s) for s in range(1, 8)]
    assert all(e.total_steps == 7 for e in events)


def test_precision_auto_is_float32_on_the_cpu(small_shards, tmp_path):
    from wds_ocr.run.runtime import resolve_precision

    assert load_config().train.precision == "auto"
    assert resolve_precision("auto", torch.device("cpu")) == "32"
    assert resolve_precision("bf16-mixed", torch.device("cpu")) == "bf16-mixed"
    config = _config([s for s in SMALL if not s.startswith("train.precision")], "loader.batch_size=2",
                     "train.epochs=1")
    result = train(config, small_shards, out_dir=tmp_path, device="cpu")
    assert load_checkpoint(result.last_checkpoint)["scaler"] == {}
    evaluation = evaluate_shards(result.last_checkpoint, small_shards, workers=0, device="cpu")
    assert evaluation.mode == "32"


def test_a_resume_logs_each_step_once(small_shards, tmp_path):
    config = _config(SMALL, "loader.batch_size=1", "train.epochs=2")
    whole = train(config, small_shards, out_dir=tmp_path / "whole", device="cpu")
    train(config, small_shards, out_dir=tmp_path / "part", device="cpu", stop_after=3)
    # a crash after steps 4 and 5 were logged but before a checkpoint held them
    with open(tmp_path / "part" / "metrics.jsonl", "a", encoding="utf-8") as handle:
        handle.write(json.dumps({"event": "train", "step": 4, "loss": 9.0}) + "\n")
        handle.write(json.dumps({"event": "train", "step": 5, "loss": 9.0}) + "\n{\"event\": \"tr")
    resumed = train(config, small_shards, out_dir=tmp_path / "part", device="cpu", resume=tmp_path / "part")
    assert resumed.steps == whole.steps == 8
    steps = [r["step"] for r in read_metrics(tmp_path / "part") if r["event"] == "train"]
    assert steps == list(range(1, 9))
    assert _losses(tmp_path / "part") == _losses(tmp_path / "whole")


def test_training_draws_curves_and_plot_redraws_them(small_shards, tmp_path):
    from click.testing import CliRunner

    from wds_ocr.cli import cli

    config = _config(SMALL, "loader.batch_size=2", "train.epochs=2", "train.eval_every=1")
    train(config, small_shards, val_shards=small_shards, out_dir=tmp_path, device="cpu")
    curves = tmp_path / "curves.png"
    assert curves.is_file() and curves.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    curves.unlink()
    result = CliRunner().invoke(cli, ["plot", str(tmp_path), "--out", str(tmp_path / "again.png")])
    assert result.exit_code == 0 and result.output == f"wrote {tmp_path / 'again.png'}\n"
    import cv2

    picture = cv2.imread(str(tmp_path / "again.png"))
    assert picture.shape == (900, 800, 3) and picture.std() > 10  # drawn, not blank
    missing = CliRunner().invoke(cli, ["plot", str(tmp_path / "nothing")])
    assert missing.exit_code == 2 and "does not exist" in missing.output
    (tmp_path / "empty").mkdir()
    empty = CliRunner().invoke(cli, ["plot", str(tmp_path / "empty")])
    assert empty.exit_code == 1
    assert f"error: {tmp_path / 'empty'} holds no metrics.jsonl: give the --out folder of a training run" in empty.output


def test_without_matplotlib_training_goes_on_and_plot_says_what_to_install(small_shards, tmp_path, monkeypatch):
    import builtins

    from click.testing import CliRunner

    from wds_ocr.cli import cli

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    result = train(_config(SMALL, "loader.batch_size=2", "train.epochs=1"), small_shards, out_dir=tmp_path,
                   device="cpu")
    assert result.last_checkpoint.is_file() and not (tmp_path / "curves.png").exists()
    plotted = CliRunner().invoke(cli, ["plot", str(tmp_path)])
    assert plotted.exit_code == 1
    assert "error: drawing curves needs matplotlib: pip install 'wds-ocr[plot]'" in plotted.output


def test_a_crop_larger_than_the_records_is_a_config_error(small_shards, tmp_path):
    with pytest.raises(ConfigError, match=r"augment\.crop_size=256 is larger than the records of .* \(128x128\); "
                                          r"use at most 128, or 0 for whole records"):
        train(_config(SMALL, "augment.crop_size=256"), small_shards, out_dir=tmp_path, device="cpu")
