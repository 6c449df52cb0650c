"""The manifest: the contract between a build and everything that reads its shards.

Written last and atomically (temp name, fsync, rename). It holds the schema version, the config
fingerprint and the settings behind it, the source fingerprint, the counts, and per shard its
name, sample count, bytes, sha256, keys, per-sample byte offsets and per-sample digests (the
first 16 hex digits of the sha256 of each member's bytes, so a corrupt byte is traced to its key).
No timestamps: the same build gives the same manifest bytes. A reader refuses a schema it does
not know.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from wds_ocr.data.coverage import Coverage
from wds_ocr.errors import ManifestError

SCHEMA = "wds-ocr/manifest"
SCHEMA_VERSION = 2
MANIFEST_NAME = "manifest.json"
DIGEST_HEX = 16


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

    def span(self, position: int) -> tuple[int, int]:
        """(start, stop) bytes of the member at ``position`` within the shard."""
        stop = self.offsets[position + 1] if position + 1 < self.samples else self.members_end
        return self.offsets[position], stop


@dataclass(frozen=True)
class Manifest:
    fingerprint: str
    record_settings: dict[str, Any]
    source: dict[str, Any]
    counts: dict[str, Any]  # samples_in, written, rejected, words_skipped; words: a Coverage dict
    shard_settings: dict[str, Any]
    shards: tuple[ShardEntry, ...]
    environment: dict[str, str]
    partition: dict[str, int] | None = None
    source_digests: tuple[str, ...] | None = None  # part manifests only: merged into source.fingerprint
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def total_samples(self) -> int:
        return sum(entry.samples for entry in self.shards)

    @property
    def coverage(self) -> Coverage:
        """Words in the training targets and left out of them, by reason (validated at parse time)."""
        return Coverage.from_dict(self.counts["words"], "counts.words")

    @property
    def image_size(self) -> int:
        return int(self.record_settings["transform"]["size"])

    def to_json(self) -> str:
        body = {"schema": SCHEMA, "schema_version": SCHEMA_VERSION}
        body.update(asdict(self))
        if body["partition"] is None:
            del body["partition"]
        if body["source_digests"] is None:
            del body["source_digests"]
        if not body["extra"]:
            del body["extra"]
        return json.dumps(body, sort_keys=True, indent=1, ensure_ascii=False) + "\n"


def _require(body: dict[str, Any], name: str, kind: type | tuple[type, ...], where: str) -> Any:
    if name not in body:
        raise ManifestError(f"{where}: field {name!r} is missing")
    value = body[name]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is int:
        raise ManifestError(f"{where}: field {name!r} has the wrong type ({type(value).__name__})")
    return value


def _shard_from(body: Any, where: str) -> ShardEntry:
    if not isinstance(body, dict):
        raise ManifestError(f"{where}: each shard entry must be an object")
    name = _require(body, "name", str, where)
    here = f"{where} shard {name!r}"
    if "/" in name or "\\" in name or name in ("", ".", ".."):
        raise ManifestError(f"{here}: shard names must be plain file names")
    entry = ShardEntry(
        name=name,
        samples=_require(body, "samples", int, here),
        bytes=_require(body, "bytes", int, here),
        sha256=_require(body, "sha256", str, here),
        first_key=_require(body, "first_key", str, here),
        last_key=_require(body, "last_key", str, here),
        keys=tuple(_require(body, "keys", list, here)),
        offsets=tuple(_require(body, "offsets", list, here)),
        digests=tuple(_require(body, "digests", list, here)),
        members_end=_require(body, "members_end", int, here),
    )
    if not all(isinstance(k, str) and k and "." not in k for k in entry.keys):
        raise ManifestError(f"{here}: keys must be non-empty strings without dots")
    if not all(isinstance(d, str) for d in entry.digests):
        raise ManifestError(f"{here}: digests must be strings")
    n = entry.samples
    if not (len(entry.keys) == len(entry.offsets) == len(entry.digests) == n) or n < 1:
        raise ManifestError(f"{here}: samples={n} but {len(entry.keys)} keys, {len(entry.offsets)} offsets, "
                            f"{len(entry.digests)} digests")
    if entry.keys[0] != entry.first_key or entry.keys[-1] != entry.last_key:
        raise ManifestError(f"{here}: first_key/last_key disagree with its keys")
    previous = -1
    for offset in entry.offsets:
        if not isinstance(offset, int) or offset <= previous or offset % 512:
            raise ManifestError(f"{here}: offsets must be increasing multiples of 512")
        previous = offset
    if not previous < entry.members_end <= entry.bytes:
        raise ManifestError(f"{here}: members_end {entry.members_end} is outside its {entry.bytes} bytes")
    return entry


def _check_record_settings(settings: dict[str, Any], where: str) -> None:
    """The fields readers use: transform.size and the targets' threshold range."""
    transform = settings.get("transform")
    targets = settings.get("targets")
    if (
        not isinstance(transform, dict)
        or type(transform.get("size")) is not int
        or not isinstance(targets, dict)
        or not all(isinstance(targets.get(f), (int, float)) for f in ("thresh_min", "thresh_max"))
    ):
        raise ManifestError(f"{where}: record_settings lacks transform.size or targets.thresh_min/thresh_max")


def _check_partition(partition: Any, digests: Any, where: str) -> None:
    if partition is None and digests is None:
        return
    fields = ("index", "count", "lo", "hi")
    if not isinstance(partition, dict) or not all(type(partition.get(f)) is int for f in fields):
        raise ManifestError(f"{where}: partition must be an object with integer {', '.join(fields)}")
    if not 0 <= partition["index"] < partition["count"] or not 0 <= partition["lo"] <= partition["hi"]:
        raise ManifestError(f"{where}: partition {partition} is not a valid part")
    if not isinstance(digests, list) or len(digests) != partition["hi"] - partition["lo"]:
        raise ManifestError(f"{where}: a part manifest lists one source digest per sample of its range")


def parse_manifest(text: str | bytes, where: str) -> Manifest:
    """Parse and validate manifest JSON; ``where`` names it in errors."""
    try:
        body = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{where} is not valid JSON: {exc}") from None
    if not isinstance(body, dict) or body.get("schema") != SCHEMA:
        raise ManifestError(f"{where} is not a wds-ocr manifest (schema {body.get('schema') if isinstance(body, dict) else None!r})")
    version = body.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ManifestError(
            f"{where} has schema_version {version!r}; this wds-ocr reads version {SCHEMA_VERSION}: "
            "upgrade wds-ocr or rebuild the shards"
        )
    shards = _require(body, "shards", list, where)
    _check_record_settings(_require(body, "record_settings", dict, where), where)
    _check_partition(body.get("partition"), body.get("source_digests"), where)
    manifest = Manifest(
        fingerprint=_require(body, "fingerprint", str, where),
        record_settings=_require(body, "record_settings", dict, where),
        source=_require(body, "source", dict, where),
        counts=_require(body, "counts", dict, where),
        shard_settings=_require(body, "shard_settings", dict, where),
        shards=tuple(_shard_from(s, where) for s in shards),
        environment=_require(body, "environment", dict, where),
        partition=body.get("partition"),
        source_digests=tuple(body["source_digests"]) if "source_digests" in body else None,
        extra=body.get("extra", {}),
    )
    try:
        Coverage.from_dict(manifest.counts.get("words"), "counts.words")
    except ValueError as exc:
        raise ManifestError(f"{where}: {exc}") from None
    names = [s.name for s in manifest.shards]
    if len(set(names)) != len(names):
        raise ManifestError(f"{where}: a shard is listed twice")
    if manifest.counts.get("written") != manifest.total_samples:
        raise ManifestError(
            f"{where}: counts.written={manifest.counts.get('written')} but the shards hold {manifest.total_samples} samples"
        )
    return manifest


def manifest_path(location: str | Path) -> Path:
    path = Path(location)
    return path if path.suffix == ".json" else path / MANIFEST_NAME


def load_manifest(location: str | Path) -> Manifest:
    """Load ``DIR/manifest.json`` (or a manifest file path)."""
    path = manifest_path(location)
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        raise ManifestError(f"{path} does not exist: build the shards first (wds-ocr build-shards) "
                            "or merge the parts (wds-ocr merge)") from None
    except OSError as exc:
        raise ManifestError(f"{path} cannot be read: {exc}") from None
    return parse_manifest(text, str(path))


def write_atomic(path: Path, data: bytes) -> None:
    """Write to a temporary name, fsync, rename over ``path``, fsync the folder."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_manifest(path: Path, manifest: Manifest) -> None:
    write_atomic(path, manifest.to_json().encode("utf-8"))
