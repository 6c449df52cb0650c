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
from pathlib import Path

from wds_ocr.data.paths import write_atomic
from wds_ocr import jsonio
from wds_ocr.config import PIPELINE_VERSION, ShardConfig
from wds_ocr.data.sources import read_regular_file
from wds_ocr.errors import ManifestError, NotAShardFolderError, OlderManifestError
from wds_ocr.shards.naming import MANIFEST_NAME

from wds_ocr.shards.manifest_schema import (CHECKSUM, DIGEST_HEX, MAX_MANIFEST_BYTES, SCHEMA, SCHEMA_VERSION, Counts,
                                            Manifest, PartRange, ShardEntry)
from wds_ocr.shards.manifest_checks import (check_consistency, check_record_settings, check_source, counts_from,
                                            folder_of, old_split, partition_from, require, shard_from)


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
                f"build-shards SOURCE --split {old_split(body)} --out {folder_of(where)} --overwrite", version)
        raise ManifestError(
            f"{where} has schema_version {version!r}; this wds-ocr reads version {SCHEMA_VERSION}: "
            "upgrade wds-ocr or rebuild the shards"
        )
    known = {"schema", "schema_version", "checksum", "fingerprint", "record_settings", "source", "counts",
             "shard_settings", "shards", "environment", "partition", "source_digests", "extra"}
    unknown = sorted(set(body) - known)
    if unknown:
        raise ManifestError(f"{where}: unknown fields {unknown}")
    fingerprint = require(body, "fingerprint", str, where)
    settings = require(body, "record_settings", dict, where)
    check_record_settings(settings, where)
    source = require(body, "source", dict, where)
    check_source(source, where)
    shard_settings = require(body, "shard_settings", dict, where)
    try:
        ShardConfig.model_validate(shard_settings)
    except Exception:
        raise ManifestError(f"{where}: shard_settings are not valid shard settings") from None
    environment = require(body, "environment", dict, where)
    if not all(isinstance(v, str) for v in environment.values()):
        raise ManifestError(f"{where}: environment values must be strings")
    extra = body.get("extra", {})
    if not isinstance(extra, dict):
        raise ManifestError(f"{where}: field 'extra' must be an object")
    shards = require(body, "shards", list, where)
    partition = partition_from(body.get("partition"), body.get("source_digests"), where)
    manifest = Manifest(
        fingerprint=fingerprint,
        record_settings=settings,
        source=source,
        counts=counts_from(require(body, "counts", dict, where), where),
        shard_settings=shard_settings,
        shards=tuple(shard_from(s, where) for s in shards),
        environment=environment,
        partition=partition,
        source_digests=tuple(body["source_digests"]) if partition is not None else None,
        extra=extra,
        checksum=require(body, "checksum", str, where),
    )
    check_consistency(manifest, where)
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


def read_manifest_bytes(path: Path, limit: int = MAX_MANIFEST_BYTES) -> bytes:
    """A manifest file's bytes: a regular file of at most ``limit`` bytes. Raises ManifestError."""
    try:
        return read_regular_file(path, limit)
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


__all__ = ["CHECKSUM", "DIGEST_HEX", "MAX_MANIFEST_BYTES", "SCHEMA", "SCHEMA_VERSION", "Counts", "Manifest", "PartRange",
           "ShardEntry", "load_manifest", "manifest_path", "parse_manifest", "read_manifest_bytes", "write_manifest"]
