"""Validated configuration: pydantic models, file loading, ``--set`` overrides, fingerprint.

Validation happens once, at the edge (``load_config``); everything below receives frozen,
typed objects. ``Config.fingerprint()`` hashes exactly the settings that change the bytes of a
shard record, plus the pipeline version, so shards built under other settings are detected as
stale rather than silently used.

Overrides (``--set section.field=value``) are typed by the field they set: text fields (names,
choices such as ``train.precision=32``) take the value verbatim; list fields take
``[a, b]`` or ``a,b`` (``source.dont_care=###``); every other field takes the value as YAML
(``5000`` -> int, ``1.5`` -> float, ``true`` -> bool, ``[1, 2]`` -> list, ``null`` -> None).
"""

from wds_ocr.config.loading import build_config, format_validation_error, load_config
from wds_ocr.config.sections import (ABSENT_MEANS, BUILTIN_BACKBONES, PIPELINE_VERSION, TIMM_PREFIX, AugmentConfig, Config,
                                     EvaluationConfig, LoaderConfig, LossConfig, ModelConfig, PostprocessConfig,
                                     ShardConfig, SourceConfig, TargetConfig, TrainConfig, TransformConfig,
                                     recorded, settings_changes, settings_fingerprint)

__all__ = ["ABSENT_MEANS", "BUILTIN_BACKBONES", "PIPELINE_VERSION", "TIMM_PREFIX", "AugmentConfig", "Config", "EvaluationConfig",
           "LoaderConfig", "LossConfig", "ModelConfig", "PostprocessConfig", "ShardConfig", "SourceConfig",
           "TargetConfig", "TrainConfig", "TransformConfig", "build_config", "format_validation_error", "load_config",
           "recorded", "settings_changes", "settings_fingerprint"]
