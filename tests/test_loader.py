"""The streaming reader with several simulated ranks and DataLoader workers."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from pipeline.data.loader import ReaderConfig, ShardStream, make_loader
from pipeline.data.shard_writer import ShardConfig, shard_dataset
from pipeline.data.views import AugmentSpec, view_params

SPEC = AugmentSpec.preset("cifar", seed=11)


@pytest.fixture(scope="module")
def shards(ray_local, tmp_path_factory):
    out = tmp_path_factory.mktemp("reader") / "shapes"
    synthetic = {"train_samples": 103, "test_samples": 25, "image_size": 32, "seed": 2}
    shard_dataset(ShardConfig("synthetic:shapes", str(out), samples_per_shard=10, synthetic=synthetic, progress=False))
    return str(out)


def _epoch(data, world, workers, epoch=0, batch=8, **kw):
    """Batches of every rank for one epoch, each rank through its own DataLoader."""
    per_rank = []
    for rank in range(world):
        stream = ShardStream(ReaderConfig(data=data, batch_size=batch, spec=SPEC, **kw), rank, world)
        stream.set_epoch(epoch)
        per_rank.append(list(make_loader(stream, workers)))
    return per_rank


@pytest.mark.parametrize("world, workers", [(1, 0), (2, 0), (2, 2), (3, 1), (4, 2)])
def test_every_sample_once_per_epoch_and_equal_steps(shards, world, workers):
    per_rank = _epoch(shards, world, workers)
    assert len({len(batches) for batches in per_rank}) == 1
    stream = ShardStream(ReaderConfig(data=shards, batch_size=8, spec=SPEC), 0, world)
    assert len(per_rank[0]) == stream.steps_per_epoch(workers)
    ids = Counter(int(i) for batches in per_rank for b in batches for i in b["ids"])
    assert set(ids) == set(range(103))
    total = sum(ids.values())
    assert total - 103 < world * max(workers, 1) * 8 + 10  # repeats only pad the last batches
    for batches in per_rank:
        for b in batches:
            assert b["image"].shape == (8, 3, 32, 32) and b["image"].dtype == torch.float32
            assert b["label"].max() < 10 and b["box"].shape == (8, 4)


def test_two_ranks_see_the_same_samples_as_one(shards):
    one = {int(i) for b in _epoch(shards, 1, 0)[0] for i in b["ids"]}
    two = {int(i) for rank in _epoch(shards, 2, 0) for b in rank for i in b["ids"]}
    assert one == two == set(range(103))


def test_order_is_deterministic_and_changes_with_epoch(shards):
    first = [b["ids"].tolist() for b in _epoch(shards, 2, 2, epoch=1)[1]]
    again = [b["ids"].tolist() for b in _epoch(shards, 2, 2, epoch=1)[1]]
    other = [b["ids"].tolist() for b in _epoch(shards, 2, 2, epoch=2)[1]]
    assert first == again and first != other


def test_views_follow_the_epoch_and_parameters_replay(shards):
    for epoch in range(3):
        batch = _epoch(shards, 1, 0, epoch=epoch, num_views=2, view_offset=1)[0][0]
        view = (epoch + 1) % 2
        assert int(batch["view"]) == view
        expected = view_params(SPEC, batch["ids"].numpy(), view, (32, 32))
        assert np.array_equal(batch["params"].numpy(), expected)


def test_without_a_fixed_view_count_every_epoch_draws_a_new_view(shards):
    # num_views 0 (a run with no cache): plain augmentation, a view never seen before each epoch
    views = [int(_epoch(shards, 1, 0, epoch=epoch, num_views=0)[0][0]["view"]) for epoch in (0, 1, 7, 50)]
    assert views == [0, 1, 7, 50]


def test_fewer_shards_than_ranks_times_workers(ray_local, tmp_path):
    out = tmp_path / "tiny"
    shard_dataset(
        ShardConfig(
            "synthetic:shapes",
            str(out),
            splits=["train"],
            samples_per_shard=50,
            synthetic={"train_samples": 20, "test_samples": 1},
            progress=False,
        )
    )
    per_rank = _epoch(str(out), 3, 2, batch=4)
    assert len({len(b) for b in per_rank}) == 1 and len(per_rank[0]) >= 5
    assert {int(i) for rank in per_rank for b in rank for i in b["ids"]} == set(range(20))


def test_eval_reader_reads_each_test_sample_once(shards):
    ids = []
    for rank in range(2):
        stream = ShardStream(ReaderConfig(data=shards, split="test", batch_size=8, train=False, spec=SPEC), rank, 2)
        for b in make_loader(stream, 2):
            assert "params" not in b and int(b["view"]) == -1
            ids += b["ids"].tolist()
    assert sorted(ids) == list(range(25))


def test_uint8_output_for_normalising_on_device(shards):
    batch = _epoch(shards, 1, 0, normalize=False)[0][0]
    assert batch["image"].dtype == torch.uint8


def test_persistent_workers_read_each_epochs_view(shards):
    """Loader workers live across epochs; set_epoch still reaches them (shared memory),
    so each epoch reads its own view and its own shard order."""
    stream = ShardStream(ReaderConfig(data=shards, batch_size=8, spec=SPEC, num_views=3), 0, 1)
    loader = make_loader(stream, 2)
    seen, iterators = {}, set()
    for epoch in (0, 1, 2):
        stream.set_epoch(epoch)
        batches = list(loader)
        iterators.add(id(loader._iterator))  # a persistent DataLoader keeps one iterator and its workers
        assert {int(b["view"]) for b in batches} == {epoch % 3}
        params = {int(i): p.tolist() for b in batches for i, p in zip(b["ids"], b["params"], strict=True)}
        ids = np.array(sorted(params))
        expected = view_params(SPEC, ids, epoch % 3, (32, 32))
        assert [params[int(i)] for i in ids] == expected.tolist()
        seen[epoch] = [int(i) for b in batches for i in b["ids"]]
    assert seen[0] != seen[1]  # another shard order and shuffle
    assert len(iterators) == 1  # the same worker processes served all three epochs


@pytest.mark.parametrize("mix", ["mixup:0.4", "cutmix:1.0"])
def test_mixed_views_take_their_partner_from_the_same_shard_and_mix_the_labels(shards, mix):
    """Every view is mixed with another sample of its own data shard (10 samples each
    here); ``label_b`` is that partner's label and ``lam`` the view's own share, as
    stored in its parameters; cross-entropy against the soft targets the training loop
    builds is lambda CE(y) + (1 - lambda) CE(y_b)."""
    from pipeline.data.shard_format import load_shard
    from pipeline.data.views import mix_of
    from pipeline.train.loop import _mixed_labels

    spec = AugmentSpec.preset("cifar", seed=11, mix=mix)
    stream = ShardStream(ReaderConfig(data=shards, batch_size=8, spec=spec, normalize=False), 0, 1)
    labels = {s.id: s.label for info in stream.index.shards for s in load_shard(shards, stream.index, info)}
    batches = list(make_loader(stream, 0))
    assert sum(len(b["ids"]) for b in batches) >= 96
    for batch in batches:
        ids, params = batch["ids"].numpy(), batch["params"].numpy()
        partners, lam = mix_of(spec, params)
        assert np.array_equal(partners // 10, ids // 10) and (partners != ids).all()  # the same shard, not itself
        assert batch["label_b"].tolist() == [labels[int(p)] for p in partners]
        assert np.allclose(batch["lam"].numpy(), lam) and ((lam >= 0) & (lam <= 1)).all()
        logits = torch.randn(len(ids), 10)
        soft = _mixed_labels(batch, batch["label"], 10, torch.device("cpu"))
        expected = torch.nn.functional.cross_entropy(logits, batch["label"], reduction="none") * batch["lam"]
        expected += torch.nn.functional.cross_entropy(logits, batch["label_b"], reduction="none") * (1 - batch["lam"])
        torch.testing.assert_close(torch.nn.functional.cross_entropy(logits, soft), expected.mean())


@pytest.mark.parametrize("mix", ["mixup:0.4", "cutmix:1.0"])
def test_the_device_renderer_mixes_loader_batches_as_the_host_does(shards, mix):
    """With the device renderer a mixing batch carries its partners' packed images and
    view parameters; rendered (on CPU here) they give the host renderer's batch, with
    the same partner labels and shares."""
    from pipeline.data.device_render import batch_views

    spec = AugmentSpec.preset("cifar", seed=11, ops="trivialaugment", mix=mix)
    device_spec = AugmentSpec.preset("cifar", seed=11, ops="trivialaugment", mix=mix, renderer="device")
    host = list(make_loader(ShardStream(ReaderConfig(data=shards, batch_size=8, spec=spec, normalize=False)), 0))
    packed = list(make_loader(ShardStream(ReaderConfig(data=shards, batch_size=8, spec=device_spec)), 0))
    assert len(host) == len(packed) and any("partner_ids" in b for b in packed)
    for cpu_batch, batch in zip(host, packed, strict=True):
        views, _ = batch_views(device_spec, batch, torch.device("cpu"))
        assert torch.equal(views, cpu_batch["image"])
        for name in ("ids", "params", "label", "label_b", "lam"):
            assert torch.equal(batch[name], cpu_batch[name]), name
