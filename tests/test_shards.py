"""``catkd shard``: four source kinds, index contents, determinism, atomic rerun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from pipeline.data.shard_format import ShardError, decode_image, load_shard, read_index
from pipeline.data.shard_writer import PROGRESS_DIR, ShardConfig, id_order, shard_dataset, verify_shards
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
        shard_dataset(
            ShardConfig(
                "synthetic:shapes", str(out), splits=["test"], samples_per_shard=8, synthetic=SHAPES, progress=False
            )
        )
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
    sorted_labels = [0] * 5 + [1] * 5 + [2] * 5
    # Id i is sorted-source position id_order[i]: a seeded permutation that mixes classes.
    assert [s.label for s in samples] == [sorted_labels[p] for p in id_order(15, 0)]
    assert index.order_seed == 0 and index.version == 2
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
    cfg = ShardConfig(
        "synthetic:shapes", str(out), splits=["train"], samples_per_shard=16, synthetic=SHAPES, progress=False
    )
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
    shard_dataset(
        ShardConfig(
            "synthetic:shapes", str(out), splits=["test"], samples_per_shard=16, synthetic=SHAPES, progress=False
        )
    )
    before = (out / "test.index.json").read_bytes()
    with pytest.raises(ShardError, match="samples_per_shard: 16 there, 8 now"):
        shard_dataset(
            ShardConfig(
                "synthetic:shapes", str(out), splits=["test"], samples_per_shard=8, synthetic=SHAPES, progress=False
            )
        )
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
    assert sorted(s.label for s in samples) == [0, 0, 1, 1, 2, 2]


# ---------------------------------------------------------------- class-mixed shards, scale


def _folder(root, classes: int, per_class: int, size=(12, 16), extra: dict | None = None):
    """A <split>/<class>/<image> folder of small JPEGs; ``extra`` adds files by relative path."""
    rng = np.random.default_rng(classes)
    for c in range(classes):
        for k in range(per_class):
            path = root / "train" / f"class{c:02d}" / f"{k:04d}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(path, quality=90)
    for rel, payload in (extra or {}).items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(payload)
    return root


def _classes_per_shard(out):
    index = read_index(str(out), "train")
    return [len({s.label for s in load_shard(str(out), index, info)}) for info in index.shards]


def test_every_shard_mixes_the_classes(ray_local, tmp_path):
    folder = _folder(tmp_path / "folder", classes=10, per_class=50)
    out = tmp_path / "out"
    shard_dataset(ShardConfig(f"imagefolder:{folder}", str(out), samples_per_shard=100, progress=False))
    assert min(_classes_per_shard(out)) >= 8  # sorted order gave 2 classes per shard


def test_subset_stays_class_balanced_and_mixed(ray_local, tmp_path):
    folder = _folder(tmp_path / "folder", classes=10, per_class=50)
    out = tmp_path / "out"
    shard_dataset(ShardConfig(f"imagefolder:{folder}", str(out), samples_per_shard=50, subset=200, progress=False))
    index, samples = _all_samples(out, "train")
    assert np.bincount([s.label for s in samples]).tolist() == [20] * 10
    assert min(_classes_per_shard(out)) >= 8


def test_other_order_seed_gives_other_ids(ray_local, tmp_path):
    folder = _folder(tmp_path / "folder", classes=3, per_class=4)
    labels = {}
    for seed in (0, 1):
        out = tmp_path / f"seed{seed}"
        shard_dataset(ShardConfig(f"imagefolder:{folder}", str(out), order_seed=seed, progress=False))
        index, samples = _all_samples(out, "train")
        assert index.order_seed == seed
        labels[seed] = [s.label for s in samples]
    assert labels[0] != labels[1] and sorted(labels[0]) == sorted(labels[1])


def test_plain_tar_archive_is_read_by_range_and_non_images_are_counted(ray_local, tmp_path, capfd):
    folder = _folder(
        tmp_path / "folder",
        classes=3,
        per_class=4,
        extra={"train/README.txt": b"notes", "train/class00/notes.txt": b"x"},
    )
    archive = tmp_path / "folder.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(folder, arcname=".")
    shard_dataset(ShardConfig(f"imagefolder:{archive}", str(tmp_path / "from_tar"), progress=False))
    shard_dataset(ShardConfig(f"imagefolder:{folder}", str(tmp_path / "from_dir"), progress=False))
    assert "skipped 2 files that are not images" in capfd.readouterr().err
    from_tar, from_dir = (
        read_index(str(tmp_path / "from_tar"), "train"),
        read_index(str(tmp_path / "from_dir"), "train"),
    )
    assert from_tar.fingerprint == from_dir.fingerprint and from_tar.num_samples == 12


def test_compressed_archive_is_staged_then_removed(ray_local, tmp_path, image_folder_tar):
    out = tmp_path / "out"
    shard_dataset(ShardConfig(f"imagefolder:{image_folder_tar}", str(out), progress=False))
    assert not (out / "_staging").exists()


def test_old_index_version_is_refused_with_reshard_advice(ray_local, tmp_path):
    out = tmp_path / "shapes"
    shard_dataset(ShardConfig("synthetic:shapes", str(out), splits=["test"], synthetic=SHAPES, progress=False))
    meta = json.loads((out / "test.index.json").read_text())
    meta["version"] = 1
    (out / "test.index.json").write_text(json.dumps(meta))
    with pytest.raises(ShardError, match="index version 1.*reshard the source with `catkd shard`"):
        read_index(str(out), "test")


def test_rerun_trusts_recorded_size_and_verify_rehashes(ray_local, tmp_path):
    out = tmp_path / "shapes"
    cfg = ShardConfig(
        "synthetic:shapes", str(out), splits=["train"], samples_per_shard=16, synthetic=SHAPES, progress=False
    )
    shard_dataset(cfg)
    os.remove(out / "train.index.json")
    # Same size, other bytes: a rerun does not read shards again, so it keeps this one...
    damaged = out / "train-000001.tar"
    data = bytearray(damaged.read_bytes())
    data[3000] ^= 0xFF
    damaged.write_bytes(bytes(data))
    # ...but a shard whose size changed is written again.
    (out / "train-000002.tar").write_bytes(b"short")
    shard_dataset(cfg)
    assert damaged.read_bytes() == bytes(data)
    assert os.path.getsize(out / "train-000002.tar") > 5
    problems = verify_shards(str(out))
    assert len(problems) == 1 and "train-000001.tar: size or sha256 does not match the index" in problems[0]


def test_verify_cli_exit_codes(ray_local, tmp_path):
    out = tmp_path / "shapes"
    shard_dataset(
        ShardConfig(
            "synthetic:shapes", str(out), splits=["test"], samples_per_shard=8, synthetic=SHAPES, progress=False
        )
    )
    assert verify_shards(str(out)) == []
    (out / "test-000001.tar").write_bytes(b"gone")
    bad = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "shard", "--verify", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 1 and "test-000001.tar: size or sha256" in bad.stderr


def test_changed_listing_is_refused_complete_or_partial(ray_local, tmp_path):
    folder = _folder(tmp_path / "folder", classes=3, per_class=4)
    out = tmp_path / "out"
    cfg = ShardConfig(f"imagefolder:{folder}", str(out), splits=["train"], samples_per_shard=4, progress=False)
    shard_dataset(cfg)
    before = (out / "train.index.json").read_bytes()
    Image.fromarray(np.zeros((12, 16, 3), np.uint8)).save(folder / "train" / "class01" / "9999.jpg")
    with pytest.raises(ShardError, match=r"from the source listing changed since \((listing|num_samples): "):
        shard_dataset(cfg)
    assert (out / "train.index.json").read_bytes() == before
    # A partial run (no index yet) is refused the same way, and its shards stay.
    os.remove(out / "train.index.json")
    kept = (out / "train-000000.tar").read_bytes()
    with pytest.raises(ShardError, match="source listing changed since"):
        shard_dataset(cfg)
    assert (out / "train-000000.tar").read_bytes() == kept


def test_max_short_side_resizes_records_and_replays(ray_local, tmp_path):
    from pipeline.data.views import AugmentSpec, render_views

    folder = _folder(tmp_path / "folder", classes=2, per_class=3, size=(48, 64))
    outs = [tmp_path / "a", tmp_path / "b"]
    for out in outs:
        shard_dataset(ShardConfig(f"imagefolder:{folder}", str(out), max_short_side=24, progress=False))
    index, samples = _all_samples(outs[0], "train")
    assert index.settings["max_short_side"] == 24 and index.image_shape == [24, 32]
    assert read_index(str(outs[1]), "train").fingerprint == index.fingerprint  # resizing is deterministic
    spec = AugmentSpec("imagenet", 0, size=16)
    images = [decode_image(s, index.image_shape, "test") for s in samples]
    params, first = render_views(spec, images, np.array([s.id for s in samples]), view=3)
    assert (params[:, 0] + params[:, 2] <= 32).all() and (params[:, 1] + params[:, 3] <= 24).all()
    _, again = render_views(
        spec, images, np.array([s.id for s in samples]), view=3, stored_params=params, source="test"
    )
    assert torch.equal(first, again)
