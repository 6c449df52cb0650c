"""The configuration's sections as frozen pydantic models, and the fingerprint of the settings that
change a record's bytes (``Config.record_settings``, ``Config.fingerprint``)."""


from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError


# Bump when code changes the bytes a record holds for the same inputs and settings, or which
# samples a build admits (3: image pixel and file size limits, per-member checksums; 4: compact records).
PIPELINE_VERSION = 4


class _Section(BaseModel):
    # allow_inf_nan=False: TOML and YAML both spell NaN and infinity, and neither is a usable setting.
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


def _out_of_order(field: str, value: float, other: str, limit: float, relation: str) -> PydanticCustomError:
    """An error located at ``<section>.<field>`` (see ``format_validation_error``)."""
    return PydanticCustomError(
        "out_of_order",
        "must be {relation} {other} ({limit})",
        {"field": field, "value": value, "relation": relation, "other": other, "limit": limit},
    )


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
    # Images whose header declares more pixels than this are rejected before any decoding (image
    # bombs: a 600-byte JPEG can declare 65500x65500). The largest SROIE receipts are 4961x7016
    # (34.8 MP); 40 MP admits them with a margin and bounds a decode at ~120 MB of RGB.
    max_pixels: int = Field(default=40_000_000, ge=1, le=1 << 32)
    # Image files larger than this are rejected without being read (a decoded 40 MP image is
    # 120 MB; even an uncompressed 16-bit RGBA TIFF of that size fits).
    max_file_bytes: int = Field(default=512 << 20, ge=1, le=1 << 40)
    # Decode work: a progressive JPEG costs a pass over the whole image per scan (libjpeg writes
    # about 10; a 36 MP JPEG of 100,000 scans took 84 s). Counted from the file before decoding.
    max_jpeg_scans: int = Field(default=1000, ge=1, le=1_000_000)
    # Annotation work, each checked before the work starts: the build spends ~0.2 ms and the IoU
    # metric ~1 ms per polygon point; targets and matching grow with the words of an image. SROIE
    # has at most a few hundred words per receipt, and quads or polygons of a few dozen points.
    max_words_per_image: int = Field(default=10_000, ge=1, le=10_000_000)
    max_polygon_points: int = Field(default=1024, ge=3, le=1_000_000)
    # Strings the build writes into records, manifests and rejects (file names, word ids,
    # transcriptions): longer ones are rejects, with their reason. At most 65,536: the record
    # reader refuses longer text (a file name cannot exceed 255 bytes on common file systems).
    max_name_chars: int = Field(default=1024, ge=1, le=65_536)
    max_word_id_chars: int = Field(default=1024, ge=1, le=65_536)
    max_transcription_chars: int = Field(default=65_536, ge=1, le=65_536)


class TransformConfig(_Section):
    """Deterministic resize + pad applied to every image."""

    size: int = Field(default=640, ge=32, le=4096, multiple_of=32)
    pad: Literal["top_left", "center"] = "top_left"
    # "auto" (default): decode a JPEG at the smallest 1/2, 1/4 or 1/8 scale that still leaves it at
    # least as large as its resized size here (libjpeg's DCT scaling), then resize as usual. On
    # sroie-dev train it builds 1.95x faster at 640 px (1.25x at 1600), and the PP-OCRv4 detector
    # scores H-mean +0.008 at 640, +0.004 at 960, +0.001 at 1600 on its records (the DCT scaling
    # averages where INTER_LINEAR from the whole image skips pixels; docs/BENCHMARKS.md, "Build").
    # "off": decode whole. Written to the record settings only when "auto": manifests without it
    # were built with "off".
    jpeg_reduction: Literal["off", "auto"] = "auto"


class TargetConfig(_Section):
    """DBNet target maps (MhLiao/DB definitions; defaults chosen for receipts, see README)."""

    # DB uses 0.4 for word boxes in scene text; receipts are annotated by line (median aspect 4:1
    # on SROIE), where 0.4 shrinks a line to a sixth of its height and unclip cannot restore it:
    # fed the gt maps themselves, post-processing reaches H-mean 0.65 on sroie-dev val at 0.4
    # (with min_text_size 8) and 0.98 at 0.6.
    shrink_ratio: float = Field(default=0.6, gt=0.0, lt=1.0)
    thresh_min: float = Field(default=0.3, ge=0.0, le=1.0)
    thresh_max: float = Field(default=0.7, ge=0.0, le=1.0)
    # DB's 8 px suits scene-text crops; receipts resized to 640 have a median word height of 9-10
    # px, and 8 left 26-32% of sroie-dev's words out of the targets. 3 leaves 0.5-1%.
    min_text_size: float = Field(default=3.0, ge=0.0, le=1024.0)

    @model_validator(mode="after")
    def _ordered(self) -> "TargetConfig":
        if self.thresh_min >= self.thresh_max:
            raise _out_of_order("thresh_min", self.thresh_min, "targets.thresh_max", self.thresh_max, "below")
        return self


class ShardConfig(_Section):
    """How build-shards rolls shards over."""

    max_samples: int = Field(default=256, ge=1, le=1_000_000)
    max_bytes: int = Field(default=1 << 30, ge=1 << 20, le=1 << 40)


class LoaderConfig(_Section):
    """Streaming loader settings."""

    batch_size: int = Field(default=8, ge=1, le=4096)
    # "threads": reader threads in the training process (no shared-memory hand-off: fastest for
    # this read-and-copy loader); "processes": torch DataLoader worker processes.
    mode: Literal["threads", "processes"] = "threads"
    workers: int = Field(default=2, ge=0, le=256)
    shuffle_block: int = Field(default=64, ge=1, le=1_000_000)
    seed: int = Field(default=0, ge=0)
    # Check every member read against the manifest before decoding it: true (default) = its
    # xxh3-64 checksum (about 0.1 ms per 3.3 MB record); "sha256" = its sha256 digest (about 2 ms;
    # also holds against shard bytes crafted by someone who cannot edit the manifest); false = no
    # check (corrupt bytes then reach the model unless a record's structure betrays them).
    verify_hashes: bool | Literal["sha256"] = True
    on_error: Literal["raise", "skip"] = "raise"

    def changed(self, **fields: Any) -> "LoaderConfig":
        """This section with ``fields`` changed (None: left as it is), validated as a config is;
        a name that is not a loader setting is a TypeError naming it."""
        unknown = sorted(set(fields) - set(type(self).model_fields))
        if unknown:
            raise TypeError(f"{', '.join(unknown)}: not loader settings ({', '.join(type(self).model_fields)})")
        changes = {name: value for name, value in fields.items() if value is not None}
        return type(self).model_validate({**self.model_dump(), **changes}) if changes else self


class AugmentConfig(_Section):
    """Training augmentation, applied on the device to image and maps together."""

    hflip: float = Field(default=0.5, ge=0.0, le=1.0)
    affine: bool = True
    scale_min: float = Field(default=0.75, gt=0.0, le=4.0)
    scale_max: float = Field(default=1.25, gt=0.0, le=4.0)
    rotate_degrees: float = Field(default=10.0, ge=0.0, le=180.0)
    translate: float = Field(default=0.1, ge=0.0, le=1.0)
    # Train on random crop_size x crop_size windows of each record (0: the whole record). The window
    # lies inside the sample's image (not its padding) wherever the image is large enough, and
    # replaces ``translate``; scale, rotation and flip still apply. Evaluation always sees whole records.
    crop_size: int = Field(default=0, ge=0, le=4096, multiple_of=32)

    @model_validator(mode="after")
    def _ordered(self) -> "AugmentConfig":
        if self.scale_min > self.scale_max:
            raise _out_of_order("scale_min", self.scale_min, "augment.scale_max", self.scale_max, "at most")
        return self


# Backbones written in this package; any other is "timm:<model name>" (the optional timm extra).
BUILTIN_BACKBONES = ("resnet18", "resnet34", "resnet50", "pplcnetv3")
TIMM_PREFIX = "timm:"
_RGB = tuple[float, float, float]


class ModelConfig(_Section):
    # resnet18/34/50 (torchvision layout), pplcnetv3 (PP-OCRv4's mobile detector backbone, see
    # `wds-ocr import-ppocr`), or "timm:<name>": any timm model whose features_only maps reach
    # strides 4, 8, 16 and 32 (e.g. timm:resnet50d, timm:convnext_tiny, timm:efficientnet_b0).
    backbone: str = "resnet18"
    # "fpn": MhLiao/DB's neck; "rsefpn": PaddleOCR's (squeeze-excite after every conv).
    neck: Literal["fpn", "rsefpn"] = "fpn"
    neck_channels: int = Field(default=256, ge=8, le=1024, multiple_of=4)  # the neck concatenates 4 quarters
    k: float = Field(default=50.0, gt=0.0, le=1000.0)
    # Backbone weights from a file: a torchvision-format state dict for resnet*, a timm checkpoint
    # (.safetensors, .pth, .bin) for timm:<name>. Read only when a run starts from scratch.
    backbone_weights: str | None = None
    # timm:<name> only: download timm's default pretrained weights (Hugging Face hub) when a run
    # starts from scratch. Needs the network; backbone_weights gives the same from a file.
    pretrained: bool = False
    # The input normalization (RGB, 0..1 scale); None: the backbone's own (ImageNet for resnet*,
    # PaddleOCR's for pplcnetv3, the pretrained config's for timm). Training writes the resolved values
    # into its checkpoints, so evaluate, predict and export use what the model was trained with.
    input_mean: _RGB | None = None
    input_std: _RGB | None = None

    @field_validator("backbone")
    @classmethod
    def _known_backbone(cls, name: str) -> str:
        if name not in BUILTIN_BACKBONES and not (name.startswith(TIMM_PREFIX) and name[len(TIMM_PREFIX):].strip()):
            raise PydanticCustomError("unknown_backbone", f"unknown backbone; use one of "
                                      f"{', '.join(BUILTIN_BACKBONES)}, or timm:<model name>")
        return name

    @field_validator("input_std")
    @classmethod
    def _positive_std(cls, std: _RGB | None) -> _RGB | None:
        if std is not None and not all(v > 0 for v in std):
            raise PydanticCustomError("input_std", "every channel's std must be positive")
        return std

    @model_validator(mode="after")
    def _pretrained_needs_timm(self) -> "ModelConfig":
        if self.pretrained and not self.backbone.startswith(TIMM_PREFIX):
            raise _out_of_order("pretrained", True, "model.backbone", self.backbone, "used with a timm:<name> backbone, not")
        return self


class LossConfig(_Section):
    bce_weight: float = Field(default=5.0, ge=0.0)
    l1_weight: float = Field(default=10.0, ge=0.0)
    dice_weight: float = Field(default=1.0, ge=0.0)
    negative_ratio: float = Field(default=3.0, gt=0.0, le=100.0)


class PostprocessConfig(_Section):
    """DB post-processing (MhLiao/DB's ICDAR 2015 defaults, but min_size 2 for receipt text)."""

    thresh: float = Field(default=0.3, gt=0.0, lt=1.0)
    box_thresh: float = Field(default=0.6, ge=0.0, lt=1.0)
    unclip_ratio: float = Field(default=1.5, gt=0.0, le=10.0)
    # DB's 3 drops the shrunk kernels of small receipt text at 640 px (2-3 px high): the gt maps
    # themselves then reach H-mean 0.94 on sroie-dev val instead of 0.98 with 2.
    min_size: float = Field(default=2.0, ge=0.0)
    max_candidates: int = Field(default=1000, ge=1)
    # The least distance (pixels of the probability map) a box is unclipped by (mode "wds"). DB's
    # area * unclip_ratio / perimeter is under a pixel for the few-pixel kernel a single narrow
    # glyph ("1") leaves, so its box stays too small to match its word; 0 keeps DB's rule.
    min_unclip: float = Field(default=0.0, ge=0.0, le=64.0)
    # Lone glyphs (mode "wds"): a box whose long side is under glyph_size x the image's median text
    # height (the short side of its boxes at least twice as long as high) is grown, along the text's
    # height direction, to at least glyph_height x that height. A narrow "1" leaves a kernel a few
    # pixels across whose unclipped box is too short as well as too narrow for its word; 0: off.
    glyph_height: float = Field(default=0.0, ge=0.0, le=4.0)
    glyph_size: float = Field(default=1.0, gt=0.0, le=10.0)
    # "wds": sub-pixel unclip, rounded score mask; "db": MhLiao/DB's boxes exactly (truncation to
    # whole pixels), to compare with published DB numbers (see eval/postprocess.py).
    mode: Literal["wds", "db"] = "wds"

    @model_validator(mode="after")
    def _db_is_db(self) -> "PostprocessConfig":
        if self.mode == "db" and self.min_unclip > 0:
            raise ValueError("postprocess.min_unclip applies to mode 'wds' only (mode 'db' is MhLiao/DB's exact "
                             "boxes); set min_unclip=0 or mode=wds")
        if self.mode == "db" and self.glyph_height > 0:
            raise ValueError("postprocess.glyph_height applies to mode 'wds' only (mode 'db' is MhLiao/DB's exact "
                             "boxes); set glyph_height=0 or mode=wds")
        return self


class EvaluationConfig(_Section):
    """How evaluation (``wds-ocr evaluate`` and validation in ``train``) runs and scores."""

    # Processes that post-process and match probability maps while the model runs the next batch;
    # None: the usable cores (per local rank) minus the loader's workers; 0: in the main process.
    post_workers: int | None = Field(default=None, ge=0, le=256)
    # Run the model on the part of each batch's records that holds its images (the union of their
    # regions, widened to multiples of 32) instead of the whole padded square: a tall receipt at
    # 1600 px fills a third of its record. Scores change a little (the network sees less padding).
    crop_to_content: bool = False


class TrainConfig(_Section):
    epochs: int = Field(default=10, ge=1, le=100_000)
    # The run's length in optimizer steps (epochs continue as needed); None: train.epochs whole
    # epochs. Warmup and decay always span the run's length.
    max_steps: int | None = Field(default=None, ge=1, le=100_000_000)
    lr: float = Field(default=1e-3, gt=0.0, le=10.0)
    # The backbone's learning rate as a share of train.lr; 0 freezes it (no gradients, BatchNorm
    # statistics kept), which suits a pretrained backbone without normalization layers (pplcnetv3
    # folded for inference) and skips its backward pass.
    backbone_lr_scale: float = Field(default=1.0, ge=0.0, le=10.0)
    # Keep every BatchNorm layer's running statistics as they are (eval mode while training; their
    # scale and shift still learn). For fine-tuning a pretrained detector on windows of the records:
    # statistics re-estimated on text-dense windows no longer fit whole pages at evaluation.
    freeze_batchnorm: bool = False
    weight_decay: float = Field(default=1e-4, ge=0.0, le=1.0)
    # Linear warmup, capped at a fifth of the run so that decay always follows it.
    warmup_steps: int = Field(default=50, ge=0)
    schedule: Literal["cosine", "poly"] = "cosine"
    grad_clip: float = Field(default=5.0, ge=0.0)
    accumulate: int = Field(default=1, ge=1, le=1024)
    # "auto": bf16-mixed on a CUDA device that supports bfloat16 (16-mixed on one that does not),
    # 32 on the CPU, where bfloat16 autocast is several times slower than float32.
    precision: Literal["auto", "bf16-mixed", "16-mixed", "32"] = "auto"
    compile: bool = False
    eval_every: int = Field(default=1, ge=0)
    log_every: int = Field(default=10, ge=1)
    seed: int = Field(default=0, ge=0)


# Record settings added after shards and checkpoints were first written, with what their absence
# means (how every earlier build worked). A record's settings hold them only when they differ from
# that, so the fingerprints of earlier builds stay; ``recorded`` restores them when reading.
ABSENT_MEANS: dict[str, dict[str, Any]] = {
    "transform": {"jpeg_reduction": "off"},
    # limits that were constants before they were settings: absent means those constants
    "source": {"max_jpeg_scans": 1000, "max_words_per_image": 10_000, "max_polygon_points": 1024,
               "max_name_chars": 1024, "max_word_id_chars": 1024, "max_transcription_chars": 65_536},
}


def _without_absent(section: str, settings: dict[str, Any]) -> dict[str, Any]:
    """``settings`` without the later-added fields that hold what their absence means."""
    absent = ABSENT_MEANS.get(section, {})
    return {name: value for name, value in settings.items() if name not in absent or value != absent[name]}


def recorded(data: dict[str, Any]) -> dict[str, Any]:
    """Settings a manifest, checkpoint or exported model stored (a copy), each later-added record
    setting it lacks set to what its absence means (only in the sections it holds)."""
    copy = json.loads(json.dumps(data))
    for section, fields in ABSENT_MEANS.items():
        if isinstance(copy.get(section), dict):
            for name, value in fields.items():
                copy[section].setdefault(name, value)
    return copy


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
    evaluation: EvaluationConfig = EvaluationConfig()
    train: TrainConfig = TrainConfig()

    def record_settings(self) -> dict[str, Any]:
        """The settings that change the bytes of a shard record (and nothing else)."""
        return {
            "pipeline_version": PIPELINE_VERSION,
            "source": _without_absent("source", {
                "annotation_frame": self.source.annotation_frame,
                "icdar_coords": self.source.icdar_coords,
                "dont_care": list(self.source.dont_care),
                "outside_tolerance": self.source.outside_tolerance,
                "max_pixels": self.source.max_pixels,
                "max_file_bytes": self.source.max_file_bytes,
                **{name: getattr(self.source, name) for name in ABSENT_MEANS["source"]},
            }),
            "transform": _without_absent("transform", self.transform.model_dump(mode="json")),
            "targets": self.targets.model_dump(mode="json"),
        }

    def fingerprint(self) -> str:
        """Stable sha256 of ``record_settings()``: equal iff records would be byte-identical."""
        return settings_fingerprint(self.record_settings())


def settings_fingerprint(settings: dict[str, Any]) -> str:
    """sha256 of a settings dict's canonical JSON (sorted keys, no spaces): a config's fingerprint,
    and what verify recomputes from a manifest's stored record_settings."""
    canonical = json.dumps(settings, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def settings_changes(built: Any, now: Any, line: str = "{field}: built with {built!r}, now {now!r}",
                     prefix: str = "") -> list[str]:
    """One ``line`` per leaf where two nested settings dicts differ (fields in sorted order);
    ``line`` gets ``field`` (dotted, after ``prefix``), ``built`` and ``now``."""
    if isinstance(built, dict) and isinstance(now, dict):
        return [change for name in sorted(set(built) | set(now))
                for change in settings_changes(built.get(name), now.get(name), line, f"{prefix}{name}.")]
    return [] if built == now else [line.format(field=prefix.rstrip("."), built=built, now=now)]
