"""Sample order for an epoch: a pure function of (shard sizes, world, seed, epoch).

No I/O, no torch, no Ray (as in MosaicML streaming), so it is tested with grids.

Training: shards are permuted by (seed, epoch) and dealt round-robin to ranks, then
each rank's shards round-robin to its DataLoader workers. A worker yields
ceil(samples / batch) batches of its own shards' samples; every rank must take the same
number of steps (an uneven count hangs DDP), so ranks with fewer batches give extra
batches to their workers, filled by *repeating* samples from the start of that
worker's stream. Nothing is dropped: every sample is seen at least once per epoch and
at most a few batches per rank are repeats. With fewer shards than ranks the shard
order is cycled so that every rank has one; workers without a shard yield nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class WorkerPlan:
    shards: tuple[int, ...]  # shard indices, in reading order
    samples: int  # real samples in those shards
    batches: int  # batches to yield; batches * batch_size - samples are repeats


def shard_order(num_shards: int, seed: int, epoch: int) -> list[int]:
    return np.random.default_rng([seed, epoch]).permutation(num_shards).tolist()


def _deal(items: list[int], parts: int) -> list[list[int]]:
    return [items[p::parts] for p in range(parts)]


def epoch_plan(
    shard_sizes: list[int], world_size: int, num_workers: int, batch_size: int, seed: int, epoch: int
) -> list[list[WorkerPlan]]:
    """``plan[rank][worker]`` for a training epoch."""
    if world_size < 1 or num_workers < 1 or batch_size < 1:
        raise ValueError("world_size, num_workers and batch_size must be positive")
    if not shard_sizes:
        raise ValueError("no shards")
    order = shard_order(len(shard_sizes), seed, epoch)
    while len(order) < world_size:  # fewer shards than ranks: repeat shards (pad)
        order += order[: world_size - len(order)]
    plans = []
    for rank_shards in _deal(order, world_size):
        workers = _deal(rank_shards, num_workers)
        samples = [sum(shard_sizes[s] for s in w) for w in workers]
        plans.append([WorkerPlan(tuple(w), n, -(-n // batch_size)) for w, n in zip(workers, samples, strict=True)])
    steps = max(sum(w.batches for w in rank) for rank in plans)
    return [_pad_rank(rank, steps) for rank in plans]


def _pad_rank(workers: list[WorkerPlan], steps: int) -> list[WorkerPlan]:
    extra = steps - sum(w.batches for w in workers)
    batches = [w.batches for w in workers]
    with_data = [i for i, w in enumerate(workers) if w.shards]
    for k in range(extra):
        batches[with_data[k % len(with_data)]] += 1
    return [WorkerPlan(w.shards, w.samples, b) for w, b in zip(workers, batches, strict=True)]


def eval_plan(num_shards: int, world_size: int, num_workers: int) -> list[list[tuple[int, ...]]]:
    """``plan[rank][worker]``: shards in natural order, each read exactly once, no padding
    (ranks may then take different numbers of eval steps; eval needs no per-step sync)."""
    return [[tuple(w) for w in _deal(rank, num_workers)] for rank in _deal(list(range(num_shards)), world_size)]
