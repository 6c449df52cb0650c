"""The manifest: the contract between a build and everything that reads its shards.

Written last and atomically (temp name, fsync, rename). It holds the schema version, the config
fingerprint and the settings behind it, the source fingerprint, the counts, and per shard its
name, sample count, bytes, sha256, keys, per-sample byte offsets, per-sample digests (the first 16
hex digits of the sha256 of each member's bytes, so a corrupt byte is traced to its key) and
per-sample checksums (xxh3-64 of the same bytes: what the loader checks on every read, at about a
twentieth of sha256's cost). No timestamps: the same build gives the same manifest bytes.

A manifest is input like any other: parsing validates every field a reader uses, once — types,
ranges (no offset past 2^41, no image size the config would refuse), shard names that are plain
``shard-NNNNNN.tar`` names (never a path or URL), keys that are record keys in strictly increasing
listing order, counts that add up — so that everything downstream can trust a ``Manifest``. A
reader refuses a schema it does not know; schemas 2 (before per-member checksums) and 3 (records
of full arrays, before the compact record version 3) ask for a rebuild.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from wds_ocr.data.paths import write_atomic
from wds_ocr import jsonio
from wds_ocr.config import ABSENT_MEANS, PIPELINE_VERSION, Config, ShardConfig, build_config
from wds_ocr.data.coverage import Coverage
from wds_ocr.data.sources import read_regular_file
from wds_ocr.errors import ConfigError, ManifestError, NotAShardFolderError, OlderManifestError
from wds_ocr.shards.naming import MANIFEST_NAME, MAX_INDEX, SHARD_PATTERN, key_index

SCHEMA = "wds-ocr/manifest"
SCHEMA_VERSION = 4  # 4: compact records (record version 3); 3: full-array records, checksums
DIGEST_HEX = 16
CHECKSUM = "xxh3_64"  # the per-member checksum the loader verifies by default
CHECKSUM_HEX = 16
MAX_MANIFEST_BYTES = 512 << 20
MAX_SHARD_BYTES = 1 << 41  # shards.max_bytes is at most 1 TiB; one record over it gets its own shard
MAX_MEMBER_SPAN = (1 << 31) + 1024  # a member of at most 2 GiB data (tario.MAX_MEMBER_BYTES) + header
MAX_SHARD_SAMPLES = 1_000_000
_TAR_TAIL = 2 * 512  # end-of-archive blocks
_TAR_RECORD = 20 * 512  # tarfile pads the archive to a multiple of this
_HEX = re.compile(r"[0-9a-f]+")


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
        """From its manifest/journal form, every field validated (see ``_shard_from``)."""
        return _shard_from(body, where)


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


# ----------------------------------------------------------------------------- validation


def _is_int(value: Any, low: int, high: int) -> bool:
    return type(value) is int and low <= value <= high


def _require(body: dict[str, Any], name: str, kind: type | tuple[type, ...], where: str) -> Any:
    if name not in body:
        raise ManifestError(f"{where}: field {name!r} is missing")
    value = body[name]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is int:
        raise ManifestError(f"{where}: field {name!r} has the wrong type ({type(value).__name__})")
    return value


def _integer(body: dict[str, Any], name: str, low: int, high: int, where: str) -> int:
    value = _require(body, name, int, where)
    if not low <= value <= high:
        raise ManifestError(f"{where}: field {name!r} is {value}, outside {low}..{high}")
    return value


def _hex_list(values: list, width: int, what: str, here: str) -> tuple[str, ...]:
    if not all(isinstance(v, str) and len(v) == width and _HEX.fullmatch(v) for v in values):
        raise ManifestError(f"{here}: {what} must be {width}-digit lowercase hex strings")
    return tuple(values)


def _shard_from(body: Any, where: str) -> ShardEntry:
    if not isinstance(body, dict):
        raise ManifestError(f"{where}: each shard entry must be an object")
    name = _require(body, "name", str, where)
    here = f"{where} shard {name!r}"
    if not SHARD_PATTERN.fullmatch(name):
        raise ManifestError(f"{here}: shard names must be plain file names of the form shard-NNNNNN.tar "
                            "(or shard-pIIIofNNN-NNNNNN.tar); paths, URLs and other names are refused")
    samples = _integer(body, "samples", 1, MAX_SHARD_SAMPLES, here)
    total = _integer(body, "bytes", 0, MAX_SHARD_BYTES, here)
    sha256 = _require(body, "sha256", str, here)
    if len(sha256) != 64 or not _HEX.fullmatch(sha256):
        raise ManifestError(f"{here}: sha256 must be 64 lowercase hex digits")
    keys = _require(body, "keys", list, here)
    offsets = _require(body, "offsets", list, here)
    digests = _hex_list(_require(body, "digests", list, here), DIGEST_HEX, "digests", here)
    checksums = _hex_list(_require(body, "checksums", list, here), CHECKSUM_HEX, "checksums", here)
    if not all(key_index(k) is not None for k in keys):
        raise ManifestError(f"{here}: keys must be record keys (a listing index of 7+ digits, '_', "
                            "then letters, digits, '_' or '-')")
    if not len(keys) == len(offsets) == len(digests) == len(checksums) == samples:
        raise ManifestError(f"{here}: samples={samples} but {len(keys)} keys, {len(offsets)} offsets, "
                            f"{len(digests)} digests, {len(checksums)} checksums")
    first_key = _require(body, "first_key", str, here)
    last_key = _require(body, "last_key", str, here)
    if keys[0] != first_key or keys[-1] != last_key:
        raise ManifestError(f"{here}: first_key/last_key disagree with its keys")
    members_end = _integer(body, "members_end", 1, MAX_SHARD_BYTES, here)
    previous = None
    for offset in offsets:
        if type(offset) is not int or offset % 512 or (offset != 0 if previous is None else offset <= previous):
            raise ManifestError(f"{here}: offsets must be increasing multiples of 512 starting at 0")
        if previous is not None and offset - previous > MAX_MEMBER_SPAN:
            raise ManifestError(f"{here}: a member spans {offset - previous} bytes, over the format's "
                                f"{MAX_MEMBER_SPAN}")
        previous = offset
    if not previous < members_end <= previous + MAX_MEMBER_SPAN or members_end % 512:
        raise ManifestError(f"{here}: members_end {members_end} does not follow its last member at byte {previous}")
    if not members_end + _TAR_TAIL <= total <= members_end + _TAR_TAIL + _TAR_RECORD:
        raise ManifestError(f"{here}: {total} bytes cannot hold members up to byte {members_end} and the "
                            "end-of-archive blocks")
    extra = sorted(set(body) - {f for f in ShardEntry.__dataclass_fields__})
    if extra:
        raise ManifestError(f"{here}: unknown fields {extra}")
    return ShardEntry(name, samples, total, sha256, first_key, last_key, tuple(keys), tuple(offsets), digests,
                      members_end, checksums)


# Record settings that may be absent: written only when not "off" (absent means how every earlier
# build worked, so their fingerprints stay).
OPTIONAL_RECORD_SETTINGS = {section: set(fields) for section, fields in ABSENT_MEANS.items()}


def _check_record_settings(settings: dict[str, Any], where: str) -> None:
    """The same sections and settings this code writes, each within the range the config allows."""
    expected = Config().record_settings()
    for section, names in expected.items():
        if section == "pipeline_version":
            continue
        given = settings.get(section)
        optional = OPTIONAL_RECORD_SETTINGS.get(section, set())
        required = set(names) - optional
        missing = sorted(required - set(given)) if isinstance(given, dict) else sorted(required)
        unknown = sorted(set(given) - required - optional) if isinstance(given, dict) else []
        if missing or unknown:
            details = "; ".join(filter(None, [missing and f"lacks {section}.{', '.join(missing)}",
                                              unknown and f"has unknown {section}.{', '.join(unknown)}"]))
            raise ManifestError(f"{where}: record_settings {details}")
    unknown = sorted(set(settings) - set(expected))
    if unknown:
        raise ManifestError(f"{where}: record_settings has unknown sections {unknown}")
    if not _is_int(settings.get("pipeline_version"), 1, 1 << 20):
        raise ManifestError(f"{where}: record_settings.pipeline_version must be a positive integer")
    try:
        build_config({name: settings[name] for name in ("source", "transform", "targets")})
    except ConfigError as exc:
        detail = str(exc).replace("invalid configuration:\n  ", "").replace("\n  ", "; ")
        raise ManifestError(f"{where}: record_settings are outside what this wds-ocr allows: {detail}") from None


def _check_source(source: dict[str, Any], where: str) -> None:
    if source.get("format") not in ("json", "icdar"):
        raise ManifestError(f"{where}: source.format must be 'json' or 'icdar'")
    for name in ("split", "annotation_sha256"):
        if not isinstance(source.get(name), str):
            raise ManifestError(f"{where}: source.{name} must be a string")
    if source.get("fingerprint") is not None and not isinstance(source.get("fingerprint"), str):
        raise ManifestError(f"{where}: source.fingerprint must be a string or null")
    if not _is_int(source.get("listed"), 0, MAX_INDEX):
        raise ManifestError(f"{where}: source.listed must be a non-negative integer")
    rejected = source.get("listing_rejects")
    if not isinstance(rejected, list) or not all(isinstance(n, str) for n in rejected):
        raise ManifestError(f"{where}: source.listing_rejects must be a list of names")
    if len(rejected) > source["listed"]:
        raise ManifestError(f"{where}: source.listing_rejects names more samples than source.listed")


def _counts_from(body: Any, where: str) -> Counts:
    if not isinstance(body, dict):
        raise ManifestError(f"{where}: field 'counts' has the wrong type ({type(body).__name__})")
    here = f"{where} counts"
    values = {name: _integer(body, name, 0, MAX_INDEX, here)
              for name in ("samples_in", "written", "rejected", "words_skipped")}
    try:
        words = Coverage.from_dict(body.get("words"), "counts.words")
    except ValueError as exc:
        raise ManifestError(f"{where}: {exc}") from None
    unknown = sorted(set(body) - {*values, "words"})
    if unknown:
        raise ManifestError(f"{where}: counts has unknown fields {unknown}")
    return Counts(**values, words=words)


def _partition_from(partition: Any, digests: Any, where: str) -> PartRange | None:
    if partition is None and digests is None:
        return None
    fields = ("index", "count", "lo", "hi")
    if not isinstance(partition, dict) or set(partition) != set(fields) or \
            not all(_is_int(partition[f], 0, MAX_INDEX) for f in fields):
        raise ManifestError(f"{where}: partition must be an object with integer {', '.join(fields)}")
    part = PartRange(**partition)
    if not 0 <= part.index < part.count <= 999 or not part.lo <= part.hi:
        raise ManifestError(f"{where}: partition {partition} is not a valid part")
    if not isinstance(digests, list) or len(digests) != part.hi - part.lo or \
            not all(isinstance(d, str) for d in digests):
        raise ManifestError(f"{where}: a part manifest lists one source digest per sample of its range")
    return part


def _check_consistency(manifest: Manifest, where: str) -> None:
    names = [s.name for s in manifest.shards]
    if len(set(names)) != len(names):
        raise ManifestError(f"{where}: a shard is listed twice")
    counts = manifest.counts
    if counts.written != manifest.total_samples:
        raise ManifestError(f"{where}: counts.written={counts.written} but the shards hold "
                            f"{manifest.total_samples} samples")
    if counts.samples_in != counts.written + counts.rejected:
        raise ManifestError(f"{where}: counts.samples_in={counts.samples_in} is not written {counts.written} + "
                            f"rejected {counts.rejected}")
    source = manifest.source
    listing_rejects = len(source["listing_rejects"])
    if manifest.partition is None:
        lo, hi, expected_in = 0, source["listed"] - listing_rejects, source["listed"]
    else:
        part = manifest.partition
        lo, hi = part.lo, part.hi
        expected_in = hi - lo + (listing_rejects if part.index == 0 else 0)
        if hi > source["listed"] - listing_rejects:
            raise ManifestError(f"{where}: partition range {lo}..{hi} lies beyond the {source['listed']} "
                                "listed samples")
    if counts.samples_in != expected_in:
        raise ManifestError(f"{where}: counts.samples_in={counts.samples_in} but the source lists {expected_in} "
                            "samples for this build")
    previous = -1
    for entry in manifest.shards:
        for key in entry.keys:
            index = key_index(key)
            if index <= previous:
                raise ManifestError(f"{where} shard {entry.name!r}: key {key!r} is not after the previous key "
                                    "(keys are listed once, in listing order)")
            if index >= source["listed"]:
                raise ManifestError(f"{where} shard {entry.name!r}: key {key!r} lies outside the source listing")
            previous = index
    if manifest.checksum != CHECKSUM:
        raise ManifestError(f"{where}: checksum {manifest.checksum!r} is not one this wds-ocr computes "
                            f"({CHECKSUM!r}); rebuild the shards")


_SAFE_SPLIT = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def _old_split(body: dict[str, Any]) -> str:
    """The split an older manifest names, for the rebuild command (SPLIT unless it is a plain name)."""
    source = body.get("source")
    split = source.get("split") if isinstance(source, dict) else None
    return split if isinstance(split, str) and _SAFE_SPLIT.fullmatch(split) else "SPLIT"


def _folder_of(where: str) -> str:
    """The folder (or URL) a manifest named ``where`` lies in."""
    return where.rsplit("/", 1)[0] if "/" in where else "."


def parse_manifest(text: str | bytes, where: str) -> Manifest:
    """Parse and validate manifest JSON; ``where`` names it in errors."""
    if len(text) > MAX_MANIFEST_BYTES:
        raise ManifestError(f"{where} is {len(text)} bytes, over the {MAX_MANIFEST_BYTES}-byte limit for a manifest")
    try:
        body = jsonio.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{where} is not valid JSON: {exc}") from None
    except jsonio.JsonNumberError as exc:
        raise ManifestError(f"{where} {exc}; no manifest field needs such a number") from None
    except RecursionError:
        raise ManifestError(f"{where} is nested too deeply to be a manifest") from None
    if not isinstance(body, dict) or body.get("schema") != SCHEMA:
        raise ManifestError(f"{where} is not a wds-ocr manifest (schema {body.get('schema') if isinstance(body, dict) else None!r})")
    version = body.get("schema_version")
    if version != SCHEMA_VERSION:
        if type(version) is int and version < SCHEMA_VERSION:
            raise OlderManifestError(
                f"{where} has schema_version {version}, written by an older wds-ocr (this one reads version "
                f"{SCHEMA_VERSION}: compact records with per-member checksums); rebuild the shards: wds-ocr "
                f"build-shards SOURCE --split {_old_split(body)} --out {_folder_of(where)} --overwrite", version)
        raise ManifestError(
            f"{where} has schema_version {version!r}; this wds-ocr reads version {SCHEMA_VERSION}: "
            "upgrade wds-ocr or rebuild the shards"
        )
    known = {"schema", "schema_version", "checksum", "fingerprint", "record_settings", "source", "counts",
             "shard_settings", "shards", "environment", "partition", "source_digests", "extra"}
    unknown = sorted(set(body) - known)
    if unknown:
        raise ManifestError(f"{where}: unknown fields {unknown}")
    fingerprint = _require(body, "fingerprint", str, where)
    settings = _require(body, "record_settings", dict, where)
    _check_record_settings(settings, where)
    source = _require(body, "source", dict, where)
    _check_source(source, where)
    shard_settings = _require(body, "shard_settings", dict, where)
    try:
        ShardConfig.model_validate(shard_settings)
    except Exception:
        raise ManifestError(f"{where}: shard_settings are not valid shard settings") from None
    environment = _require(body, "environment", dict, where)
    if not all(isinstance(v, str) for v in environment.values()):
        raise ManifestError(f"{where}: environment values must be strings")
    extra = body.get("extra", {})
    if not isinstance(extra, dict):
        raise ManifestError(f"{where}: field 'extra' must be an object")
    shards = _require(body, "shards", list, where)
    partition = _partition_from(body.get("partition"), body.get("source_digests"), where)
    manifest = Manifest(
        fingerprint=fingerprint,
        record_settings=settings,
        source=source,
        counts=_counts_from(_require(body, "counts", dict, where), where),
        shard_settings=shard_settings,
        shards=tuple(_shard_from(s, where) for s in shards),
        environment=environment,
        partition=partition,
        source_digests=tuple(body["source_digests"]) if partition is not None else None,
        extra=extra,
        checksum=_require(body, "checksum", str, where),
    )
    _check_consistency(manifest, where)
    return manifest


def manifest_path(location: str | Path) -> Path:
    """The manifest of a shard folder (or the manifest file itself). A file that is not JSON, such
    as one shard, is refused with the location to give instead."""
    path = Path(location)
    if path.suffix == ".json":
        return path
    if path.is_file():
        what = "one shard" if path.suffix == ".tar" else "a file"
        raise NotAShardFolderError(f"{path} is {what}, not a shard folder: give the folder that holds the shards and "
                            f"{MANIFEST_NAME} (here {path.parent}) or the {MANIFEST_NAME} itself")
    return path / MANIFEST_NAME


def read_manifest_bytes(path: Path) -> bytes:
    """A manifest file's bytes: a regular file of at most MAX_MANIFEST_BYTES. Raises ManifestError."""
    try:
        return read_regular_file(path, MAX_MANIFEST_BYTES)
    except FileNotFoundError:
        raise ManifestError(f"{path} does not exist: build the shards first (wds-ocr build-shards) "
                            "or merge the parts (wds-ocr merge)") from None
    except OSError as exc:
        raise ManifestError(f"{path} cannot be read: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise ManifestError(f"{path} {exc}; a manifest is a regular JSON file") from None


def load_manifest(location: str | Path) -> Manifest:
    """Load ``DIR/manifest.json`` (or a manifest file path)."""
    path = manifest_path(location)
    return parse_manifest(read_manifest_bytes(path), str(path))


def write_manifest(path: Path, manifest: Manifest) -> None:
    write_atomic(path, manifest.to_json().encode("utf-8"))


__all__ = ["CHECKSUM", "Counts", "DIGEST_HEX", "MANIFEST_NAME", "Manifest", "PIPELINE_VERSION", "PartRange",
           "ShardEntry", "load_manifest", "parse_manifest", "write_manifest"]
