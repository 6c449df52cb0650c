"""The CLI edge: help for every command, and configuration errors as exit 2 with one clear line."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from wds_ocr.cli import cli

# Commands every build has; more join over time, and every registered one is checked below.
CORE_COMMANDS = {"synth", "build-shards", "merge", "verify", "inspect"}
COMMANDS = tuple(sorted(cli.commands))


def _runner() -> CliRunner:
    return CliRunner()


def test_top_level_help_lists_every_command() -> None:
    result = _runner().invoke(cli, ["--help"])
    assert result.exit_code == 0, result.output
    assert "Usage: cli [OPTIONS] COMMAND [ARGS]..." in result.output
    assert CORE_COMMANDS <= set(COMMANDS)
    for command in COMMANDS:
        assert f"  {command} " in result.output


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_every_command_has_help(command: str, flag: str) -> None:
    result = _runner().invoke(cli, [command, flag])
    assert result.exit_code == 0, result.output
    assert f"Usage: cli {command} [OPTIONS]" in result.output


@pytest.mark.parametrize("command", ["build-shards", "verify"])
def test_config_options_are_offered(command: str) -> None:
    output = _runner().invoke(cli, [command, "--help"]).output
    assert "--config FILE" in output
    assert "--set SECTION.FIELD=VALUE" in output


def test_bad_config_value_exits_2_naming_the_field(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = tmp_path / "source"
    source.mkdir()
    workdir = tmp_path / "work"
    workdir.mkdir()
    monkeypatch.chdir(workdir)  # the default --out is shards/<split> under the working directory
    result = _runner().invoke(cli, ["build-shards", str(source), "--split", "val", "--set", "transform.size=5000"])
    assert result.exit_code == 2
    assert result.stdout == ""
    assert result.stderr == (
        "error: invalid configuration:\n"
        "  transform.size: Input should be a multiple of 32 (got 5000); allowed: 32 <= size <= 4096, a multiple of 32\n"
    )
    # Validation happens before anything is read or written.
    assert list(workdir.iterdir()) == []


def test_unknown_setting_exits_2(tmp_path: Path) -> None:
    result = _runner().invoke(cli, ["verify", str(tmp_path), "--set", "targets.shrink=0.5"])
    assert result.exit_code == 2
    assert result.stderr.startswith("error: invalid configuration:\n  targets.shrink: unknown setting; known: ")


def test_malformed_override_exits_2(tmp_path: Path) -> None:
    result = _runner().invoke(cli, ["build-shards", str(tmp_path), "--split", "val", "--set", "transform"])
    assert result.exit_code == 2
    assert result.stderr == "error: override 'transform' must look like section.field=value\n"


def test_missing_config_file_exits_2(tmp_path: Path) -> None:
    missing = tmp_path / "missing.toml"
    result = _runner().invoke(cli, ["build-shards", str(tmp_path), "--split", "val", "--config", str(missing)])
    assert result.exit_code == 2
    assert result.stderr == f"error: config file {missing} does not exist\n"


def test_malformed_config_file_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("transform: [1, 2\n")
    result = _runner().invoke(cli, ["build-shards", str(tmp_path), "--split", "val", "--config", str(path)])
    assert result.exit_code == 2
    assert result.stderr.startswith(f"error: config file {path} is not valid YAML: ")


@pytest.mark.parametrize("value", ["0", "513", "lots", "-1"])
def test_build_workers_must_be_auto_or_a_count(tmp_path: Path, value: str) -> None:
    result = _runner().invoke(cli, ["build-shards", str(tmp_path), "--split", "val", "--workers", value])
    assert result.exit_code == 2
    assert f"Invalid value for '--workers': {value!r} is not auto or a whole number from 1 to 512" in result.output


def test_build_workers_auto_is_the_usable_cores_at_most_eight(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from wds_ocr.cli.data import BuildWorkers

    for cores, expected in ((1, 1), (2, 2), (64, 8)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, n=cores: set(range(n)), raising=False)
        assert BuildWorkers().convert("auto", None, None) == expected
    assert BuildWorkers().convert("3", None, None) == 3
