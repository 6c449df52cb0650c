"""The manifest's schema: its constants and the validated objects a parsed manifest is made of."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from wds_ocr.data.coverage import Coverage


SCHEMA = "wds-ocr/manifest"
SCHEMA_VERSION = 4  # 4: compact records (record version 3); 3: full-array records, checksums
DIGEST_HEX = 16
CHECKSUM = "xxh3_64"  # the per-member checksum the loader verifies by default
CHECKSUM_HEX = 16
MAX_MANIFEST_BYTES = 512 << 20
MAX_SHARD_BYTES = 1 << 41  # shards.max_bytes is at most 1 TiB; one record over it gets its own shard
MAX_MEMBER_SPAN = (1 << 31) + 1024  # a member of at most 2 GiB data (tario.MAX_MEMBER_BYTES) + header
MAX_SHARD_SAMPLES = 1_000_000
TAR_TAIL = 2 * 512  # end-of-archive blocks
TAR_RECORD = 20 * 512  # tarfile pads the archive to a multiple of this
HEX = re.compile(r"[0-9a-f]+")


@dataclass(frozen=True)
class ShardEntry:
    name: str
    samples: int
    bytes: int
    sha256: str
    first_key: str
    last_key: str
    keys: tuple[str, ...]
    offsets: tuple[int, ...]  # byte offset of each member's header block
    digests: tuple[str, ...]  # sha256[:16] of each member's span (header + data + padding)
    members_end: int  # where the end-of-archive blocks begin
    checksums: tuple[str, ...] = ()  # xxh3-64 hex of each member's span

    def span(self, position: int) -> tuple[int, int]:
        """(start, stop) bytes of the member at ``position`` within the shard."""
        stop = self.offsets[position + 1] if position + 1 < self.samples else self.members_end
        return self.offsets[position], stop

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, body: Any, where: str) -> "ShardEntry":
        """From its manifest/journal form, every field validated (``manifest_checks.shard_from``)."""
        from wds_ocr.shards.manifest_checks import shard_from  # the checks build on this module

        return shard_from(body, where)


@dataclass(frozen=True)
class Counts:
    samples_in: int  # samples listed in the build's range (+ those rejected while listing)
    written: int
    rejected: int
    words_skipped: int
    words: Coverage  # words of the written records: in the targets, or left out and why

    def as_dict(self) -> dict[str, Any]:
        return {"samples_in": self.samples_in, "written": self.written, "rejected": self.rejected,
                "words_skipped": self.words_skipped, "words": self.words.as_dict()}

    def __add__(self, other: "Counts") -> "Counts":
        return Counts(self.samples_in + other.samples_in, self.written + other.written,
                      self.rejected + other.rejected, self.words_skipped + other.words_skipped,
                      self.words + other.words)


@dataclass(frozen=True)
class PartRange:
    """Which part of a partitioned build a manifest covers: listing positions [lo, hi)."""

    index: int
    count: int
    lo: int
    hi: int

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass(frozen=True)
class Manifest:
    fingerprint: str
    record_settings: dict[str, Any]
    source: dict[str, Any]
    counts: Counts
    shard_settings: dict[str, Any]
    shards: tuple[ShardEntry, ...]
    environment: dict[str, str]
    partition: PartRange | None = None
    source_digests: tuple[str, ...] | None = None  # part manifests only: merged into source.fingerprint
    extra: dict[str, Any] = field(default_factory=dict)
    checksum: str = CHECKSUM

    @property
    def total_samples(self) -> int:
        return sum(entry.samples for entry in self.shards)

    @property
    def coverage(self) -> Coverage:
        """Words in the training targets and left out of them, by reason."""
        return self.counts.words

    @property
    def image_size(self) -> int:
        return int(self.record_settings["transform"]["size"])

    @property
    def thresh_range(self) -> tuple[float, float]:
        targets = self.record_settings["targets"]
        return float(targets["thresh_min"]), float(targets["thresh_max"])

    def to_json(self) -> str:
        body: dict[str, Any] = {"schema": SCHEMA, "schema_version": SCHEMA_VERSION, "checksum": self.checksum,
                                "fingerprint": self.fingerprint, "record_settings": self.record_settings,
                                "source": self.source, "counts": self.counts.as_dict(),
                                "shard_settings": self.shard_settings,
                                "shards": [entry.as_dict() for entry in self.shards],
                                "environment": self.environment}
        if self.partition is not None:
            body["partition"] = self.partition.as_dict()
        if self.source_digests is not None:
            body["source_digests"] = list(self.source_digests)
        if self.extra:
            body["extra"] = self.extra
        return json.dumps(body, sort_keys=True, indent=1, ensure_ascii=False) + "\n"
