"""Augmentation stages as recorded view parameters: torchvision's op tables and ops, the
draws, exact replay on both renderers, the identity, and refusals of bad settings."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import RandAugment, TrivialAugmentWide

from catkd.errors import CatkdError, ConfigError
from pipeline.cache.identity import CacheIdentity, first_difference
from pipeline.data import host_images
from pipeline.data.device_render import batch_views, render_on_device, render_packed
from pipeline.data.partners import pack_for_device, shard_mix_source
from pipeline.data.shard_format import Sample, decode_image
from pipeline.data.stages import BINS, OPS, SIGNED, Stages, apply_op, apply_stages, magnitude_of, parse_stages
from pipeline.data.views import AugmentSpec, MixSource, mix_of, render_views, view_params

STAGED = [
    ("trivialaugment", 0.0),
    ("randaugment:2:9", 0.0),
    ("none", 1.0),
    ("trivialaugment", 0.5),
    ("randaugment:3:30", 0.25),
]
MIXES = ["mixup:0.2", "mixup:1.0", "cutmix:1.0"]
# every stage at once: ops, erasing and mixing, whose parameters follow each other
ALL_STAGES = {"ops": "randaugment:2:9", "erase": 0.5, "mix": "cutmix:1.0"}


@pytest.mark.parametrize("policy, reference", [("trivialaugment", TrivialAugmentWide), ("randaugment", RandAugment)])
def test_magnitude_tables_are_torchvisions(policy, reference):
    stages = parse_stages(policy if policy == "trivialaugment" else "randaugment:1:0", 0.0)
    space = reference._AUGMENTATION_SPACE
    assert set(space) == set(OPS) and {op for op, (_, signed) in space.items() if signed} == SIGNED
    for op, (table, _) in space.items():
        values = table(BINS, 32, 40)  # height 32, width 40: the translations differ per axis
        for magnitude_bin in range(BINS):
            expected = 0.0 if values is None or values.ndim == 0 else float(values[magnitude_bin])
            assert magnitude_of(stages, op, magnitude_bin, 32, 40) == expected, (op, magnitude_bin)


def test_each_op_is_applied_as_torchvision_applies_it():
    policy = TrivialAugmentWide(interpolation=InterpolationMode.NEAREST)
    image = torch.from_numpy(np.random.default_rng(1).integers(0, 256, (3, 24, 32), dtype=np.uint8))
    stages = parse_stages("trivialaugment", 0.0)
    for op in OPS:
        for magnitude_bin in (0, 7, 30):
            for sign in (1, -1) if op in SIGNED else (1,):
                magnitude = sign * magnitude_of(stages, op, magnitude_bin, 24, 32)
                expected = policy._apply_image_or_video_transform(
                    image, op, magnitude, interpolation=policy.interpolation, fill=policy._fill
                )
                assert torch.equal(apply_op(image, op, magnitude), expected), (op, magnitude)


@pytest.mark.parametrize("ops", ["trivialaugment", "randaugment:2:9"])
def test_ops_applied_by_group_equal_ops_applied_one_view_at_a_time(ops):
    """apply_stages runs each (op, magnitude) once on all views that drew it: every op,
    bin and sign gives the pixels it gives one view at a time."""
    stages = parse_stages(ops, 0.0)
    rng = np.random.default_rng(4)
    slots = [(op, b, sign) for op in range(len(OPS)) for b in range(BINS) for sign in (0, 1)]
    n = len(slots)
    first = np.array(slots)
    params = np.concatenate([first, rng.permutation(first)], axis=1)[:, : 3 * stages.num_ops]
    views = torch.from_numpy(rng.integers(0, 256, (n, 3, 24, 32), dtype=np.uint8))
    grouped = apply_stages(stages, views, params, (0, 0, 0))
    one_by_one = torch.cat([apply_stages(stages, views[k : k + 1], params[k : k + 1], (0, 0, 0)) for k in range(n)])
    assert torch.equal(grouped, one_by_one)
    assert (grouped != views).any(dim=(1, 2, 3)).float().mean() > 0.8


def test_boxes_pasted_by_mask_equal_boxes_pasted_by_slices():
    """CutMix's paste and erasing's fill: the masked select the device takes equals the
    host's slice copies, empty boxes and boxes at the edges included."""
    from pipeline.data.stages import _paste

    rng = np.random.default_rng(8)
    views, partners = (torch.from_numpy(rng.integers(0, 256, (40, 3, 24, 32), dtype=np.uint8)) for _ in range(2))
    x0, y0 = rng.integers(0, 32, 40), rng.integers(0, 24, 40)
    boxes = np.stack([x0, y0, rng.integers(0, 33, 40).clip(max=32 - x0), rng.integers(0, 25, 40).clip(max=24 - y0)], 1)
    boxes[:5, 2] = 0  # empty boxes paste nothing
    colour = torch.tensor([125, 123, 114], dtype=torch.uint8)
    for source in (partners, colour):
        sliced, masked = (_paste(views, source, boxes, masked=m) for m in (False, True))
        assert torch.equal(sliced, masked)
        assert torch.equal(sliced[:5], views[:5]) and not torch.equal(sliced, views)


def test_draws_cover_the_policies_and_erasing_boxes_fit():
    ids, hw = np.arange(4000), np.array([[32, 32]])
    wide = view_params(AugmentSpec.preset("cifar", 3, ops="trivialaugment"), ids, 1, hw)
    assert wide.shape == (4000, 8)
    assert set(wide[:, 5]) == set(range(len(OPS))) and set(wide[:, 6]) == set(range(BINS))
    assert set(wide[:, 7]) == {0, 1}
    rand = view_params(AugmentSpec.preset("cifar", 3, ops="randaugment:2:9"), ids, 1, hw)
    assert rand.shape == (4000, 11) and set(rand[:, 6]) == set(rand[:, 9]) == {9}
    assert set(rand[:, 5]) == set(rand[:, 8]) == set(range(len(OPS)))
    erase = view_params(AugmentSpec.preset("imagenet", 3, erase=0.25), ids, 1, np.array([[300, 400]]))[:, 5:]
    applied = erase[erase[:, 0] == 1]
    assert abs(len(applied) / len(ids) - 0.25) < 0.03 and not erase[erase[:, 0] == 0].any()
    x0, y0, w, h = applied[:, 1:].T
    assert (x0 >= 0).all() and (y0 >= 0).all() and (x0 + w <= 224).all() and (y0 + h <= 224).all()
    assert (w * h >= 0.015 * 224 * 224).all() and (w * h <= 0.34 * 224 * 224).all()
    # the crop box and flip are the stage-less spec's: stages draw from a stream of their own
    assert np.array_equal(wide[:, :5], view_params(AugmentSpec.preset("cifar", 3), ids, 1, hw))
    # a run without a cache draws new stages every epoch (view = epoch)
    assert not np.array_equal(wide, view_params(AugmentSpec.preset("cifar", 3, ops="trivialaugment"), ids, 2, hw))


@pytest.mark.parametrize("ops, erase", STAGED)
def test_stored_parameters_replay_the_same_pixels_on_both_renderers(ops, erase):
    """What the cache builder renders (fresh parameters) equals what a student renders
    from the stored ones, on the CPU renderer and on the device renderer (on CPU here),
    and the stages really change the views."""
    rng = np.random.default_rng(5)
    images = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(64)]
    ids = np.arange(100, 164)
    spec = AugmentSpec.preset("cifar", 1, ops=ops, erase=erase)
    params, views = render_views(spec, images, ids, 3)
    stored = params.astype(np.int32)  # as the cache holds them
    assert torch.equal(render_views(spec, images, ids, 3, stored_params=stored)[1], views)
    device = dataclasses.replace(spec, renderer="device")
    tensors = [torch.from_numpy(im).permute(2, 0, 1) for im in images]
    on_device = render_on_device(device, tensors, torch.from_numpy(stored)[:, None])
    assert torch.equal(on_device[:, 0], views)  # the cifar crop has no resize: both renderers agree exactly
    plain = render_views(AugmentSpec.preset("cifar", 1), images, ids, 3)[1]
    assert (views != plain).any(dim=(1, 2, 3)).float().mean() > 0.3


def test_erased_boxes_take_the_spec_mean_colour():
    spec = AugmentSpec.preset("cifar", 0, erase=1.0)
    images = [np.full((32, 32, 3), 255, np.uint8) for _ in range(8)]
    params, views = render_views(spec, images, np.arange(8), 0)
    fill = torch.tensor([round(255 * m) for m in spec.mean], dtype=torch.uint8)
    for k, (applied, x0, y0, w, h) in enumerate(params[:, 5:].tolist()):
        if applied:
            assert (views[k, :, y0 : y0 + h, x0 : x0 + w] == fill[:, None, None]).all()


def test_every_stage_field_is_in_the_identity():
    base = AugmentSpec.preset("cifar", 0)
    variants = (
        [base]
        + [dataclasses.replace(base, ops=ops, erase=erase) for ops, erase in STAGED + [("randaugment:2:10", 0.0)]]
        + [dataclasses.replace(base, mix=mix) for mix in MIXES]
    )
    identities = [
        CacheIdentity("resnet8", "w", "d", "train", spec.to_dict(), num_views=2, resolution=2, num_classes=10)
        for spec in variants
    ]
    assert len({ident.cache_id for ident in identities}) == len(variants)
    message = first_difference(identities[0], identities[1])
    assert message == "spec.ops: the run needs 'none', the cache holds 'trivialaugment'"


@pytest.mark.parametrize(
    "ops, erase, message",
    [
        ("autoaugment", 0.0, "ops: expected none, trivialaugment or randaugment:N:M"),
        ("randaugment:2", 0.0, "ops: expected none, trivialaugment or randaugment:N:M"),
        ("randaugment:0:9", 0.0, "ops: randaugment:N:M takes N in 1..4 ops per view, got N=0"),
        ("randaugment:2:31", 0.0, "ops: randaugment:N:M takes a magnitude bin M in 0..30, got M=31"),
        ("none", 1.5, "erase: the erasing probability must be in [0, 1], got 1.5"),
        ("mix=mixup", 0.0, "mix: expected none, mixup:ALPHA or cutmix:ALPHA"),
        ("mix=blend:1", 0.0, "mix: expected none, mixup:ALPHA or cutmix:ALPHA"),
        ("mix=cutmix:0", 0.0, "mix: ALPHA of Beta(ALPHA, ALPHA) must be in (0, 10], got 0"),
        ("mix=mixup:11", 0.0, "mix: ALPHA of Beta(ALPHA, ALPHA) must be in (0, 10], got 11"),
    ],
)
def test_bad_stages_are_refused_naming_the_field(ops, erase, message):
    from pipeline.train.config import TrainConfig

    stages = {"mix": ops[4:]} if ops.startswith("mix=") else {"ops": ops, "erase": erase}
    with pytest.raises(ConfigError) as raised:
        TrainConfig(data="/d", mode="ce", **stages)
    assert str(raised.value).startswith(message) and "\n" not in str(raised.value)


def test_stage_widths():
    assert parse_stages("none", 0.0) == Stages() and Stages().width == 0
    assert parse_stages("randaugment:2:9", 0.1).width == 3 * 2 + 5
    assert AugmentSpec.preset("imagenet", ops="trivialaugment", erase=0.5).num_params == 5 + 3 + 5


@pytest.mark.parametrize("alpha", [0.2, 1.0, 2.0])
def test_mixing_lambda_follows_beta_alpha_alpha(alpha):
    """The counter-based Beta(alpha, alpha) draws against numpy's own sampler: the same
    quantiles within sampling error."""
    ids = np.arange(20000)
    spec = AugmentSpec.preset("cifar", 5, mix=f"mixup:{alpha}")
    lam = mix_of(spec, view_params(spec, ids, 0, np.array([[32, 32]]), np.tile([0, 20000], (20000, 1))))[1]
    reference = np.random.default_rng(0).beta(alpha, alpha, 200000)
    quantiles = np.linspace(0.05, 0.95, 19)
    assert np.abs(np.quantile(lam, quantiles) - np.quantile(reference, quantiles)).max() < 0.02


def test_partners_stay_in_their_shard():
    spec = AugmentSpec.preset("cifar", 2, mix="cutmix:1.0")
    shards = np.array([(0, 7), (7, 1), (8, 1000)] * 400)  # rows: each sample's shard
    ids = shards[:, 0] + np.arange(len(shards)) % shards[:, 1]
    partners = mix_of(spec, view_params(spec, ids, 3, np.array([[32, 32]]), shards))[0]
    inside = (partners >= shards[:, 0]) & (partners < shards[:, 0] + shards[:, 1])
    assert inside.all()
    alone = shards[:, 1] == 1
    assert (partners[alone] == ids[alone]).all() and (partners[~alone] != ids[~alone]).all()
    big = shards[:, 0] == 8
    assert len(set(partners[big].tolist())) > 250  # spread over the shard, not a few favourites


@pytest.mark.parametrize("mix", MIXES + ["all"])
def test_mixed_views_replay_exactly_and_hold_their_partners_pixels(mix):
    rng = np.random.default_rng(9)
    shard = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(20)]  # ids 40..59
    stages = ALL_STAGES if mix == "all" else {"ops": "trivialaugment", "mix": mix}
    spec = AugmentSpec.preset("cifar", 4, **stages)
    ids = np.arange(40, 60)
    ranges = np.tile([40, 20], (20, 1))
    drawn = {}

    def partners(stored):
        def give(pids):
            images = [shard[int(p) - 40] for p in pids]
            return images, (np.stack([drawn[int(p)] for p in pids]) if stored else None)

        return MixSource(ranges, give)

    params, views = render_views(spec, shard, ids, 2, mixing=partners(False))
    drawn.update({int(i): p for i, p in zip(ids, params, strict=True)})
    assert torch.equal(render_views(spec, shard, ids, 2, params.astype(np.int32), mixing=partners(True))[1], views)
    own = render_views(dataclasses.replace(spec, mix="none"), shard, ids, 2)[1]  # each sample's own view, unmixed
    assert spec.mix != "none"
    partner_ids, lam = mix_of(spec, params)
    other = own[torch.as_tensor(partner_ids - 40)]
    lam_q = torch.as_tensor(np.round(lam * 65536).astype(np.int64)).view(-1, 1, 1, 1)
    if spec.mix.startswith("mixup"):
        expected = (lam_q * own.long() + (65536 - lam_q) * other.long() + 32768) >> 16
        assert torch.equal(views, expected.to(torch.uint8))
    else:
        for k, (x0, y0, w, h) in enumerate(params[:, -4:].tolist()):
            inside = torch.zeros(32, 32, dtype=torch.bool)
            inside[y0 : y0 + h, x0 : x0 + w] = True
            assert torch.equal(views[k][:, inside], other[k][:, inside])
            assert torch.equal(views[k][:, ~inside], own[k][:, ~inside])
            assert lam[k] == pytest.approx(1 - w * h / 1024, abs=2**-16)


@pytest.mark.parametrize("mix", MIXES + ["all"])
def test_the_device_renderer_mixes_as_the_cpu_renderer(mix):
    """A batch that holds a few of its partners: the others travel with it
    (``pack_for_device``), the device renderer (on CPU here) gives the CPU renderer's
    pixels, and a partner that was not sent is named rather than guessed."""
    rng = np.random.default_rng(3)
    shape = [32, 32, 3]
    shard = [Sample(40 + k, k % 10, rng.integers(0, 256, shape, dtype=np.uint8).tobytes(), "rgb") for k in range(20)]
    stages = ALL_STAGES if mix == "all" else {"ops": "trivialaugment", "mix": mix}
    spec = AugmentSpec.preset("cifar", 4, **stages)
    batch = shard[::3]
    ids, shards = np.array([s.id for s in batch]), [shard] * len(batch)
    cpu_params, cpu_views = render_views(
        spec, [decode_image(s, shape, "t") for s in batch], ids, 2, mixing=shard_mix_source(shards, shape, "t")
    )
    device = dataclasses.replace(spec, renderer="device")
    packed = pack_for_device(device, batch, shards, 2, shape, "t")
    assert np.array_equal(packed["ids"], ids) and np.array_equal(packed["params"], cpu_params)
    assert len(packed["partner_ids"]) and not set(packed["partner_ids"].tolist()) & set(ids.tolist())
    own = host_images.pack(batch, shape, "t", "cpu")  # the batch's images without its partners'
    with pytest.raises(CatkdError, match=r"t: mixing partner \d+ was not sent"):
        render_packed(device, own, packed["params"][:, None], ids, torch.device("cpu"), "t")
    views, _ = batch_views(device, {n: torch.from_numpy(a) for n, a in packed.items()}, torch.device("cpu"), "t")
    assert torch.equal(views, cpu_views)
