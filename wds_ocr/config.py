"""Validated configuration: pydantic models, file loading, ``--set`` overrides, fingerprint.

Validation happens once, at the edge (``load_config``); everything below receives frozen,
typed objects. ``Config.fingerprint()`` hashes exactly the settings that change the bytes of a
shard record, plus the pipeline version, so shards built under other settings are detected as
stale rather than silently used.
"""

from __future__ import annotations

import hashlib
import json
import tomllib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from wds_ocr.errors import ConfigError

# Bump when code changes the bytes a record holds for the same inputs and settings.
PIPELINE_VERSION = 1


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class SourceConfig(_Section):
    """How a source dataset is read."""

    # "json": images/<split>/* + jsons/<split>.json; "icdar": images/<split>/* + gts/<split>/gt_<stem>.txt
    format: Literal["json", "icdar"] = "json"
    # "displayed": polygons refer to the image with its EXIF orientation applied (SROIE, most tools);
    # "stored": polygons refer to the pixel array as stored in the file, before the tag is applied.
    annotation_frame: Literal["displayed", "stored"] = "displayed"
    # ICDAR text lines: "quad" = exactly 8 coordinates then the transcription (ICDAR 2015);
    # "polygon" = the leading numeric fields as (x, y) pairs, the last field always the transcription.
    icdar_coords: Literal["quad", "polygon"] = "quad"
    # Transcriptions that mark a don't-care region.
    dont_care: tuple[str, ...] = ("###",)
    # Points a little outside the image are clipped; farther than this (in pixels) is an error.
    outside_tolerance: float = Field(default=4.0, ge=0.0, le=1e6)


class TransformConfig(_Section):
    """Deterministic resize + pad applied to every image."""

    size: int = Field(default=640, ge=32, le=4096, multiple_of=32)
    pad: Literal["top_left", "center"] = "top_left"


class TargetConfig(_Section):
    """DBNet target maps (MhLiao/DB definitions)."""

    shrink_ratio: float = Field(default=0.4, gt=0.0, lt=1.0)
    thresh_min: float = Field(default=0.3, ge=0.0, le=1.0)
    thresh_max: float = Field(default=0.7, ge=0.0, le=1.0)
    min_text_size: float = Field(default=8.0, ge=0.0, le=1024.0)

    @model_validator(mode="after")
    def _ordered(self) -> "TargetConfig":
        if self.thresh_min >= self.thresh_max:
            raise ValueError(
                f"thresh_min ({self.thresh_min}) must be below thresh_max ({self.thresh_max})"
            )
        return self


class ShardConfig(_Section):
    """How build-shards rolls shards over."""

    max_samples: int = Field(default=256, ge=1, le=1_000_000)
    max_bytes: int = Field(default=1 << 30, ge=1 << 20, le=1 << 40)


class LoaderConfig(_Section):
    """Streaming loader settings."""

    batch_size: int = Field(default=8, ge=1, le=4096)
    workers: int = Field(default=2, ge=0, le=256)
    shuffle_block: int = Field(default=64, ge=1, le=1_000_000)
    seed: int = Field(default=0, ge=0)
    verify_hashes: bool = False
    on_error: Literal["raise", "skip"] = "raise"


class AugmentConfig(_Section):
    """Training augmentation, applied on the device to image and maps together."""

    hflip: float = Field(default=0.0, ge=0.0, le=1.0)
    affine: bool = True
    scale_min: float = Field(default=0.75, gt=0.0, le=4.0)
    scale_max: float = Field(default=1.25, gt=0.0, le=4.0)
    rotate_degrees: float = Field(default=10.0, ge=0.0, le=180.0)
    translate: float = Field(default=0.1, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _ordered(self) -> "AugmentConfig":
        if self.scale_min > self.scale_max:
            raise ValueError(f"scale_min ({self.scale_min}) must not exceed scale_max ({self.scale_max})")
        return self


class ModelConfig(_Section):
    backbone: Literal["resnet18", "resnet34", "resnet50"] = "resnet18"
    neck_channels: int = Field(default=256, ge=8, le=1024)
    k: float = Field(default=50.0, gt=0.0, le=1000.0)
    backbone_weights: str | None = None


class LossConfig(_Section):
    bce_weight: float = Field(default=5.0, ge=0.0)
    l1_weight: float = Field(default=10.0, ge=0.0)
    dice_weight: float = Field(default=1.0, ge=0.0)
    negative_ratio: float = Field(default=3.0, gt=0.0, le=100.0)


class PostprocessConfig(_Section):
    """DB post-processing (defaults of MhLiao/DB for ICDAR 2015)."""

    thresh: float = Field(default=0.3, gt=0.0, lt=1.0)
    box_thresh: float = Field(default=0.6, ge=0.0, lt=1.0)
    unclip_ratio: float = Field(default=1.5, gt=0.0, le=10.0)
    min_size: float = Field(default=3.0, ge=0.0)
    max_candidates: int = Field(default=1000, ge=1)


class TrainConfig(_Section):
    epochs: int = Field(default=10, ge=1, le=100_000)
    lr: float = Field(default=1e-3, gt=0.0, le=10.0)
    weight_decay: float = Field(default=1e-4, ge=0.0, le=1.0)
    warmup_steps: int = Field(default=50, ge=0)
    schedule: Literal["cosine", "poly"] = "cosine"
    grad_clip: float = Field(default=5.0, ge=0.0)
    accumulate: int = Field(default=1, ge=1, le=1024)
    precision: Literal["bf16-mixed", "16-mixed", "32"] = "bf16-mixed"
    compile: bool = False
    eval_every: int = Field(default=1, ge=0)
    log_every: int = Field(default=10, ge=1)
    seed: int = Field(default=0, ge=0)


class Config(_Section):
    source: SourceConfig = SourceConfig()
    transform: TransformConfig = TransformConfig()
    targets: TargetConfig = TargetConfig()
    shards: ShardConfig = ShardConfig()
    loader: LoaderConfig = LoaderConfig()
    augment: AugmentConfig = AugmentConfig()
    model: ModelConfig = ModelConfig()
    loss: LossConfig = LossConfig()
    postprocess: PostprocessConfig = PostprocessConfig()
    train: TrainConfig = TrainConfig()

    def record_settings(self) -> dict[str, Any]:
        """The settings that change the bytes of a shard record (and nothing else)."""
        return {
            "pipeline_version": PIPELINE_VERSION,
            "source": {
                "annotation_frame": self.source.annotation_frame,
                "icdar_coords": self.source.icdar_coords,
                "dont_care": list(self.source.dont_care),
                "outside_tolerance": self.source.outside_tolerance,
            },
            "transform": self.transform.model_dump(mode="json"),
            "targets": self.targets.model_dump(mode="json"),
        }

    def fingerprint(self) -> str:
        """Stable sha256 of ``record_settings()``: equal iff records would be byte-identical."""
        canonical = json.dumps(self.record_settings(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _read_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc}") from None
    try:
        if path.suffix.lower() == ".toml":
            data = tomllib.loads(text)
        elif path.suffix.lower() in (".yaml", ".yml"):
            data = yaml.safe_load(text) or {}
        else:
            raise ConfigError(f"config file {path}: use a .toml, .yaml or .yml file")
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"config file {path} is not valid {path.suffix[1:].upper()}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a table/mapping at the top level")
    return data


def _apply_override(data: dict[str, Any], override: str) -> None:
    if "=" not in override:
        raise ConfigError(f"override {override!r} must look like section.field=value")
    dotted, raw = override.split("=", 1)
    parts = [p for p in dotted.strip().split(".") if p]
    if len(parts) < 2:
        raise ConfigError(f"override {override!r}: name a section and a field, e.g. transform.size=512")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {override!r}: {part} is a value, not a section")
        node = child
    node[parts[-1]] = value


def format_validation_error(exc: ValidationError) -> str:
    """One line per problem: the dotted field, what is allowed, and the value given."""
    lines = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "config"
        given = err.get("input")
        shown = "" if isinstance(given, dict) else f" (got {given!r})"
        lines.append(f"{where}: {err['msg']}{shown}")
    return "invalid configuration:\n  " + "\n  ".join(lines)


def build_config(data: dict[str, Any]) -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc)) from None


def load_config(path: str | Path | None = None, overrides: tuple[str, ...] | list[str] = ()) -> Config:
    """Read an optional TOML/YAML file, apply ``section.field=value`` overrides, validate."""
    data: dict[str, Any] = _read_file(Path(path)) if path is not None else {}
    for override in overrides:
        _apply_override(data, override)
    return build_config(data)
