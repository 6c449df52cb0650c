"""The training recipes in tools/recipes: valid configurations that build shards and train as written."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from wds_ocr.cli import cli
from wds_ocr.config import Config, load_config

RECIPES = Path(__file__).resolve().parents[2] / "tools" / "recipes"


@pytest.mark.parametrize("name", ["sroie-cpu", "sroie-gpu"])
def test_recipe_is_a_valid_config_on_the_receipt_defaults(name):
    config = load_config(RECIPES / f"{name}.toml")
    # both recipes train on records built with the package defaults: one set of shards serves both
    assert config.record_settings() == Config().record_settings()
    assert 0 < config.augment.crop_size <= config.transform.size
    assert config.postprocess == Config().postprocess


def test_cpu_recipe_runs_its_length(synth_root, tmp_path):
    """Two steps of the CPU recipe as written (crop, neck, batch 8), on synthetic receipts at 640."""
    from wds_ocr.data.synth import synthesize

    data = tmp_path / "data"
    synthesize(data, 10, seed=1, val_fraction=0.2)
    recipe = str(RECIPES / "sroie-cpu.toml")
    runner = CliRunner()
    for split in ("train", "val"):
        built = runner.invoke(cli, ["build-shards", str(data), "--split", split, "--out", str(tmp_path / split),
                                    "--quiet", "--config", recipe])
        assert built.exit_code == 0, built.output
    trained = runner.invoke(cli, ["train", "--shards", str(tmp_path / "train"), "--val-shards", str(tmp_path / "val"),
                                  "--out", str(tmp_path / "run"), "--quiet", "--config", recipe,
                                  "--max-steps", "2"])
    assert trained.exit_code == 0, trained.output
    assert "trained 2 steps over 2 epochs on 1 process" in trained.output  # 8 receipts, batch 8: 1 step an epoch
    assert (tmp_path / "run" / "last.pt").is_file() and (tmp_path / "run" / "best.pt").is_file()


def test_recipe_script_refuses_an_unknown_recipe():
    script = RECIPES / "sroie.sh"
    assert os.access(script, os.X_OK)
    completed = subprocess.run([str(script), "tpu"], capture_output=True, text=True, timeout=300)
    assert completed.returncode == 2
    assert "error: no recipe tools/recipes/sroie-tpu.toml (use cpu or gpu)" in completed.stderr
