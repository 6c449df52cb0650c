"""The benchmark's peers: the same arrays written with stock webdataset, LitData and Mosaic
streaming (MDS), and each read back with its own loader (``wds-ocr bench``).

"The same arrays" are every array of each record as stored (the compact image, map window, bit
planes and threshold values, the inverse matrix, polygons, flags) plus the record's metadata as
msgpack bytes (a uint8 array), each written with the library's own encoding for numpy arrays:

- webdataset: one ``.npy`` member per array, ``WebDataset(...).decode()`` (numpy's loader);
- LitData (``litdata``): ``optimize`` with a dict of arrays (its numpy serializer), read with
  ``StreamingDataset`` + ``StreamingDataLoader``;
- Mosaic (``mosaicml-streaming``): ``MDSWriter``; its ``ndarray`` encoding refuses arrays with
  no elements (a receipt's threshold values or polygons can be empty), so each array is a
  ``bytes`` column holding its ``.npy`` bytes, decoded with ``np.load``.

Each yields per batch the list of samples (dicts of arrays): variable shapes cannot be stacked,
and no collation is the cheapest choice for them. Their DataLoader workers persist across epochs,
as the shard loader's do. LitData and Mosaic are optional extras
(``pip install 'wds-ocr[bench]'``); a peer that is not installed is reported as skipped.
"""

from __future__ import annotations

import importlib.util
import io
import multiprocessing
import os
import shutil
import sys
import types
from pathlib import Path
from typing import Any, Callable, Iterable

import msgpack
import numpy as np
import torch

from wds_ocr.shards.record import ARRAY_SPECS, Record
from wds_ocr.shards.inspect import read_record
from wds_ocr.shards.manifest import load_manifest, manifest_path

PEERS = ("webdataset", "litdata", "mosaic")
MODULES = {"webdataset": "webdataset", "litdata": "litdata", "mosaic": "streaming"}


def available(peer: str) -> bool:
    return importlib.util.find_spec(MODULES[peer]) is not None


def record_sample(record: Record) -> dict[str, np.ndarray]:
    """One record as the peers store it: its arrays, and its metadata as msgpack bytes."""
    sample = {name: np.ascontiguousarray(record.arrays[name]) for name in ARRAY_SPECS}
    sample["meta"] = np.frombuffer(msgpack.packb(record.meta.as_dict(), use_bin_type=True), dtype=np.uint8)
    return sample


def _records(shards: Path) -> Iterable[tuple[str, dict[str, np.ndarray]]]:
    manifest = load_manifest(shards)
    folder = manifest_path(shards).parent
    for entry in manifest.shards:
        for key in entry.keys:
            record, _ = read_record(folder, manifest, key)
            yield key, record_sample(record)


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _collate(batch: list) -> list:
    return batch


# ----------------------------------------------------------------------------- webdataset


def write_webdataset(shards: Path, out: Path) -> list[str]:
    import webdataset as wds

    path = out / "wds-000000.tar"
    with wds.TarWriter(str(path)) as writer:
        for key, sample in _records(shards):
            writer.write({"__key__": key, **{f"{name}.npy": _npy(array) for name, array in sample.items()}})
    return [str(path)]


def webdataset_loader(urls: list[str], batch_size: int, workers: int):
    import webdataset as wds

    dataset = (wds.WebDataset(urls, shardshuffle=False, nodesplitter=wds.split_by_node,
                              workersplitter=wds.split_by_worker, empty_check=False)
               .decode().batched(batch_size, collation_fn=_collate, partial=True))
    return torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers, persistent_workers=workers > 0,
                                       multiprocessing_context="fork" if workers else None)


# ----------------------------------------------------------------------------- LitData


_LITDATA_RECORDS: dict[str, Any] = {}


def _litdata_item(index: int) -> dict[str, np.ndarray]:
    samples = _LITDATA_RECORDS.get("samples")
    if samples is None:  # a spawned optimize worker: read the records itself
        samples = _LITDATA_RECORDS["samples"] = [s for _, s in _records(Path(os.environ["WDS_OCR_BENCH_SHARDS"]))]
    return samples[index]


def write_litdata(shards: Path, out: Path) -> Path:
    import litdata

    target = out / "litdata"
    count = load_manifest(shards).total_samples
    os.environ["WDS_OCR_BENCH_SHARDS"] = str(shards)
    method = multiprocessing.get_start_method(allow_none=True)
    try:
        litdata.optimize(fn=_litdata_item, inputs=list(range(count)), output_dir=str(target), chunk_bytes="256MB",
                         num_workers=1)
    finally:
        if method is not None:  # optimize switches the whole process to spawn
            multiprocessing.set_start_method(method, force=True)
    return target


def litdata_loader(location: Path, batch_size: int, workers: int):
    import litdata

    dataset = litdata.StreamingDataset(str(location))
    return litdata.StreamingDataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=_collate,
                                       persistent_workers=workers > 0)


# ----------------------------------------------------------------------------- Mosaic MDS


def _import_streaming_base():
    """``streaming.base`` without ``streaming/__init__.py``, which imports its vision and text
    datasets and so torchvision and transformers (a CPU torch build has no matching torchvision);
    the MDS writer and StreamingDataset need neither."""
    if "streaming" not in sys.modules:
        spec = importlib.util.find_spec("streaming")
        package = types.ModuleType("streaming")
        package.__path__ = list(spec.submodule_search_locations)
        package.__spec__ = spec
        sys.modules["streaming"] = package
    import streaming.base

    return streaming.base


def write_mosaic(shards: Path, out: Path) -> Path:
    base = _import_streaming_base()
    target = out / "mds"
    columns = {name: "bytes" for name in (*ARRAY_SPECS, "meta")}
    with base.MDSWriter(out=str(target), columns=columns, compression=None, size_limit=1 << 30) as writer:
        for _, sample in _records(shards):
            writer.write({name: _npy(array) for name, array in sample.items()})
    return target


class _MosaicSamples(torch.utils.data.IterableDataset):
    """Mosaic's StreamingDataset, each sample's .npy columns loaded back into arrays."""

    def __init__(self, location: Path, batch_size: int):
        base = _import_streaming_base()
        base.util.clean_stale_shared_memory()
        self.dataset = base.StreamingDataset(local=str(location), batch_size=batch_size, shuffle=False)

    def __iter__(self):
        for sample in self.dataset:
            yield {name: np.load(io.BytesIO(value), allow_pickle=False) for name, value in sample.items()}


def mosaic_loader(location: Path, batch_size: int, workers: int):
    return torch.utils.data.DataLoader(_MosaicSamples(location, batch_size), batch_size=batch_size,
                                       num_workers=workers, collate_fn=_collate, persistent_workers=workers > 0,
                                       multiprocessing_context="fork" if workers else None)


# ----------------------------------------------------------------------------- all of them


WRITERS: dict[str, Callable[[Path, Path], Any]] = {
    "webdataset": write_webdataset, "litdata": write_litdata, "mosaic": write_mosaic}
LOADERS: dict[str, Callable[[Any, int, int], Any]] = {
    "webdataset": webdataset_loader, "litdata": litdata_loader, "mosaic": mosaic_loader}


def stored_bytes(location: Any) -> int:
    """Bytes a peer's dataset takes on disk."""
    paths = [Path(p) for p in location] if isinstance(location, list) else [Path(location)]
    total = 0
    for path in paths:
        if path.is_file():
            total += path.stat().st_size
        else:
            total += sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return total


def remove(location: Any) -> None:
    for path in ([Path(p) for p in location] if isinstance(location, list) else [Path(location)]):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
