"""Elastic students' rules without a cluster: the batch each world size trains with, the
fields refused, the reading of an epoch restarted at another world size, the resize line
(the drill on a multi-node cluster: tests/test_faults.py)."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from catkd.errors import ConfigError
from pipeline.data.loader import ReaderConfig, ShardStream, make_loader
from pipeline.data.shard_writer import ShardConfig, shard_dataset
from pipeline.data.views import AugmentSpec
from pipeline.train.config import TrainConfig, resume_conflicts
from pipeline.train.loop import _rescale_lr, _say_start


def _cfg(**fields) -> TrainConfig:
    return TrainConfig(**({"data": "/d", "mode": "ce", "batch_size": 16, "num_workers": 4, "min_workers": 1} | fields))


def test_the_global_batch_is_kept_where_the_world_divides_it():
    cfg = _cfg()
    assert cfg.elastic and cfg.global_batch == 64
    for world, per_worker in [(4, 16), (2, 32), (1, 64)]:
        batch = cfg.batch_for(world)
        assert (batch.per_worker, batch.global_batch, batch.lr_scale, batch.kept) == (per_worker, 64, 1.0, True)


def test_otherwise_the_nearest_whole_share_with_the_learning_rate_scaled_linearly():
    batch = _cfg().batch_for(3)  # 64 / 3 = 21.3
    assert (batch.per_worker, batch.global_batch, batch.kept) == (21, 63, False)
    assert batch.lr_scale == pytest.approx(63 / 64)
    batch = _cfg(batch_size=2, num_workers=4).batch_for(3)  # 8 / 3 = 2.7
    assert (batch.per_worker, batch.global_batch, batch.lr_scale) == (3, 9, 9 / 8)


def test_fixed_runs_are_unchanged():
    cfg = _cfg(min_workers=0)
    assert not cfg.elastic and cfg.batch_for(4).per_worker == 16
    assert not _cfg(min_workers=4).elastic  # min = max: a fixed size


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"min_workers": 5}, "min_workers: an elastic run grows from min_workers to num_workers, got min_workers=5 > "),
        ({"min_workers": -1}, "min_workers"),
        ({"resize_check_s": -1.0}, "resize_check_s: must not be negative"),
    ],
)
def test_bad_elastic_fields_are_named(fields, message):
    with pytest.raises(ConfigError, match=message):
        _cfg(**fields)


def test_an_elastic_range_may_change_on_resume():
    refused, allowed = resume_conflicts({**_cfg(min_workers=0).__dict__}, _cfg(min_workers=2, resize_check_s=5.0))
    assert refused == [] and allowed == ["min_workers", "resize_check_s"]


def test_a_restored_schedule_takes_the_new_worlds_learning_rate():
    cfg = _cfg(lr=0.1, lr_decay_epochs=[2], lr_decay_rate=0.1)
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.peak_lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cfg.lr_factor)
    for _ in range(3):  # past the decay at epoch 2
        optimizer.step()
        scheduler.step()
    _rescale_lr(optimizer, scheduler, cfg.peak_lr * 0.5)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5 * 0.1)
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5 * 0.1)


class _Lines:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def say(self, line: str) -> None:
        self.lines.append(line)


def test_one_line_per_resize_and_the_batch_rule_when_it_applies():
    cfg, console = _cfg(name="el"), _Lines()
    history = [{"epoch": 6, "world_size": 4}]
    _say_start(console, cfg, 3, cfg.batch_for(3), 6, history, True, torch.device("cpu"))
    assert console.lines == [
        "[train] el: resized 4 -> 3 workers at epoch 7 (workers lost); resuming from epoch 6's checkpoint",
        "[train] el: 3 workers cannot share the global batch 64 evenly: 21 per worker (global 63), "
        "learning rate x 0.9844",
    ]
    console.lines.clear()
    _say_start(console, cfg, 4, cfg.batch_for(4), 7, history + [{"epoch": 7, "world_size": 4}], True, "cpu")
    assert console.lines == ["[train] el: 4 worker(s) resuming after epoch 7 of 240; rank 0 on cpu"]


@pytest.fixture(scope="module")
def shards(ray_local, tmp_path_factory):
    out = tmp_path_factory.mktemp("elastic") / "shapes"
    synthetic = {"train_samples": 96, "test_samples": 8, "image_size": 32, "seed": 5}
    shard_dataset(ShardConfig("synthetic:shapes", str(out), samples_per_shard=12, synthetic=synthetic, progress=False))
    return str(out)


@pytest.mark.parametrize("world", [4, 2, 1, 3])
def test_an_epoch_restarted_at_another_world_size_reads_every_sample_once(shards, world):
    """The epoch's plan is recomputed for the world it runs with, each rank reading with
    the per-worker batch of that world: 96 samples in 8 shards read once each (where the
    shards do not deal evenly, ranks also pad their steps to be equal, with repeats only)."""
    batch = _cfg(batch_size=6, num_workers=4).batch_for(world)
    spec = AugmentSpec.preset("cifar", seed=1)
    ids: Counter[int] = Counter()
    steps = set()
    for rank in range(world):
        stream = ShardStream(ReaderConfig(data=shards, batch_size=batch.per_worker, spec=spec), rank, world)
        stream.set_epoch(6)
        batches = list(make_loader(stream, 1))
        steps.add(len(batches))
        ids.update(int(i) for b in batches for i in b["ids"])
    assert len(steps) == 1 and set(ids) == set(range(96))
    if world != 3:
        assert set(ids.values()) == {1}
    else:  # 8 shards over 3 ranks (3, 3, 2): the short rank repeats samples to take as many steps
        assert sum(ids.values()) == steps.pop() * batch.per_worker * world > 96
