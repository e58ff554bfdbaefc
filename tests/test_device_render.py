"""The device renderer on CPU tensors, nvJPEG's fallbacks (driven by the CPU decoder
through the same batched call), the renderer and decoder in the identity, and the
rule for a student that would render differently from its cache."""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.cache import CacheBuildConfig, CacheBuildError, CacheMismatchError, build_cache, expected_identity
from pipeline.cache.feed import render_chunks
from pipeline.cache.teacher import ShardTargets, TeacherRunner, TeacherSettings
from pipeline.data import host_images
from pipeline.data.device_render import DeviceRenderError, batch_views, render_on_device
from pipeline.data.loader import ReaderConfig, ShardStream, make_loader
from pipeline.data.shard_format import Sample, ShardError, load_shard, read_index
from pipeline.data.shard_writer import ShardConfig, shard_dataset
from pipeline.data.views import AugmentSpec, render_views, view_params
from pipeline.train.config import TrainConfig
from pipeline.train.run import resolve

IMAGENET = AugmentSpec.preset("imagenet", seed=5)
DEVICE = AugmentSpec.preset("imagenet", seed=5, renderer="device", decoder="nvjpeg")


def _photo(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Smooth structure plus noise: resampling differences show up on both."""
    yy, xx = np.mgrid[0:height, 0:width]
    base = 127 + 90 * np.sin(xx / (5 + rng.random() * 10))[..., None] * np.cos(yy / (7 + rng.random() * 9))[..., None]
    return (base + rng.normal(0, 25, (height, width, 3))).clip(0, 255).astype(np.uint8)


def _jpeg(pixels: np.ndarray, mode: str = "RGB", **save) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buf, format="JPEG", quality=90, **save)
    return buf.getvalue()


def _cpu_views(spec, images, ids, num_views):
    params, views = zip(*(render_views(spec, images, ids, view) for view in range(num_views)), strict=True)
    return np.stack(params, 1), torch.stack(views, 1)


def test_device_renderer_on_cpu_matches_the_cpu_renderer():
    rng = np.random.default_rng(0)
    shapes = [(256, 341), (300, 256), (256, 256), (480, 256), (256, 400), (64, 90)]
    images = [_photo(rng, h, w) for h, w in shapes]
    ids = np.arange(len(images))
    params, cpu = _cpu_views(IMAGENET, images, ids, 4)
    device = render_on_device(
        DEVICE, [torch.from_numpy(im).permute(2, 0, 1) for im in images], torch.from_numpy(params)
    )
    assert device.shape == cpu.shape == (len(images), 4, 3, 224, 224) and device.dtype == torch.uint8
    diff = (device.int() - cpu.int()).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-4  # docs/cache.md: the measured bound
    # cifar: padding (negative offsets) and flips, exactly
    cifar = AugmentSpec.preset("cifar", seed=2)
    small = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(40)]
    params, cpu = _cpu_views(cifar, small, np.arange(40), 3)
    assert (params[..., :2] < 0).any() and params[..., 4].any() and not params[..., 4].all()
    device = render_on_device(cifar, [torch.from_numpy(im).permute(2, 0, 1) for im in small], torch.from_numpy(params))
    assert torch.equal(device, cpu)


def test_jpeg_frames_and_what_nvjpeg_is_not_given():
    rng = np.random.default_rng(1)
    pixels = _photo(rng, 40, 56)
    cases = {
        "baseline": (_jpeg(pixels), None),
        "progressive": (_jpeg(pixels, progressive=True), "progressive"),
        "grayscale": (_jpeg(pixels, "L"), "grayscale"),
        "cmyk": (_jpeg(pixels, "CMYK"), "cmyk"),
        "truncated": (_jpeg(pixels)[:40], "unreadable_header"),
        "garbage": (b"not a jpeg at all", "unreadable_header"),
    }
    frame = host_images.jpeg_frame(cases["baseline"][0])
    assert (frame.height, frame.width, frame.components, frame.marker) == (40, 56, 3, 0xC0)
    for name, (data, reason) in cases.items():
        assert host_images.nvjpeg_refusal(Sample(0, 0, data, "jpg")) == reason, name
    assert host_images.nvjpeg_refusal(Sample(0, 0, b"png", "png")) == "not_jpeg"


def test_packed_batch_decodes_on_the_device_with_counted_fallbacks():
    rng = np.random.default_rng(2)
    raw = [_photo(rng, 30 + k, 40 + 2 * k) for k in range(6)]
    blobs = [
        _jpeg(raw[0]),
        _jpeg(raw[1], progressive=True),
        _jpeg(raw[2], "L"),
        _jpeg(raw[3], "CMYK"),
        _jpeg(raw[4]),
        _jpeg(raw[5]),
    ]
    samples = [Sample(k, 0, b, "jpg") for k, b in enumerate(blobs)]
    packed = host_images.pack(samples, None, "shard-x.tar", "nvjpeg")
    assert packed["host_encoded"].tolist() == [True, False, False, False, True, True]
    assert host_images.fallback_counts(packed["host_fallbacks"]) == {"progressive": 1, "grayscale": 1, "cmyk": 1}
    assert host_images.image_sizes(packed).tolist() == [[30 + k, 40 + 2 * k] for k in range(6)]
    images, rejected = host_images.upload(packed, np.arange(6), torch.device("cpu"), "shard-x.tar")
    cpu = host_images.pack(samples, None, "shard-x.tar", "cpu")  # every image decoded on the host
    expected, _ = host_images.upload(cpu, np.arange(6), torch.device("cpu"), "shard-x.tar")
    assert rejected == 0 and all(torch.equal(a, b) for a, b in zip(images, expected, strict=True))

    def picky(chunks, device):  # a device decoder that rejects one image: the batch call fails, then that one
        if any(len(c) == len(blobs[4]) for c in chunks):
            raise RuntimeError("nvjpeg: unsupported")
        return host_images.nvjpeg_decode(chunks, device)

    images, rejected = host_images.upload(packed, np.arange(6), torch.device("cpu"), "shard-x.tar", decode=picky)
    assert rejected == 1 and torch.equal(images[4], expected[4])
    assert "1 of 6 images" in host_images.describe_fallbacks(np.array([0, 0, 0, 0, 0, 1]), 6)
    # A JPEG no decoder reads fails with its file and sample named, as on the CPU path.
    broken = blobs[0][: blobs[0].index(b"\xff\xda")]  # a readable frame header, then no scan
    packed = host_images.pack([Sample(7, 0, broken, "jpg")], None, "shard-y.tar", "nvjpeg")
    assert packed["host_encoded"].tolist() == [True]

    def failing(chunks, device):
        raise RuntimeError("nvjpeg: bad data")

    with pytest.raises(ShardError, match="shard-y.tar: sample 000000007: undecodable jpg"):
        host_images.upload(packed, np.array([7]), torch.device("cpu"), "shard-y.tar", decode=failing)


def test_out_of_device_memory_names_the_batch(monkeypatch):
    import pipeline.data.device_render as device_render

    def exhausted(images):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(device_render, "pad_images", exhausted)
    image = torch.zeros((3, 40, 40), dtype=torch.uint8)
    params = torch.from_numpy(view_params(IMAGENET, np.arange(1), 0, (40, 40)))[:, None]
    with pytest.raises(DeviceRenderError, match="1 images x 1 views.*lower chunk_views"):
        render_on_device(DEVICE, [image], params)


def test_renderer_and_decoder_are_part_of_the_spec_and_identity(setup):
    with pytest.raises(ValueError, match="renderer must be one of cpu, device"):
        AugmentSpec.preset("imagenet", renderer="gpu")
    with pytest.raises(ValueError, match="set renderer=device"):
        AugmentSpec.preset("imagenet", decoder="nvjpeg")
    cfg = CacheBuildConfig(data=setup["data"], teacher="resnet8", weights="w", root="r", spec="imagenet")
    assert (cfg.augment_spec().renderer, cfg.augment_spec().decoder) == ("cpu", "cpu")
    on_gpu = CacheBuildConfig(
        data=setup["data"], teacher="resnet8", weights="w", root="r", spec="imagenet", gpus_per_actor=1
    )
    assert (on_gpu.augment_spec().renderer, on_gpu.augment_spec().decoder) == ("device", "nvjpeg")
    index = read_index(setup["data"], "train")
    assert expected_identity(cfg, index, "sha").cache_id != expected_identity(on_gpu, index, "sha").cache_id
    with pytest.raises(
        CacheBuildError, match="renderer device with decoder cpu runs on the teacher's GPU.*--renderer cpu"
    ):
        CacheBuildConfig(
            data=setup["data"], teacher="resnet8", weights="w", root="r", renderer="device", decoder="cpu"
        ).augment_spec()


@pytest.fixture(scope="module")
def setup(ray_local, tmp_path_factory):
    """An image folder of JPEGs in several sizes (one progressive, one grayscale),
    sharded, and a cifar-zoo teacher to build caches with."""
    from catkd.models import build_model, checkpoint_payload

    base = tmp_path_factory.mktemp("device")
    rng = np.random.default_rng(3)
    for split, count in (("train", 24), ("test", 6)):
        for k in range(count):
            folder = base / "folder" / split / f"class{k % 3}"
            folder.mkdir(parents=True, exist_ok=True)
            pixels = _photo(rng, int(rng.integers(40, 80)), int(rng.integers(40, 80)))
            extra = {"progressive": True} if k == 1 else {}
            (folder / f"{k:03d}.jpg").write_bytes(_jpeg(pixels, "L" if k == 2 else "RGB", **extra))
    data = str(base / "shards")
    shard_dataset(ShardConfig(f"imagefolder:{base / 'folder'}", data, samples_per_shard=8, progress=False))
    torch.manual_seed(0)
    weights = str(base / "teacher.pth")
    torch.save(checkpoint_payload(build_model("resnet8", 3, bias=True), "resnet8"), weights)
    return {"data": data, "weights": weights, "base": base}


def _small_spec(renderer="cpu", decoder="cpu", mix="none") -> AugmentSpec:
    """The imagenet spec at 32 px, so that a cifar-zoo teacher runs it quickly."""
    spec = AugmentSpec.preset("imagenet", seed=1, renderer=renderer, decoder=decoder, mix=mix)
    return AugmentSpec(**(spec.__dict__ | {"size": 32}))


def test_device_path_of_the_loader_gives_the_cpu_renderer_views(setup):
    batches = {}
    for renderer, decoder in (("cpu", "cpu"), ("device", "nvjpeg")):
        stream = ShardStream(
            ReaderConfig(
                data=setup["data"], batch_size=6, spec=_small_spec(renderer, decoder), num_views=2, normalize=False
            ),
            0,
            1,
        )
        stream.set_epoch(1)
        batches[renderer] = list(make_loader(stream, 1))
    fallbacks = np.zeros(len(host_images.FALLBACK_REASONS), np.int64)
    for cpu, dev in zip(batches["cpu"], batches["device"], strict=True):
        assert "image" not in dev and dev["host_data"].dtype == torch.uint8
        assert torch.equal(cpu["ids"], dev["ids"]) and torch.equal(cpu["params"], dev["params"])
        views, batch_fallbacks = batch_views(_small_spec("device", "nvjpeg"), dev, torch.device("cpu"))
        fallbacks += batch_fallbacks
        diff = (views.int() - cpu["image"].int()).abs()
        assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3
    assert host_images.fallback_counts(fallbacks) == {"progressive": 1, "grayscale": 1}


def test_training_inputs_from_packed_batches_equal_the_cpu_path(setup):
    """The train loop's input step (pipeline.train.loop._inputs) on a device-path batch:
    rendered, normalised and counted on the device (here the CPU) as the loader's
    cpu-rendered batch is normalised."""
    from pipeline.train.loop import _inputs

    cfg = TrainConfig(mode="ce", data=setup["data"], spec="imagenet", channels_last=True)
    for renderer, decoder in (("cpu", "cpu"), ("device", "nvjpeg")):
        stream = ShardStream(
            ReaderConfig(
                data=setup["data"], batch_size=24, spec=_small_spec(renderer, decoder), num_views=1, normalize=False
            ),
            0,
            1,
        )
        batch = next(iter(make_loader(stream, 0)))
        fallbacks = np.zeros(len(host_images.FALLBACK_REASONS), np.int64)
        x = _inputs(cfg, batch, stream.cfg.spec, torch.device("cpu"), fallbacks)
        assert x.dtype == torch.float32 and x.is_contiguous(memory_format=torch.channels_last)
        if renderer == "cpu":
            reference = x
        else:
            assert (x - reference).abs().max() <= 1 / (255 * min(IMAGENET.std)) + 1e-6
            assert host_images.fallback_counts(fallbacks) == {"progressive": 1, "grayscale": 1}


@pytest.mark.parametrize("mix", ["none", "cutmix:1.0"])
def test_build_targets_from_device_rendered_chunks_equal_the_cpu_ones(setup, mix):
    """The cache build's feed and teacher side on both renderers give the same targets.
    A mixing spec on the device renderer feeds whole shards, so every partner's image is
    on the device with the view it mixes into; ``cache verify`` replays such a view
    (partner included) as the build rendered it."""
    from catkd.models import load_checkpoint
    from pipeline.cache.verify import _render_as_built

    index = read_index(setup["data"], "train")
    model = load_checkpoint(setup["weights"], "resnet8", 3)
    targets, fallbacks = {}, np.zeros(len(host_images.FALLBACK_REASONS), np.int64)
    runners = {}
    for renderer, decoder in (("cpu", "cpu"), ("device", "nvjpeg")):
        spec = _small_spec(renderer, decoder, mix)
        runners[renderer] = TeacherRunner(model, spec, TeacherSettings(batch_size=16), torch.device("cpu"))
        for j, info in enumerate(index.shards):
            shard = ShardTargets(j, info.first_id, info.count, 2, info.name, "float32")
            chunks = list(render_chunks(setup["data"], index, j, spec, 2, chunk_samples=3))
            assert len(chunks) == (1 if renderer == "device" and mix != "none" else -(-info.count // 3))
            for chunk in chunks:
                assert (chunk.views is None) == (renderer == "device")
                shard.add(runners[renderer], chunk.ids, chunk.params, chunk.views, chunk.images)
            targets[renderer, j] = shard.arrays()
            fallbacks += shard.fallbacks
    assert host_images.fallback_counts(fallbacks) == {"progressive": 1, "grayscale": 1}
    for j in range(len(index.shards)):
        cpu, device = targets["cpu", j], targets["device", j]
        assert np.array_equal(cpu["params"], device["params"])
        assert np.abs(device["cam"] - cpu["cam"]).max() <= 2e-2 * np.abs(cpu["cam"]).max()
    samples = load_shard(setup["data"], index, index.shards[0])
    stored = targets["device", 0]["params"][:, 1]  # view 1 of shard 0
    for k in range(len(samples)):
        replayed = {r: _render_as_built(runners[r], samples, k, index, 0, 1, stored, "t") for r in runners}
        assert (replayed["device"].int() - replayed["cpu"].int()).abs().max() <= 1


def test_student_that_renders_otherwise_than_its_cache_is_refused(setup):
    url = build_cache(
        CacheBuildConfig(
            data=setup["data"],
            teacher="resnet8",
            weights=setup["weights"],
            root=str(setup["base"] / "caches"),
            num_views=2,
            spec="imagenet",
            batch_size=16,
            progress=False,
        )
    )
    run = dict(
        mode="catkd",
        data=setup["data"],
        cache=url,
        spec="imagenet",
        num_views=2,
        test_split="test",
        storage_path=str(setup["base"] / "runs"),
    )
    assert resolve(TrainConfig(**run)).augment_spec().renderer == "cpu"  # auto: as the cache was rendered
    with pytest.raises(
        CacheMismatchError, match="spec.renderer: the run needs 'device', the cache holds 'cpu'.*set renderer=cpu"
    ):
        resolve(TrainConfig(**run, renderer="device", decoder="cpu", use_gpu=True))
    # A cache whose views a GPU made: on a machine without one it is refused, naming both.
    gpu_made = setup["base"] / "gpu-made"
    shutil.copytree(url, gpu_made)
    manifest = json.loads((gpu_made / "manifest.json").read_text())
    manifest["identity"]["spec"] |= {"renderer": "device", "decoder": "nvjpeg"}
    (gpu_made / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(
        CacheMismatchError, match="made by the device renderer and the nvjpeg decoder, on a GPU.*use_gpu=false"
    ):
        resolve(TrainConfig(**run | {"cache": str(gpu_made)}))
    with pytest.raises(CacheMismatchError, match="spec.decoder: the run needs 'cpu', the cache holds 'nvjpeg'"):
        resolve(TrainConfig(**run | {"cache": str(gpu_made)}, renderer="device", decoder="cpu", use_gpu=True))
    with pytest.raises(ValueError, match="use_gpu=false"):
        resolve(TrainConfig(**run | {"mode": "ce", "cache": None}, renderer="device"))
