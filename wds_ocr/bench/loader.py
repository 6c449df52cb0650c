"""bench: the shard loader against the hardware, its peers and the live path, side by side.

(a) raw: the sequential read rate of the shard files from page cache (one thread, 8 MiB reads):
    the ceiling for reading them;
(a') bare reads: the loader's reads and nothing else — each member of each batch with one
    positioned read into batch-sized buffers reused in turn (as many as a loader keeps in flight),
    by the same number of threads, no checks, no parsing: what the loader could reach if all its
    other work were free. On a machine whose memory is slow to write, this is well below (a): a
    read into one reused 8 MiB buffer writes to cache, a batch buffer to memory;
(b) shards: ShardStream delivering batches of compact records, read straight into recycled
    buffers by threads in the main process, by DataLoader worker processes, and by threads from a
    local HTTP server (nginx if installed, else a Python server with sendfile) serving the same
    files. Expanding the records and normalizing are device ops: included when CUDA is present,
    else left out (on a CPU-only machine the "device" would be these same cores);
(c) peers: stock webdataset, LitData and Mosaic MDS reading the same arrays (``wds_ocr.bench.peers``);
(d) live (optional): the receipt project's way — decode, EXIF, resize, pad, targets and normalize
    per sample in a map-style Dataset with the default collate;
(e) with ``integrity=True``: the threaded shard path once per read-path check — none
    (``verify=False``), the default per-member xxh3-64 checksum, and sha256.

Each path runs whole epochs until ``min_seconds`` have passed, with the same workers and batch
size; peak RSS is sampled over the process and its DataLoader workers. ``rounds`` > 1 runs every
path once per round, round after round (a shared machine's load drifts: neighbouring rows of one
round share it), and reports each path's median round and the ratios of every round.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import psutil
import torch

from wds_ocr.bench import peers as bench_peers
from wds_ocr.config import Config
from wds_ocr.data.pipeline import normalize_image, process_sample
from wds_ocr.data.sources import SourceSample, list_source
from wds_ocr.loader.device import normalize, to_device
from wds_ocr.loader.loaders import make_loader
from wds_ocr.loader.stream import ShardStream
from wds_ocr.shards.compact import full_bytes
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
class RecordSizes:
    """Bytes per record on disk (tar member: header, record, padding) and what its full arrays took."""

    count: int
    mean: float
    median: float
    largest: int
    full_arrays: int  # image + the four maps at the record's side, as record version 2 stored them

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def record_sizes(manifest: Manifest) -> RecordSizes:
    spans = [stop - start for entry in manifest.shards for start, stop in map(entry.span, range(entry.samples))]
    return RecordSizes(len(spans), sum(spans) / max(len(spans), 1), float(statistics.median(spans)) if spans else 0.0,
                       max(spans, default=0), full_bytes(manifest.image_size))


@dataclass
class Round:
    """One round: every path once, one after the other."""

    raw_read_mb_per_second: float
    paths: dict[str, PathResult]
    full_record_bytes: int = 0  # what a record's image and maps take once expanded
    bare_read_mb_per_second: float | None = None


    def ratios(self) -> dict[str, float | None]:
        def rate(name: str, what: str = "samples_per_second") -> float | None:
            row = self.paths.get(name)
            return getattr(row, what) if row is not None else None

        threads, processes, http = rate("shards (threads)"), rate("shards (processes)"), rate("shards (HTTP, threads)")
        peers = [rate(f"peer: {peer}") for peer in bench_peers.PEERS]
        best_peer = max((p for p in peers if p), default=None)
        threads_mb, live = rate("shards (threads)", "mb_per_second"), rate("live")
        expanded_mb = threads * self.full_record_bytes / 1e6 if threads and self.full_record_bytes else None
        return {
            "threads_fraction_of_raw_read": threads_mb / self.raw_read_mb_per_second if threads_mb else None,
            "threads_expanded_fraction_of_raw_read": expanded_mb / self.raw_read_mb_per_second if expanded_mb else None,
            "threads_fraction_of_bare_reads": (threads_mb / self.bare_read_mb_per_second
                                               if threads_mb and self.bare_read_mb_per_second else None),
            "bare_reads_fraction_of_raw_read": (self.bare_read_mb_per_second / self.raw_read_mb_per_second
                                                if self.bare_read_mb_per_second else None),
            "threads_over_best_peer": threads / best_peer if threads and best_peer else None,
            "processes_over_threads": processes / threads if processes and threads else None,
            "http_over_local": http / threads if http and threads else None,
            "threads_over_live": threads / live if threads and live else None,
        }

    def as_dict(self) -> dict[str, Any]:
        return {"raw_read_mb_per_second": self.raw_read_mb_per_second, "bare_read_mb_per_second": self.bare_read_mb_per_second,
                "paths": {name: row.as_dict() for name, row in self.paths.items()}, "ratios": self.ratios()}


@dataclass
class BenchResult:
    workers: int
    batch_size: int
    samples_per_epoch: int
    sizes: RecordSizes
    rounds: list[Round]
    device_ops: str  # what of the device's work the shard rows include
    http_server: str | None
    peer_bytes: dict[str, int] = field(default_factory=dict)  # bytes each peer's dataset takes
    skipped: dict[str, str] = field(default_factory=dict)  # path -> why it did not run

    def median_path(self, name: str) -> PathResult | None:
        rows = [r.paths[name] for r in self.rounds if name in r.paths]
        if not rows:
            return None
        return sorted(rows, key=lambda row: row.samples_per_second)[(len(rows) - 1) // 2]

    @property
    def path_names(self) -> list[str]:
        names: list[str] = []
        for r in self.rounds:
            names += [n for n in r.paths if n not in names]
        return names

    @property
    def raw_read_mb_per_second(self) -> float:
        return statistics.median(r.raw_read_mb_per_second for r in self.rounds)

    @property
    def bare_read_mb_per_second(self) -> float | None:
        rates = [r.bare_read_mb_per_second for r in self.rounds if r.bare_read_mb_per_second]
        return statistics.median(rates) if rates else None

    def ratio_rounds(self) -> dict[str, list[float | None]]:
        per_round = [r.ratios() for r in self.rounds]
        return {name: [ratios[name] for ratios in per_round] for name in per_round[0]}

    def as_dict(self) -> dict[str, Any]:
        ratios = self.ratio_rounds()
        return {
            "workers": self.workers, "batch_size": self.batch_size, "samples_per_epoch": self.samples_per_epoch,
            "record_bytes": self.sizes.as_dict(), "device_ops": self.device_ops, "http_server": self.http_server,
            "peer_bytes": self.peer_bytes, "skipped": self.skipped,
            "median": {name: self.median_path(name).as_dict() for name in self.path_names},
            "raw_read_mb_per_second": self.raw_read_mb_per_second,
            "bare_read_mb_per_second": self.bare_read_mb_per_second,
            "ratios_median": {k: statistics.median(v) if all(x is not None for x in v) else None
                              for k, v in ratios.items()},
            "rounds": [r.as_dict() for r in self.rounds],
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


def bare_read_rate(folder: Path, manifest: Manifest, threads: int, batch_size: int, min_seconds: float = 1.0,
                   prefetch: int = 2) -> float:
    """MB/s of the loader's reads alone (see (a') in the module docstring): whole passes over every
    shard's members in batches of ``batch_size``, batch k read by thread k mod ``threads``, each
    member with one ``os.preadv`` into its place in a batch-sized buffer; ``threads * prefetch + 1``
    buffers are reused in turn. Passes repeat until ``min_seconds`` have passed (after a warming one)."""
    threads = max(1, threads)
    batches = [(entry.name, [entry.span(i) for i in range(first, min(first + batch_size, entry.samples))])
               for entry in manifest.shards for first in range(0, entry.samples, batch_size)]
    largest = max((sum(stop - start for start, stop in spans) for _, spans in batches), default=0)
    buffers = [memoryview(bytearray(largest)) for _ in range(threads * prefetch + 1)]
    fds = {entry.name: os.open(folder / entry.name, os.O_RDONLY) for entry in manifest.shards}
    nbytes = sum(stop - start for _, spans in batches for start, stop in spans)

    def one_pass(thread: int) -> None:
        for number in range(thread, len(batches), threads):
            name, spans = batches[number]
            buffer, at = buffers[number % len(buffers)], 0
            for start, stop in spans:
                os.preadv(fds[name], [buffer[at : at + stop - start]], start)
                at += stop - start

    def passes() -> None:
        workers = [threading.Thread(target=one_pass, args=(k,)) for k in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()

    try:
        passes()
        count, started = 0, time.perf_counter()
        while True:
            passes()
            count += 1
            elapsed = time.perf_counter() - started
            if elapsed >= min_seconds:
                return count * nbytes / elapsed / 1e6
    finally:
        for fd in fds.values():
            os.close(fd)


INTEGRITY_MODES = (("off", False), ("xxh3", True), ("sha256", "sha256"))


def _shard_epochs(stream: ShardStream, workers: int, mode: str, device: torch.device | None):
    loader = make_loader(stream, workers, mode=mode)

    def epoch():
        for batch in loader:
            if device is not None:  # the device's share: one copy, expansion, fused normalize
                normalize(to_device(batch, device).images)
            yield batch

    return epoch


def run_bench(source: str | Path, split: str, shards: str | Path, config: Config, workers: int = 2,
              batch_size: int = 8, min_seconds: float = 5.0, peers: Iterable[str] = bench_peers.PEERS,
              progress: Callable[[str], None] | None = None, integrity: bool = False, live: bool = True,
              http: str | None = "auto", rounds: int = 1, processes: bool = True) -> BenchResult:
    """Run the paths side by side (see the module docstring); ``http`` is the local server kind
    (``auto``, ``nginx``, ``python``) or None for no HTTP row; ``peers`` those of
    ``bench_peers.PEERS`` to run."""
    from wds_ocr.bench.http import local_server

    note = progress or (lambda _: None)
    manifest = load_manifest(shards)
    folder = manifest_path(shards).parent
    shard_bytes = sum(entry.members_end for entry in manifest.shards)
    device = torch.device("cuda") if torch.cuda.is_available() else None
    result = BenchResult(workers, batch_size, manifest.total_samples, record_sizes(manifest), [],
                         "copy + expansion + normalize on cuda (included)" if device is not None
                         else "not included (no CUDA): expansion and normalization are device ops", None)
    epochs: dict[str, tuple[Callable[[], Iterable[Any]], Callable[[Any], int], int]] = {}
    with tempfile.TemporaryDirectory(prefix="wds-ocr-bench-") as tmp, contextlib.ExitStack() as stack:
        stream = ShardStream(shards, batch_size=batch_size)
        epochs["shards (threads)"] = (_shard_epochs(stream, workers, "threads", device), len, shard_bytes)
        if processes:
            epochs["shards (processes)"] = (_shard_epochs(stream, workers, "processes", device), len, shard_bytes)
        if http is not None:
            url, result.http_server = stack.enter_context(local_server(folder, http))
            remote = ShardStream(url, batch_size=batch_size)
            epochs["shards (HTTP, threads)"] = (_shard_epochs(remote, workers, "threads", device), len, shard_bytes)
        for label, verify in INTEGRITY_MODES if integrity else ():
            checked = ShardStream(shards, batch_size=batch_size, verify_hashes=verify)
            epochs[f"threads, verify {label}"] = (_shard_epochs(checked, workers, "threads", device), len, shard_bytes)
        for peer in peers:
            if not bench_peers.available(peer):
                result.skipped[f"peer: {peer}"] = f"{bench_peers.MODULES[peer]} is not installed"
                continue
            note(f"writing the same arrays with {peer}")
            location = bench_peers.WRITERS[peer](Path(shards), Path(tmp))
            result.peer_bytes[peer] = bench_peers.stored_bytes(location)
            loader = bench_peers.LOADERS[peer](location, batch_size, workers)
            epochs[f"peer: {peer}"] = (lambda loader=loader: loader, len, result.peer_bytes[peer])
        if live:
            samples = list_source(source, split, config.source).samples
            source_bytes = sum(os.path.getsize(s.image_path) for s in samples if s.image_path.is_file())
            live_loader = torch.utils.data.DataLoader(LiveDataset(samples, config), batch_size=batch_size,
                                                      num_workers=workers, shuffle=False)
            epochs["live"] = (lambda: live_loader, lambda b: int(b["image"].shape[0]), source_bytes)
        for number in range(rounds):
            note(f"round {number + 1} of {rounds}: raw sequential read of the shard files")
            raw = raw_read_rate(folder, manifest)
            note(f"round {number + 1} of {rounds}: bare reads of the members into batch buffers")
            bare = bare_read_rate(folder, manifest, workers, batch_size, min(min_seconds, 2.0))
            rows = {}
            for name, (make_epoch, count, nbytes) in epochs.items():
                note(f"round {number + 1} of {rounds}: {name}")
                rows[name] = _run_epochs(name, make_epoch, count, nbytes, min_seconds,
                                         max_epochs=3 if name == "live" else 100_000)
            result.rounds.append(Round(raw, rows, result.sizes.full_arrays, bare))
    return result
