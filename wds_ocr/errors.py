"""One exception tree for the whole package.

Every error says what went wrong, where (file, shard, key, field) and what to do.
Only the CLI turns these into messages and exit codes (``exit_code`` below).
"""

from __future__ import annotations


class WdsOcrError(Exception):
    """Base class: a problem the user can act on."""

    exit_code = 1


class ConfigError(WdsOcrError):
    """An invalid configuration file, value or override."""

    exit_code = 2


class SourceError(WdsOcrError):
    """A dataset that cannot be read as a whole (missing folder, unreadable annotation file)."""


class SampleError(WdsOcrError):
    """One sample cannot be used (missing, empty, truncated or non-image file).

    Batch jobs record these as rejects with ``name`` and ``reason`` instead of stopping.
    """

    def __init__(self, name: str, reason: str):
        super().__init__(f"{name}: {reason}")
        self.name = name
        self.reason = reason


class ShardFormatError(WdsOcrError):
    """A shard, tar member or record that does not follow the format."""

    def __init__(self, shard: str, key: str | None, reason: str):
        where = f"{shard}" if key is None else f"{shard} [{key}]"
        super().__init__(f"{where}: {reason}")
        self.shard = shard
        self.key = key
        self.reason = reason


class IntegrityError(ShardFormatError):
    """Shard bytes that do not match the manifest (hash, size, count)."""


class ManifestError(WdsOcrError):
    """A manifest that is missing, unreadable, of an unknown schema, or inconsistent."""


class StaleShardsError(WdsOcrError):
    """Shards built with a different configuration or pipeline version than the current one."""


class BuildError(WdsOcrError):
    """A build that cannot proceed (output folder in use by another build, parts that disagree)."""


class CheckpointError(WdsOcrError):
    """A checkpoint that is missing, unreadable or made for another model."""
