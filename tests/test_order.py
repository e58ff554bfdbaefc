"""Epoch order is a pure function; every rank takes the same number of steps (grids)."""

from __future__ import annotations

import itertools

import pytest

from pipeline.data.order import epoch_plan, eval_plan, shard_order

SIZES = {
    "even": [100] * 8,
    "uneven": [100, 100, 100, 37],
    "ragged": [5, 300, 17, 64, 64, 1, 250],
    "one shard": [90],
    "two tiny": [3, 2],
}


@pytest.mark.parametrize("sizes_name", list(SIZES))
@pytest.mark.parametrize("world, workers, batch", list(itertools.product([1, 2, 3, 5], [1, 2, 4], [1, 16, 64])))
def test_equal_steps_and_every_sample_covered(sizes_name, world, workers, batch):
    sizes = SIZES[sizes_name]
    plan = epoch_plan(sizes, world, workers, batch, seed=7, epoch=3)
    assert len(plan) == world and all(len(rank) == workers for rank in plan)
    steps = {sum(w.batches for w in rank) for rank in plan}
    assert len(steps) == 1  # DDP would hang otherwise
    dealt = [s for rank in plan for w in rank for s in w.shards]
    assert set(dealt) == set(range(len(sizes)))
    if len(sizes) >= world:
        assert sorted(dealt) == list(range(len(sizes)))  # each shard exactly once
    for rank in plan:
        for w in rank:
            assert w.batches * batch >= w.samples  # padding only adds, nothing is dropped
            assert w.shards or w.batches == 0
            assert w.samples == sum(sizes[s] for s in w.shards)


def test_order_is_a_function_of_seed_and_epoch():
    sizes = [10] * 20
    assert epoch_plan(sizes, 2, 2, 4, 1, 5) == epoch_plan(sizes, 2, 2, 4, 1, 5)
    assert shard_order(20, 1, 5) != shard_order(20, 1, 6)
    assert shard_order(20, 1, 5) != shard_order(20, 2, 5)
    assert sorted(shard_order(20, 1, 5)) == list(range(20))


def test_padding_is_small():
    sizes = [100, 100, 100, 37]
    plan = epoch_plan(sizes, 2, 1, 10, seed=0, epoch=0)
    padded = sum(w.batches * 10 for rank in plan for w in rank)
    assert padded - sum(sizes) < 100  # at most about one shard's worth


def test_eval_plan_reads_every_shard_once():
    for shards, world, workers in itertools.product([1, 3, 8], [1, 2, 4], [1, 3]):
        plan = eval_plan(shards, world, workers)
        dealt = sorted(s for rank in plan for w in rank for s in w)
        assert dealt == list(range(shards))
