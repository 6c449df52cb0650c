"""One exception tree for the whole package.

Every error says what went wrong, where (file, shard, key, field) and what to do.
Only the CLI turns these into messages and exit codes (``exit_code`` below).

Errors pickle with their fields (``__reduce__``), so one raised in a DataLoader worker process
arrives in the main process as the same type with the same message.
"""

from __future__ import annotations


class WdsOcrError(Exception):
    """Base class: a problem the user can act on."""

    exit_code = 1


class ConfigError(WdsOcrError):
    """An invalid configuration file, value or override."""

    exit_code = 2


class UsageError(WdsOcrError):
    """A command used wrongly: an option value that cannot work (a split the source does not
    have, a partition that does not exist, two overrides of one setting that disagree)."""

    exit_code = 2


class SourceError(WdsOcrError):
    """A dataset that cannot be read as a whole (missing folder, unreadable annotation file)."""


class SampleError(WdsOcrError):
    """One sample cannot be used (missing, empty, truncated, oversized or non-image file).

    Batch jobs record these as rejects with ``name`` and ``reason`` instead of stopping.
    """

    def __init__(self, name: str, reason: str):
        super().__init__(f"{name}: {reason}")
        self.name = name
        self.reason = reason

    def __reduce__(self):
        return (type(self), (self.name, self.reason))


class ShardFormatError(WdsOcrError):
    """A shard, tar member or record that does not follow the format.

    The loader's ``on_error="skip"`` policy skips these (and only these): the record is bad, the
    stream can go on.
    """

    def __init__(self, shard: str, key: str | None, reason: str):
        where = f"{shard}" if key is None else f"{shard} [{key}]"
        super().__init__(f"{where}: {reason}")
        self.shard = shard
        self.key = key
        self.reason = reason

    def __reduce__(self):
        return (type(self), (self.shard, self.key, self.reason))


class IntegrityError(ShardFormatError):
    """Shard bytes that do not match the manifest (checksum, hash, size, count)."""


class ShardsChangedError(WdsOcrError):
    """The manifest a reader opened was replaced or removed while it was reading: the shards were
    rebuilt under it. Never skipped: every later record may belong to another build."""


class RemoteError(WdsOcrError):
    """A server that could not deliver a byte range within its retries and deadlines, or that
    answered in a way the loader refuses (no Range support, wrong length, redirect elsewhere).
    Never skipped: the records are not known to be bad, the transport failed."""


class ManifestError(WdsOcrError):
    """A manifest that is missing, unreadable, of an unknown schema, or inconsistent."""


class OlderManifestError(ManifestError):
    """A manifest written by an older wds-ocr, whose shards this one cannot read: rebuild them."""

    def __init__(self, message: str, version: int):
        super().__init__(message)
        self.version = version


class NotAShardFolderError(ManifestError):
    """A file given where a shard folder (or its manifest) was expected: bad usage."""

    exit_code = 2


class StaleShardsError(WdsOcrError):
    """Shards built with other record settings than the configuration a command was given (its
    --config/--set change them, or another split's shards were built differently): a
    configuration that cannot work with these shards, so exit code 2."""

    exit_code = 2


class BuildError(WdsOcrError):
    """A build that cannot proceed (output folder in use by another build or holding shards built
    with other settings, parts that disagree)."""


class CheckpointError(WdsOcrError):
    """A checkpoint that is missing, unreadable or made for another model."""
