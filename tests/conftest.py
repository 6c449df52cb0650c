"""Shared fixtures: the real receipts in ../shared/data/sroie-dev (skipped where absent)."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SROIE_ROOT = REPO_ROOT.parent / "shared" / "data" / "sroie-dev"


@pytest.fixture(scope="session")
def sroie_root() -> Path:
    """Root of the real SROIE receipts; tests using it skip cleanly where ../shared is absent."""
    if not (SROIE_ROOT / "jsons" / "val.json").is_file():
        pytest.skip(f"real receipts not found at {SROIE_ROOT}")
    return SROIE_ROOT


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    """12 synthetic receipts (train 9, val 3), a few stored with EXIF orientation tags."""
    from wds_ocr.data.synth import synthesize

    root = tmp_path_factory.mktemp("synth") / "data"
    synthesize(root, 12, seed=0)
    return root


def random_checkpoint(folder: Path, config) -> Path:
    """A checkpoint of a DBNet with seeded random weights for ``config`` (tests that need a model,
    not a trained one), saved as ``folder/random.pt``."""
    import torch

    from wds_ocr.model.dbnet import DBNet
    from wds_ocr.run.checkpoint import save_checkpoint

    torch.manual_seed(0)
    path = folder / "random.pt"
    save_checkpoint(path, {"config": config.model_dump(mode="json"), "model": DBNet(config.model).state_dict()})
    return path


def build_small_shards(source: Path, out: Path, split: str = "train", size: int = 64, max_samples: int = 4,
                       extra: tuple[str, ...] = ()) -> Path:
    """Shards at a small transform size (fast tests); ``max_samples`` sets how uneven they are."""
    from wds_ocr.config import load_config
    from wds_ocr.shards.build import build_shards

    config = load_config(None, [f"transform.size={size}", f"shards.max_samples={max_samples}", *extra])
    build_shards(source, split, out, config)
    return out


@pytest.fixture(scope="session")
def uneven_shards(synth_root, tmp_path_factory) -> Path:
    """9 train samples in shards of 4, 4 and 1 at 64x64."""
    return build_small_shards(synth_root, tmp_path_factory.mktemp("uneven") / "shards")


@pytest.fixture(scope="session")
def single_shard(synth_root, tmp_path_factory) -> Path:
    """The same 9 samples in one shard."""
    return build_small_shards(synth_root, tmp_path_factory.mktemp("single") / "shards", max_samples=100)


@pytest.fixture
def serve_folder():
    """Start a real HTTP server (with Range support, wds_ocr.bench.http's) on 127.0.0.1 for a folder;
    returns its URL."""
    import contextlib

    from wds_ocr.bench.http import python_server

    with contextlib.ExitStack() as servers:
        yield lambda directory: servers.enter_context(python_server(directory))


def copy_shards(folder: Path, dest: Path) -> Path:
    """A copy of a shard folder that a test may damage."""
    import shutil

    shutil.copytree(folder, dest)
    return dest


def rewrite_record(folder: Path, key: str, edit, with_blob: bool = False) -> None:
    """Re-encode one record with ``edit(header)`` applied (``with_blob``: ``edit(header, blob)``, the
    array bytes as a bytearray it may change) and make the manifest agree with the new bytes
    (digests, checksums, sizes): what someone who controls both shard and manifest can do."""
    import dataclasses

    import msgpack

    from wds_ocr.shards.manifest import load_manifest, write_manifest
    from wds_ocr.shards.tario import TarWriter, iter_members

    manifest = load_manifest(folder)
    index = next(i for i, e in enumerate(manifest.shards) if key in e.keys)
    entry = manifest.shards[index]
    with open(folder / entry.name, "rb") as handle:
        members = list(iter_members(handle, entry.name))
    with open(folder / entry.name, "wb") as handle:
        writer = TarWriter(handle)
        digests, checksums = [], []
        for member in members:
            data = member.data
            if member.key == key:
                header, blob = msgpack.unpackb(data)
                blob = bytearray(blob)
                edit(header, blob) if with_blob else edit(header)
                data = b"\x92" + msgpack.packb(header) + b"\xc6" + len(blob).to_bytes(4, "big") + bytes(blob)
            _, sha, checksum = writer.add(f"{member.key}.{member.extension}", data)
            digests.append(sha[:16])
            checksums.append(checksum)
        total, sha = writer.close()
    shards = list(manifest.shards)
    shards[index] = dataclasses.replace(entry, bytes=total, sha256=sha, offsets=tuple(writer.offsets),
                                        digests=tuple(digests), members_end=writer.members_end,
                                        checksums=tuple(checksums))
    write_manifest(folder / "manifest.json", dataclasses.replace(manifest, shards=tuple(shards)))
