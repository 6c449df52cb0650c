"""Batch planning: exactly-once evaluation, equal training batches per rank, resume."""

from __future__ import annotations

from collections import Counter

import pytest

from wds_ocr.loader.plan import (
    SampleRef,
    batches_per_epoch,
    manifest_order,
    pad_to_multiple,
    plan_batches,
    training_order,
)
from wds_ocr.shards.manifest import Manifest, ShardEntry


def fake_manifest(counts: list[int]) -> Manifest:
    shards = []
    for s, n in enumerate(counts):
        keys = tuple(f"{s:02d}_{p:03d}" for p in range(n))
        shards.append(ShardEntry(
            name=f"shard-{s:06d}.tar", samples=n, bytes=512 * (n + 3), sha256="0" * 64, first_key=keys[0],
            last_key=keys[-1], keys=keys, offsets=tuple(512 * p for p in range(n)), digests=("0" * 16,) * n,
            members_end=512 * n,
        ))
    return Manifest(
        fingerprint="f", record_settings={"transform": {"size": 64}}, source={}, counts={"written": sum(counts)},
        shard_settings={}, shards=tuple(shards), environment={},
    )


LAYOUTS = [[4, 4, 1], [9], [1, 1], [5, 1, 3, 2], [1]]


@pytest.mark.parametrize("counts", LAYOUTS)
@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("batch", [1, 2, 4])
def test_evaluation_sees_every_sample_exactly_once(counts, world, batch):
    manifest = fake_manifest(counts)
    seen = []
    for rank in range(world):
        plans = plan_batches(manifest, batch, rank, world, train=False)
        assert len(plans) == batches_per_epoch(manifest, batch, world, train=False, rank=rank)
        assert [p.index for p in plans] == list(range(len(plans)))
        assert all(0 < len(p.samples) <= batch for p in plans)
        seen += [ref for p in plans for ref in p.samples]
    assert Counter(seen) == Counter(manifest_order(manifest))
    assert len(seen) == sum(counts)


def test_evaluation_order_is_manifest_order_interleaved_by_rank():
    manifest = fake_manifest([4, 4, 1])
    rank1 = [ref for p in plan_batches(manifest, 2, 1, 3, train=False) for ref in p.samples]
    assert rank1 == [SampleRef(0, 1), SampleRef(1, 0), SampleRef(1, 3)]


@pytest.mark.parametrize("counts", LAYOUTS)
@pytest.mark.parametrize("world", [1, 2, 3])
def test_training_gives_every_rank_the_same_number_of_full_batches(counts, world):
    manifest = fake_manifest(counts)
    batch = 2
    per_rank = [plan_batches(manifest, batch, rank, world, train=True, seed=3, epoch=1) for rank in range(world)]
    lengths = {len(plans) for plans in per_rank}
    assert lengths == {batches_per_epoch(manifest, batch, world, train=True)}
    assert all(len(p.samples) == batch for plans in per_rank for p in plans)


def test_training_epoch_is_a_padded_permutation():
    manifest = fake_manifest([4, 4, 1])
    order = training_order(manifest, seed=7, epoch=0, shuffle_block=3)
    assert Counter(order) == Counter(manifest_order(manifest))
    assert order != manifest_order(manifest)
    assert order == training_order(manifest, seed=7, epoch=0, shuffle_block=3)
    assert order != training_order(manifest, seed=7, epoch=1, shuffle_block=3)
    assert order != training_order(manifest, seed=8, epoch=0, shuffle_block=3)
    # world 2 pads 9 samples to 10 by repeating the first one
    padded = pad_to_multiple(order, 2)
    assert padded == order + order[:1]


def test_shuffle_block_keeps_blocks_local():
    manifest = fake_manifest([6, 6])
    order = training_order(manifest, seed=0, epoch=0, shuffle_block=3)
    # shard order first, then blocks of 3 consecutive samples: every aligned triple of the
    # output comes from one block of three consecutive positions of one shard
    for i in range(0, 12, 3):
        triple = order[i : i + 3]
        assert len({r.shard for r in triple}) == 1
        positions = sorted(r.position for r in triple)
        assert positions[0] % 3 == 0 and positions == list(range(positions[0], positions[0] + 3))


def test_pad_to_multiple_wraps_more_than_once():
    refs = [SampleRef(0, 0), SampleRef(0, 1)]
    assert pad_to_multiple(refs, 5) == refs + refs + refs[:1]
    assert pad_to_multiple([], 3) == []


def test_resume_skips_consumed_batches_without_changing_the_rest():
    manifest = fake_manifest([5, 1, 3, 2])
    full = plan_batches(manifest, 2, 1, 2, train=True, seed=5, epoch=4)
    resumed = plan_batches(manifest, 2, 1, 2, train=True, seed=5, epoch=4, start_batch=2)
    assert resumed == full[2:]
    assert resumed[0].index == 2


def test_bad_rank_is_refused():
    with pytest.raises(ValueError, match="rank 2 is outside world size 2"):
        plan_batches(fake_manifest([3]), 1, 2, 2, train=False)
