"""bench: the live per-epoch path against the shard path, side by side on one machine.

(a) live: the receipt project's way — a map-style Dataset that per sample reads the JPEG, decodes
    it with EXIF applied, resizes, pads, builds the four DBNet maps and normalizes on the CPU, then
    the default collate;
(b) shards: ShardStream delivering uint8 batches, read by threads in the main process and, for
    comparison, by DataLoader worker processes (normalization is a device op: included when CUDA
    is present, else left out);
(c) stock webdataset reading the same arrays stored as .npy members (``wds.WebDataset(...).decode()``);
(d) the raw sequential read rate of the shard files from page cache (the ceiling for (b));
(e) with ``integrity=True``: the threaded shard path once per read-path check — none
    (``verify=False``), the default per-member xxh3-64 checksum, and sha256 — to price the check.

Each path runs whole epochs until ``min_seconds`` have passed, with the same workers and batch
size; peak RSS is sampled over the process and its DataLoader workers.
"""

from __future__ import annotations

import io
import os
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import psutil
import torch

from wds_ocr.config import Config
from wds_ocr.data.pipeline import normalize_image, process_sample
from wds_ocr.data.sources import SourceSample, list_source
from wds_ocr.loader.device import normalize
from wds_ocr.loader.stream import ShardStream, make_loader
from wds_ocr.shards.manifest import Manifest, load_manifest, manifest_path

_RAW_CHUNK = 8 << 20


@dataclass
class PathResult:
    name: str
    samples: int
    seconds: float
    bytes_read: int
    first_batch_seconds: float
    peak_rss_mb: float
    epochs: int

    @property
    def samples_per_second(self) -> float:
        return self.samples / self.seconds if self.seconds else 0.0

    @property
    def mb_per_second(self) -> float:
        return self.bytes_read / self.seconds / 1e6 if self.seconds else 0.0

    def as_dict(self) -> dict[str, Any]:
        body = asdict(self)
        body.update(samples_per_second=self.samples_per_second, mb_per_second=self.mb_per_second)
        return body


@dataclass
class BenchResult:
    workers: int
    batch_size: int
    samples_per_epoch: int
    live: PathResult
    shards: PathResult
    shards_processes: PathResult
    stock_webdataset: PathResult | None
    raw_read_mb_per_second: float
    normalize_on: str
    integrity: list[PathResult] | None = None  # threads: verify off, checksum (default), sha256

    @property
    def speedup(self) -> float:
        return self.shards.samples_per_second / max(self.live.samples_per_second, 1e-12)

    @property
    def raw_fraction(self) -> float:
        return self.shards.mb_per_second / max(self.raw_read_mb_per_second, 1e-12)

    def as_dict(self) -> dict[str, Any]:
        return {
            "workers": self.workers,
            "batch_size": self.batch_size,
            "samples_per_epoch": self.samples_per_epoch,
            "normalize_on": self.normalize_on,
            "live": self.live.as_dict(),
            "shards": self.shards.as_dict(),
            "shards_processes": self.shards_processes.as_dict(),
            "stock_webdataset": self.stock_webdataset.as_dict() if self.stock_webdataset else None,
            "raw_read_mb_per_second": self.raw_read_mb_per_second,
            "speedup_shards_over_live": self.speedup,
            "shards_fraction_of_raw_read": self.raw_fraction,
            "shards_over_stock_webdataset": (
                self.shards.samples_per_second / max(self.stock_webdataset.samples_per_second, 1e-12)
                if self.stock_webdataset else None
            ),
            "integrity": [row.as_dict() for row in self.integrity] if self.integrity else None,
        }


class _PeakRss:
    """Samples the RSS of this process plus its children (DataLoader workers) in a thread."""

    def __init__(self, interval: float = 0.02):
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _total(self) -> int:
        me = psutil.Process()
        total = me.memory_info().rss
        for child in me.children(recursive=True):
            try:
                total += child.memory_info().rss
            except psutil.Error:
                pass
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._total())
            self._stop.wait(self.interval)

    def __enter__(self) -> "_PeakRss":
        self.peak = self._total()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def _run_epochs(name: str, make_epoch: Callable[[], Iterable[Any]], count: Callable[[Any], int],
                bytes_per_epoch: int, min_seconds: float, max_epochs: int) -> PathResult:
    samples = 0
    epochs = 0
    first = 0.0
    with _PeakRss() as rss:
        started = time.perf_counter()
        while True:
            epoch_start = time.perf_counter()
            for i, batch in enumerate(make_epoch()):
                if epochs == 0 and i == 0:
                    first = time.perf_counter() - epoch_start
                samples += count(batch)
            epochs += 1
            elapsed = time.perf_counter() - started
            if elapsed >= min_seconds or epochs >= max_epochs:
                break
    return PathResult(name, samples, elapsed, bytes_per_epoch * epochs, first, rss.peak / 1e6, epochs)


class LiveDataset(torch.utils.data.Dataset):
    """The receipt project's per-epoch path: everything on the CPU, for every sample, every epoch."""

    def __init__(self, samples: list[SourceSample], config: Config):
        self.samples = samples
        self.config = config

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        processed = process_sample(self.samples[index], self.config)
        t = processed.targets
        return {
            "image": torch.from_numpy(normalize_image(processed.image)),
            "gt": torch.from_numpy(t.gt.astype(np.float32)),
            "mask": torch.from_numpy(t.mask.astype(np.float32)),
            "thresh_map": torch.from_numpy(t.thresh_map.astype(np.float32)),
            "thresh_mask": torch.from_numpy(t.thresh_mask.astype(np.float32)),
        }


def raw_read_rate(folder: Path, manifest: Manifest, repeats: int = 3) -> float:
    """MB/s of reading the shard files sequentially with large reads, after a warming pass."""
    paths = [folder / entry.name for entry in manifest.shards]
    buffer = bytearray(_RAW_CHUNK)
    view = memoryview(buffer)
    best = 0.0
    for attempt in range(repeats + 1):
        total = 0
        started = time.perf_counter()
        for path in paths:
            with open(path, "rb", buffering=0) as handle:
                while True:
                    n = handle.readinto(view)
                    if not n:
                        break
                    total += n
        rate = total / (time.perf_counter() - started) / 1e6
        if attempt:  # the first pass only warms the page cache
            best = max(best, rate)
    return best


def write_stock_npy_shards(location: Path, out: Path) -> list[str]:
    """The same arrays as stock webdataset .npy members (what a user without wds-ocr would write)."""
    import webdataset as wds

    from wds_ocr.shards.inspect import read_record

    manifest = load_manifest(location)
    folder = manifest_path(location).parent
    urls = []
    for s, entry in enumerate(manifest.shards):
        path = out / f"npy-{s:06d}.tar"
        with wds.TarWriter(str(path)) as writer:
            for key in entry.keys:
                record, _ = read_record(folder, manifest, key)
                sample = {"__key__": key}
                for name in ("image", "gt", "mask", "thresh_map", "thresh_mask"):
                    buffer = io.BytesIO()
                    np.save(buffer, record.arrays[name], allow_pickle=False)
                    sample[f"{name}.npy"] = buffer.getvalue()
                writer.write(sample)
        urls.append(str(path))
    return urls


def _stock_loader(urls: list[str], batch_size: int, workers: int):
    import webdataset as wds

    dataset = (
        wds.WebDataset(urls, shardshuffle=False, nodesplitter=wds.split_by_node, workersplitter=wds.split_by_worker,
                       empty_check=False)
        .decode()
        .to_tuple("image.npy", "gt.npy", "mask.npy", "thresh_map.npy", "thresh_mask.npy")
        .batched(batch_size, partial=True)
    )
    return torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers)


INTEGRITY_MODES = (("off", False), ("xxh3", True), ("sha256", "sha256"))


def run_bench(source: str | Path, split: str, shards: str | Path, config: Config, workers: int = 2,
              batch_size: int = 8, min_seconds: float = 5.0, stock: bool = True,
              progress: Callable[[str], None] | None = None, integrity: bool = False) -> BenchResult:
    """Run the live, shard, stock-webdataset and raw-read measurements side by side."""
    note = progress or (lambda _: None)
    manifest = load_manifest(shards)
    folder = manifest_path(shards).parent
    listing = list_source(source, split, config.source)
    samples = listing.samples
    source_bytes = sum(os.path.getsize(s.image_path) for s in samples if s.image_path.is_file())
    shard_bytes = sum(entry.members_end for entry in manifest.shards)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")

    note("raw sequential read of the shard files")
    raw = raw_read_rate(folder, manifest)

    note("live path (decode + EXIF + resize + pad + targets + normalize per sample)")
    live_loader = torch.utils.data.DataLoader(LiveDataset(samples, config), batch_size=batch_size,
                                              num_workers=workers, shuffle=False)
    live = _run_epochs("live", lambda: live_loader, lambda b: int(b["image"].shape[0]), source_bytes,
                       min_seconds, max_epochs=3)

    stream = ShardStream(shards, batch_size=batch_size, train=False)

    def shard_path(mode: str, over: ShardStream = stream, name: str | None = None) -> PathResult:
        loader = make_loader(over, workers, mode=mode)

        def epoch():
            for batch in loader:
                if cuda:  # the device's share: copy + fused normalize (CPU path leaves it to the device)
                    normalize(batch.images.to(device, non_blocking=True))
                yield batch

        return _run_epochs(name or f"shards ({mode})", epoch, len, shard_bytes, min_seconds, max_epochs=1000)

    note("shard path (ShardStream, reader threads)")
    shard = shard_path("threads")
    note("shard path (ShardStream, DataLoader worker processes)")
    shard_processes = shard_path("processes")

    integrity_rows = None
    if integrity:
        integrity_rows = []
        for label, verify in INTEGRITY_MODES:
            note(f"shard path (threads) with the read-path check: {label}")
            checked = ShardStream(shards, batch_size=batch_size, train=False, verify=verify)
            integrity_rows.append(shard_path("threads", checked, f"threads, verify {label}"))

    stock_result = None
    if stock:
        note("stock webdataset over .npy members")
        with tempfile.TemporaryDirectory(prefix="wds-ocr-bench-") as tmp:
            urls = write_stock_npy_shards(Path(shards), Path(tmp))
            stock_bytes = sum(os.path.getsize(u) for u in urls)
            stock_loader = _stock_loader(urls, batch_size, workers)
            stock_result = _run_epochs("stock_webdataset", lambda: stock_loader, lambda b: len(b[0]), stock_bytes,
                                       min_seconds, max_epochs=1000)
    return BenchResult(workers, batch_size, len(samples), live, shard, shard_processes, stock_result, raw,
                       "cuda (included)" if cuda else "not included (no CUDA: a device op)", integrity_rows)
