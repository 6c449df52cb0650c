"""The checks a manifest passes when it is parsed (see ``manifest``): every field a reader uses,
its type and range, shard entries, record and shard settings, counts, partition and consistency."""

from __future__ import annotations

import re
from typing import Any

from wds_ocr.config import ABSENT_MEANS, Config, build_config
from wds_ocr.data.coverage import Coverage
from wds_ocr.errors import ConfigError, ManifestError
from wds_ocr.shards.manifest_schema import (CHECKSUM, CHECKSUM_HEX, Counts, DIGEST_HEX, HEX, MAX_MEMBER_SPAN,
                                            MAX_SHARD_BYTES, MAX_SHARD_SAMPLES, Manifest, PartRange, ShardEntry,
                                            TAR_RECORD, TAR_TAIL)
from wds_ocr.shards.naming import MAX_INDEX, SHARD_PATTERN, key_index



def is_int(value: Any, low: int, high: int) -> bool:
    return type(value) is int and low <= value <= high


def require(body: dict[str, Any], name: str, kind: type | tuple[type, ...], where: str) -> Any:
    if name not in body:
        raise ManifestError(f"{where}: field {name!r} is missing")
    value = body[name]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is int:
        raise ManifestError(f"{where}: field {name!r} has the wrong type ({type(value).__name__})")
    return value


def integer(body: dict[str, Any], name: str, low: int, high: int, where: str) -> int:
    value = require(body, name, int, where)
    if not low <= value <= high:
        raise ManifestError(f"{where}: field {name!r} is {value}, outside {low}..{high}")
    return value


def hex_list(values: list, width: int, what: str, here: str) -> tuple[str, ...]:
    if not all(isinstance(v, str) and len(v) == width and HEX.fullmatch(v) for v in values):
        raise ManifestError(f"{here}: {what} must be {width}-digit lowercase hex strings")
    return tuple(values)


def shard_from(body: Any, where: str) -> ShardEntry:
    if not isinstance(body, dict):
        raise ManifestError(f"{where}: each shard entry must be an object")
    name = require(body, "name", str, where)
    here = f"{where} shard {name!r}"
    if not SHARD_PATTERN.fullmatch(name):
        raise ManifestError(f"{here}: shard names must be plain file names of the form shard-NNNNNN.tar "
                            "(or shard-pIIIofNNN-NNNNNN.tar); paths, URLs and other names are refused")
    samples = integer(body, "samples", 1, MAX_SHARD_SAMPLES, here)
    total = integer(body, "bytes", 0, MAX_SHARD_BYTES, here)
    sha256 = require(body, "sha256", str, here)
    if len(sha256) != 64 or not HEX.fullmatch(sha256):
        raise ManifestError(f"{here}: sha256 must be 64 lowercase hex digits")
    keys = require(body, "keys", list, here)
    offsets = require(body, "offsets", list, here)
    digests = hex_list(require(body, "digests", list, here), DIGEST_HEX, "digests", here)
    checksums = hex_list(require(body, "checksums", list, here), CHECKSUM_HEX, "checksums", here)
    if not all(key_index(k) is not None for k in keys):
        raise ManifestError(f"{here}: keys must be record keys (a listing index of 7+ digits, '_', "
                            "then letters, digits, '_' or '-')")
    if not len(keys) == len(offsets) == len(digests) == len(checksums) == samples:
        raise ManifestError(f"{here}: samples={samples} but {len(keys)} keys, {len(offsets)} offsets, "
                            f"{len(digests)} digests, {len(checksums)} checksums")
    first_key = require(body, "first_key", str, here)
    last_key = require(body, "last_key", str, here)
    if keys[0] != first_key or keys[-1] != last_key:
        raise ManifestError(f"{here}: first_key/last_key disagree with its keys")
    members_end = integer(body, "members_end", 1, MAX_SHARD_BYTES, here)
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
    if not members_end + TAR_TAIL <= total <= members_end + TAR_TAIL + TAR_RECORD:
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


def check_record_settings(settings: dict[str, Any], where: str) -> None:
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
    if not is_int(settings.get("pipeline_version"), 1, 1 << 20):
        raise ManifestError(f"{where}: record_settings.pipeline_version must be a positive integer")
    try:
        build_config({name: settings[name] for name in ("source", "transform", "targets")})
    except ConfigError as exc:
        detail = str(exc).replace("invalid configuration:\n  ", "").replace("\n  ", "; ")
        raise ManifestError(f"{where}: record_settings are outside what this wds-ocr allows: {detail}") from None


def check_source(source: dict[str, Any], where: str) -> None:
    if source.get("format") not in ("json", "icdar"):
        raise ManifestError(f"{where}: source.format must be 'json' or 'icdar'")
    for name in ("split", "annotation_sha256"):
        if not isinstance(source.get(name), str):
            raise ManifestError(f"{where}: source.{name} must be a string")
    if source.get("fingerprint") is not None and not isinstance(source.get("fingerprint"), str):
        raise ManifestError(f"{where}: source.fingerprint must be a string or null")
    if not is_int(source.get("listed"), 0, MAX_INDEX):
        raise ManifestError(f"{where}: source.listed must be a non-negative integer")
    rejected = source.get("listing_rejects")
    if not isinstance(rejected, list) or not all(isinstance(n, str) for n in rejected):
        raise ManifestError(f"{where}: source.listing_rejects must be a list of names")
    if len(rejected) > source["listed"]:
        raise ManifestError(f"{where}: source.listing_rejects names more samples than source.listed")


def counts_from(body: Any, where: str) -> Counts:
    if not isinstance(body, dict):
        raise ManifestError(f"{where}: field 'counts' has the wrong type ({type(body).__name__})")
    here = f"{where} counts"
    values = {name: integer(body, name, 0, MAX_INDEX, here)
              for name in ("samples_in", "written", "rejected", "words_skipped")}
    try:
        words = Coverage.from_dict(body.get("words"), "counts.words")
    except ValueError as exc:
        raise ManifestError(f"{where}: {exc}") from None
    unknown = sorted(set(body) - {*values, "words"})
    if unknown:
        raise ManifestError(f"{where}: counts has unknown fields {unknown}")
    return Counts(**values, words=words)


def partition_from(partition: Any, digests: Any, where: str) -> PartRange | None:
    if partition is None and digests is None:
        return None
    fields = ("index", "count", "lo", "hi")
    if not isinstance(partition, dict) or set(partition) != set(fields) or \
            not all(is_int(partition[f], 0, MAX_INDEX) for f in fields):
        raise ManifestError(f"{where}: partition must be an object with integer {', '.join(fields)}")
    part = PartRange(**partition)
    if not 0 <= part.index < part.count <= 999 or not part.lo <= part.hi:
        raise ManifestError(f"{where}: partition {partition} is not a valid part")
    if not isinstance(digests, list) or len(digests) != part.hi - part.lo or \
            not all(isinstance(d, str) for d in digests):
        raise ManifestError(f"{where}: a part manifest lists one source digest per sample of its range")
    return part


def check_consistency(manifest: Manifest, where: str) -> None:
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


SAFE_SPLIT = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def old_split(body: dict[str, Any]) -> str:
    """The split an older manifest names, for the rebuild command (SPLIT unless it is a plain name)."""
    source = body.get("source")
    split = source.get("split") if isinstance(source, dict) else None
    return split if isinstance(split, str) and SAFE_SPLIT.fullmatch(split) else "SPLIT"


def folder_of(where: str) -> str:
    """The folder (or URL) a manifest named ``where`` lies in."""
    return where.rsplit("/", 1)[0] if "/" in where else "."
