"""Config: defaults, TOML/YAML files, typed --set overrides, readable errors, fingerprint."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from wds_ocr.config import PIPELINE_VERSION, Config, build_config, load_config
from wds_ocr.errors import ConfigError

# sha256 of the default record_settings(). Changing it invalidates every shard ever built: only
# update it together with a deliberate change of record_settings() or PIPELINE_VERSION.
DEFAULT_FINGERPRINT = "0a31575a49112c8db29e4cca6bab8e2d7571eaea41e1a87b82b82809587d6357"


def _error(*overrides: str, path: Path | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    return str(info.value)


# ----------------------------------------------------------------------------- defaults


def test_defaults() -> None:
    config = load_config()
    assert config == Config()
    assert config.source.format == "json"
    assert config.source.annotation_frame == "displayed"
    assert config.source.icdar_coords == "quad"
    assert config.source.dont_care == ("###",)
    assert config.source.outside_tolerance == 4.0
    assert (config.source.max_pixels, config.source.max_file_bytes) == (40_000_000, 512 << 20)
    assert config.loader.verify_hashes is True  # every member's checksum is checked by default
    assert (config.transform.size, config.transform.pad) == (640, "top_left")
    # receipt defaults (README, "Defaults for receipts"): DB's are 0.4 and 8
    assert (config.targets.shrink_ratio, config.targets.thresh_min, config.targets.thresh_max) == (0.6, 0.3, 0.7)
    assert config.targets.min_text_size == 3.0
    assert (config.postprocess.unclip_ratio, config.postprocess.min_size, config.postprocess.box_thresh) == (1.5, 2.0, 0.6)
    assert (config.shards.max_samples, config.shards.max_bytes) == (256, 1 << 30)
    assert (config.loader.batch_size, config.loader.workers, config.loader.on_error) == (8, 2, "raise")
    assert (config.train.precision, config.train.epochs, config.train.lr) == ("auto", 10, 1e-3)
    assert (config.train.max_steps, config.augment.crop_size) == (None, 0)
    assert config.model.backbone_weights is None
    assert PIPELINE_VERSION == 4  # 4: compact records (record version 3)


def test_config_is_frozen() -> None:
    config = Config()
    with pytest.raises(Exception, match="frozen"):
        config.transform.size = 512  # type: ignore[misc]


# ----------------------------------------------------------------------------- files


def test_toml_file(tmp_path: Path) -> None:
    path = tmp_path / "run.toml"
    path.write_text('[transform]\nsize = 512\npad = "center"\n\n[source]\ndont_care = ["###", "IGNORE"]\n'
                    '\n[train]\nprecision = "32"\nlr = 2e-4\n')
    config = load_config(path)
    assert (config.transform.size, config.transform.pad) == (512, "center")
    assert config.source.dont_care == ("###", "IGNORE")
    assert (config.train.precision, config.train.lr) == ("32", 2e-4)
    assert config.targets == Config().targets


@pytest.mark.parametrize("suffix", [".yaml", ".yml", ".YAML"])
def test_yaml_file(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"run{suffix}"
    path.write_text("transform:\n  size: 320\ntargets:\n  shrink_ratio: 0.5\nloader:\n  verify_hashes: true\n")
    config = load_config(path)
    assert (config.transform.size, config.targets.shrink_ratio, config.loader.verify_hashes) == (320, 0.5, True)


def test_empty_yaml_file_gives_defaults(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing set\n")
    assert load_config(path) == Config()


def test_overrides_apply_on_top_of_the_file(tmp_path: Path) -> None:
    path = tmp_path / "run.toml"
    path.write_text("[transform]\nsize = 512\npad = 'center'\n")
    config = load_config(path, ["transform.size=256"])
    assert (config.transform.size, config.transform.pad) == (256, "center")


@pytest.mark.parametrize(
    "name, text, expected",
    [
        ("bad.toml", "[transform\nsize = 5\n", "is not valid TOML: "),
        ("bad.yaml", "transform: [1, 2\n", "is not valid YAML: "),
        ("dup.yaml", "transform:\n  size: 320\n  size: 640\n", "is not valid YAML: key 'size' appears twice"),
        ("list.yaml", "- 1\n- 2\n", "must hold a table/mapping at the top level"),
        ("latin1.toml", None, "cannot be read: "),
    ],
)
def test_malformed_file_names_the_file(tmp_path: Path, name: str, text: str | None, expected: str) -> None:
    path = tmp_path / name
    if text is None:
        path.write_bytes("[transform]\npad = 'cent\xe9r'\n".encode("latin-1"))
    else:
        path.write_text(text)
    message = _error(path=path)
    assert message.startswith(f"config file {path} ")
    assert expected in message


def test_missing_file_and_unknown_suffix(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    assert _error(path=missing) == f"config file {missing} does not exist"
    other = tmp_path / "run.json"
    other.write_text("{}")
    assert _error(path=other) == f"config file {other}: use a .toml, .yaml or .yml file"


# ----------------------------------------------------------------------------- overrides


@pytest.mark.parametrize(
    "override, section, field, expected",
    [
        ("transform.size=512", "transform", "size", 512),
        ("targets.shrink_ratio=0.25", "targets", "shrink_ratio", 0.25),
        ("train.lr=1e-3", "train", "lr", 0.001),
        ("loader.verify_hashes=true", "loader", "verify_hashes", True),
        ("train.compile=false", "train", "compile", False),
        ("source.dont_care=[###, IGNORE]", "source", "dont_care", ("###", "IGNORE")),
        ('source.dont_care=["###", "x, y"]', "source", "dont_care", ("###", "x, y")),
        ("source.dont_care=###", "source", "dont_care", ("###",)),
        ("source.dont_care=###,IGNORE", "source", "dont_care", ("###", "IGNORE")),
        ("source.dont_care=[]", "source", "dont_care", ()),
        # Text fields take the value verbatim, even when it would read as a YAML number or bool.
        ("train.precision=32", "train", "precision", "32"),
        ("model.backbone_weights=yes", "model", "backbone_weights", "yes"),
        ("model.backbone_weights=/w/r18.pt", "model", "backbone_weights", "/w/r18.pt"),
        ("model.backbone_weights=null", "model", "backbone_weights", None),
        ("transform.pad= center ", "transform", "pad", "center"),
        ("source.outside_tolerance=0", "source", "outside_tolerance", 0.0),
    ],
)
def test_typed_overrides(override: str, section: str, field: str, expected: object) -> None:
    value = getattr(getattr(load_config(None, [override]), section), field)
    assert value == expected
    assert type(value) is type(expected)


def test_later_override_wins() -> None:
    assert load_config(None, ["transform.size=512", "transform.size=256"]).transform.size == 256


@pytest.mark.parametrize(
    "override, expected",
    [
        ("transform", "override 'transform' must look like section.field=value"),
        ("size=5", "override 'size=5': name a section and a field, e.g. transform.size=512"),
        ("transform..size=5", "override 'transform..size=5': name a section and a field, e.g. transform.size=512"),
        ("transform.size.x=5", "override 'transform.size.x=5': transform.size is a setting, not a section"),
    ],
)
def test_malformed_override(override: str, expected: str) -> None:
    assert _error(override) == expected


def test_override_below_a_value_set_in_the_file(tmp_path: Path) -> None:
    path = tmp_path / "run.toml"
    path.write_text("transform = 5\n")
    assert _error("transform.size=512", path=path) == (
        "override 'transform.size=512': transform is a value, not a section"
    )


# ----------------------------------------------------------------------------- validation messages


@pytest.mark.parametrize(
    "override, expected",
    [
        ("transform.size=5000", "transform.size: Input should be a multiple of 32 (got 5000); "
                                "allowed: 32 <= size <= 4096, a multiple of 32"),
        ("transform.size=4128", "transform.size: Input should be less than or equal to 4096 (got 4128); "
                                "allowed: 32 <= size <= 4096, a multiple of 32"),
        ("transform.size=100", "transform.size: Input should be a multiple of 32 (got 100); "
                               "allowed: 32 <= size <= 4096, a multiple of 32"),
        ("targets.shrink_ratio=1.5", "targets.shrink_ratio: Input should be less than 1 (got 1.5); "
                                     "allowed: 0 < shrink_ratio < 1"),
        ("source.outside_tolerance=-1", "source.outside_tolerance: Input should be greater than or equal to 0 "
                                        "(got -1); allowed: 0 <= outside_tolerance <= 1000000"),
        ("targets.thresh_min=0.7", "targets.thresh_min: must be below targets.thresh_max (0.7) (got 0.7)"),
        ("targets.thresh_min=0.9", "targets.thresh_min: must be below targets.thresh_max (0.7) (got 0.9)"),
        ("augment.scale_min=2", "augment.scale_min: must be at most augment.scale_max (1.25) (got 2.0)"),
        ("transform.pad=middle", "transform.pad: Input should be 'top_left' or 'center' (got 'middle')"),
        ("train.compile=maybe", "train.compile: Input should be a valid boolean, unable to interpret input "
                                "(got 'maybe')"),
        ("train.grad_clip=.inf", "train.grad_clip: Input should be a finite number (got inf)"),
        ("targets.min_text_size=.nan", "targets.min_text_size: Input should be a finite number (got nan)"),
    ],
)
def test_invalid_value_names_the_dotted_field_and_the_rule(override: str, expected: str) -> None:
    assert _error(override) == "invalid configuration:\n  " + expected


def test_every_problem_is_reported_one_per_line() -> None:
    message = _error("transform.size=5000", "targets.shrink_ratio=0")
    assert message.splitlines() == [
        "invalid configuration:",
        "  transform.size: Input should be a multiple of 32 (got 5000); allowed: 32 <= size <= 4096, a multiple of 32",
        "  targets.shrink_ratio: Input should be greater than 0 (got 0); allowed: 0 < shrink_ratio < 1",
    ]


def test_unknown_section_and_field_are_named_with_the_known_ones() -> None:
    assert _error("transfrom.size=512") == (
        "invalid configuration:\n  transfrom: unknown section; known: augment, evaluation, loader, loss, model, "
        "postprocess, shards, source, targets, train, transform"
    )
    assert _error("transform.sise=512") == (
        "invalid configuration:\n  transform.sise: unknown setting; known: jpeg_reduction, pad, size (got 512)"
    )


def test_unknown_field_in_a_file(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("targets:\n  shrink: 0.5\n")
    assert _error(path=path) == (
        "invalid configuration:\n  targets.shrink: unknown setting; "
        "known: min_text_size, shrink_ratio, thresh_max, thresh_min (got 0.5)"
    )


def test_build_config_validates_plain_dicts() -> None:
    assert build_config({"transform": {"size": 64}}).transform.size == 64
    with pytest.raises(ConfigError, match=r"transform\.size: Input should be greater than or equal to 32"):
        build_config({"transform": {"size": 0}})


# ----------------------------------------------------------------------------- fingerprint


def test_default_fingerprint_is_pinned() -> None:
    assert Config().fingerprint() == DEFAULT_FINGERPRINT
    assert Config().fingerprint() == Config().fingerprint()


def test_fingerprint_is_the_same_in_another_process() -> None:
    code = (
        "from wds_ocr.config import load_config;"
        "print(load_config(None, ['transform.size=512', 'source.dont_care=[###, X]']).fingerprint())"
    )
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={"PYTHONHASHSEED": "123", "PATH": ""}).stdout.strip()
    assert other == load_config(None, ["transform.size=512", "source.dont_care=[###, X]"]).fingerprint()


def test_equal_settings_spelled_differently_give_the_same_fingerprint(tmp_path: Path) -> None:
    path = tmp_path / "run.toml"
    path.write_text("[targets]\nthresh_max = 0.7\nshrink_ratio = 0.6\n[transform]\nsize = 640\n")
    assert load_config(path).fingerprint() == DEFAULT_FINGERPRINT
    # An int given for a float field is stored as the float it means.
    assert load_config(None, ["targets.thresh_max=1"]).fingerprint() == (
        load_config(None, ["targets.thresh_max=1.0"]).fingerprint()
    )


@pytest.mark.parametrize(
    "override",
    [
        "transform.size=512",
        "transform.pad=center",
        "targets.shrink_ratio=0.5",
        "targets.thresh_min=0.2",
        "targets.thresh_max=0.8",
        "targets.min_text_size=4",
        "source.annotation_frame=stored",
        "source.icdar_coords=polygon",
        "source.dont_care=[###, IGNORE]",
        "source.dont_care=[]",
        "source.outside_tolerance=2",
    ],
)
def test_fingerprint_changes_with_every_record_setting(override: str) -> None:
    changed = load_config(None, [override])
    assert changed.fingerprint() != DEFAULT_FINGERPRINT
    assert len(changed.fingerprint()) == 64


@pytest.mark.parametrize(
    "override",
    [
        "shards.max_samples=8",
        "shards.max_bytes=2097152",
        "loader.batch_size=32",
        "loader.workers=0",
        "loader.seed=7",
        "augment.hflip=0.25",
        "model.backbone=resnet50",
        "loss.bce_weight=1",
        "postprocess.box_thresh=0.5",
        "train.epochs=3",
        "train.precision=32",
    ],
)
def test_fingerprint_ignores_settings_that_do_not_touch_records(override: str) -> None:
    assert load_config(None, [override]).fingerprint() == DEFAULT_FINGERPRINT


def test_jpeg_reduction_off_is_left_out_of_the_record_settings() -> None:
    """Builds before transform.jpeg_reduction decoded whole: "off" keeps their fingerprints."""
    off = load_config(None, ["transform.jpeg_reduction=off"])
    assert off.record_settings()["transform"] == {"size": 640, "pad": "top_left"}
    assert off.fingerprint() == "b25d197a031996adf34154f9b5285516a6fc49afd2924b25a26d130ba666b080"


def test_record_settings_content() -> None:
    assert Config().record_settings() == {
        "pipeline_version": PIPELINE_VERSION,
        "source": {"annotation_frame": "displayed", "icdar_coords": "quad", "dont_care": ["###"],
                   "outside_tolerance": 4.0, "max_pixels": 40_000_000, "max_file_bytes": 512 << 20},
        "transform": {"size": 640, "pad": "top_left", "jpeg_reduction": "auto"},
        "targets": {"shrink_ratio": 0.6, "thresh_min": 0.3, "thresh_max": 0.7, "min_text_size": 3.0},
    }
