"""Which sample goes into which batch on which rank: pure, deterministic planning.

Every rank computes the same global order from (manifest, seed, epoch), so no communication is
needed. Evaluation: manifest order, ranks take every world-th sample, nothing padded or dropped,
so the ranks together see every sample exactly once. Training: shard order permuted per epoch,
then a seeded block shuffle (blocks of ``shuffle_block`` consecutive samples: block order and the
order inside each block permuted), then padded cyclically to a multiple of the world size so
every rank gets the same number of samples, then full batches only — every rank runs the same
number of steps, so DDP never waits on a rank that ran out. Batch ``b`` of a rank goes to
DataLoader worker ``b % workers`` (webdataset's split_by_worker), and the DataLoader returns
workers' batches round-robin, so the order a rank sees does not depend on the worker count.
Resuming at batch ``k`` skips the first k batches of the plan without reading them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from wds_ocr.shards.manifest import Manifest


@dataclass(frozen=True)
class SampleRef:
    shard: int  # index into manifest.shards
    position: int  # member position inside that shard


@dataclass(frozen=True)
class BatchPlan:
    index: int  # batch number within this rank's epoch
    samples: tuple[SampleRef, ...]


def manifest_order(manifest: Manifest) -> list[SampleRef]:
    return [SampleRef(s, p) for s, entry in enumerate(manifest.shards) for p in range(entry.samples)]


def _rng(seed: int, epoch: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, stream])


def training_order(manifest: Manifest, seed: int, epoch: int, shuffle_block: int) -> list[SampleRef]:
    """Shards permuted, then blocks of consecutive samples permuted, and samples within blocks."""
    shard_order = _rng(seed, epoch, 0).permutation(len(manifest.shards))
    refs = [SampleRef(int(s), p) for s in shard_order for p in range(manifest.shards[int(s)].samples)]
    blocks = [refs[i : i + shuffle_block] for i in range(0, len(refs), shuffle_block)]
    rng = _rng(seed, epoch, 1)
    out: list[SampleRef] = []
    for b in rng.permutation(len(blocks)):
        block = blocks[int(b)]
        out.extend(block[int(i)] for i in rng.permutation(len(block)))
    return out


def pad_to_multiple(refs: list[SampleRef], multiple: int) -> list[SampleRef]:
    """Repeat from the start until the length is a multiple (as DistributedSampler does)."""
    if not refs:
        return refs
    missing = (-len(refs)) % multiple
    padded = list(refs)
    while missing:
        take = refs[: min(missing, len(refs))]
        padded.extend(take)
        missing -= len(take)
    return padded


def plan_batches(
    manifest: Manifest,
    batch_size: int,
    rank: int,
    world_size: int,
    train: bool,
    seed: int = 0,
    epoch: int = 0,
    shuffle_block: int = 64,
    start_batch: int = 0,
) -> list[BatchPlan]:
    """This rank's batches for one epoch, from ``start_batch`` on."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    if train:
        refs = pad_to_multiple(training_order(manifest, seed, epoch, shuffle_block), world_size)
    else:
        refs = manifest_order(manifest)
    mine = refs[rank::world_size]
    limit = len(mine) - len(mine) % batch_size if train else len(mine)
    plans = [
        BatchPlan(i // batch_size, tuple(mine[i : min(i + batch_size, limit)]))
        for i in range(0, limit, batch_size)
    ]
    return plans[start_batch:]


def batches_per_epoch(manifest: Manifest, batch_size: int, world_size: int, train: bool, rank: int = 0) -> int:
    total = manifest.total_samples
    if train:
        per_rank = -(-total // world_size) if total else 0
        return per_rank // batch_size
    mine = len(range(rank, total, world_size))
    return -(-mine // batch_size)
