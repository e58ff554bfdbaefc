"""``catkd shard``: four source kinds, index contents, determinism, atomic rerun."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import webdataset as wds

from pipeline.data.shard_writer import PROGRESS_DIR, ShardConfig, shard_dataset
from pipeline.data.shard_format import ShardError, decode_image, load_shard, read_index
from tests.conftest import write_cifar

SHAPES = {"train_samples": 50, "test_samples": 20, "image_size": 32, "seed": 5}


def _all_samples(out, split):
    index = read_index(str(out), split)
    samples = [s for info in index.shards for s in load_shard(str(out), index, info)]
    return index, samples


def test_synthetic_shapes_index_and_boxes(ray_local, tmp_path):
    out = tmp_path / "shapes"
    shard_dataset(ShardConfig("synthetic:shapes", str(out), samples_per_shard=16, synthetic=SHAPES, progress=False))
    index, samples = _all_samples(out, "train")
    assert index.num_samples == 50 and [s.count for s in index.shards] == [16, 16, 16, 2]
    assert [s.first_id for s in index.shards] == [0, 16, 32, 48]
    assert index.image_format == "rgb" and index.image_shape == [32, 32] and index.has_boxes
    assert index.num_classes == 10 and len(index.fingerprint) == 64
    assert [s.id for s in samples] == list(range(50))
    for s in samples:
        x0, y0, x1, y1 = s.box
        assert 0 <= x0 < x1 <= 32 and 0 <= y0 < y1 <= 32
    meta = json.loads((out / "train.index.json").read_text())
    assert meta["num_samples"] == 50 and meta["shards"][0]["name"] == "train-000000.tar"


def test_shards_are_deterministic_and_webdataset_readable(ray_local, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for out in (a, b):
        shard_dataset(ShardConfig("synthetic:shapes", str(out), splits=["test"], samples_per_shard=8, synthetic=SHAPES, progress=False))
    assert read_index(str(a), "test").fingerprint == read_index(str(b), "test").fingerprint
    keys = [s["__key__"] for s in wds.WebDataset(str(a / "test-000000.tar"), shardshuffle=False)]
    assert keys == [f"{i:09d}" for i in range(8)]


@pytest.mark.parametrize("as_tar", [False, True])
def test_imagefolder_directory_and_archive(ray_local, tmp_path, image_folder, image_folder_tar, as_tar):
    source = image_folder_tar if as_tar else image_folder
    out = tmp_path / "out"
    shard_dataset(ShardConfig(f"imagefolder:{source}", str(out), samples_per_shard=4, progress=False))
    index, samples = _all_samples(out, "train")
    assert index.classes == ["cat", "dog", "emu"] and index.num_samples == 15
    assert [s.label for s in samples] == [0] * 5 + [1] * 5 + [2] * 5  # sorted source order
    assert {s.fmt for s in samples} == {"jpg", "png"} and index.image_format == "mixed"
    assert index.image_shape is None  # heights differ by class
    for s in samples:
        pixels = decode_image(s, index.image_shape, "test")
        assert pixels.ndim == 3 and pixels.shape[2] == 3  # grayscale and RGBA became RGB
    assert read_index(str(out), "test").num_samples == 6


def test_imagefolder_raw_encoding_needs_one_size(ray_local, tmp_path, image_folder):
    with pytest.raises(ShardError, match="raw pixels need images of one size"):
        shard_dataset(ShardConfig(f"imagefolder:{image_folder}", str(tmp_path / "raw"), encoding="raw", progress=False))


@pytest.mark.parametrize("num_classes", [10, 100])
def test_cifar_pickles(ray_local, tmp_path, num_classes):
    root = write_cifar(tmp_path / "cifar", num_classes)
    out = tmp_path / "out"
    shard_dataset(ShardConfig(f"cifar{num_classes}:{root}", str(out), samples_per_shard=7, progress=False))
    index, samples = _all_samples(out, "train")
    assert index.num_samples == 30 and index.num_classes == num_classes and index.image_shape == [32, 32]
    pixels = decode_image(samples[0], index.image_shape, "test")
    assert pixels.shape == (32, 32, 3)
    assert read_index(str(out), "test").num_samples == 10


def test_rerun_rewrites_only_missing_shards(ray_local, tmp_path):
    out = tmp_path / "shapes"
    cfg = ShardConfig("synthetic:shapes", str(out), splits=["train"], samples_per_shard=16, synthetic=SHAPES, progress=False)
    first = shard_dataset(cfg)["train"]
    # Simulate a crash: the index and one shard never made it, a temporary file was left.
    os.remove(out / "train.index.json")
    os.remove(out / "train-000002.tar")
    (out / ".tmp-dead-train-000003.tar").write_bytes(b"half")
    kept = {n: os.stat(out / n).st_mtime_ns for n in ("train-000000.tar", "train-000001.tar", "train-000003.tar")}
    again = shard_dataset(cfg)["train"]
    assert again.fingerprint == first.fingerprint
    assert {n: os.stat(out / n).st_mtime_ns for n in kept} == kept
    assert (out / PROGRESS_DIR / "train-000002.tar.json").exists()


def test_rerun_with_other_settings_is_refused(ray_local, tmp_path):
    out = tmp_path / "shapes"
    shard_dataset(ShardConfig("synthetic:shapes", str(out), splits=["test"], samples_per_shard=16, synthetic=SHAPES, progress=False))
    before = (out / "test.index.json").read_bytes()
    with pytest.raises(ShardError, match="samples_per_shard: 16 there, 8 now"):
        shard_dataset(ShardConfig("synthetic:shapes", str(out), splits=["test"], samples_per_shard=8, synthetic=SHAPES, progress=False))
    assert (out / "test.index.json").read_bytes() == before


def test_shapes_are_reproducible_per_id():
    from pipeline.data.synthetic import make_arrays, make_sample

    images, labels, boxes = make_arrays(7, 10, 5)
    single = make_sample(7, 12)
    assert np.array_equal(images[2], single.image) and labels[2] == single.label and tuple(boxes[2]) == single.box


def test_subset_is_evenly_spaced_and_keeps_every_class(ray_local, tmp_path, image_folder):
    out = tmp_path / "subset"
    shard_dataset(ShardConfig(f"imagefolder:{image_folder}", str(out), splits=["train"], subset=6, progress=False))
    index, samples = _all_samples(out, "train")
    assert index.num_samples == 6 and index.settings["subset"] == 6
    assert [s.label for s in samples] == [0, 0, 1, 1, 2, 2]
