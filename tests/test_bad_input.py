"""Bad input stops with an error naming the file and the sample, and keeps earlier output."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from pipeline.data.shard_format import ShardError, load_shard, read_index
from pipeline.data.shard_writer import ShardConfig, id_order, shard_dataset
from pipeline.data.sources import SourceError
from tests.conftest import write_cifar

SHAPES = {"train_samples": 40, "test_samples": 8, "image_size": 32, "seed": 1}


@pytest.fixture
def shapes_out(ray_local, tmp_path):
    out = tmp_path / "shapes"
    shard_dataset(
        ShardConfig(
            "synthetic:shapes", str(out), splits=["train"], samples_per_shard=10, synthetic=SHAPES, progress=False
        )
    )
    return out


def _load_all(out):
    index = read_index(str(out), "train")
    return [load_shard(str(out), index, info) for info in index.shards]


def test_truncated_shard_names_file_and_sample(shapes_out):
    path = shapes_out / "train-000001.tar"
    data = path.read_bytes()
    # Members per sample: box, cls, rgb (each a header block, then data blocks).
    path.write_bytes(data[: 512 * 6 + 100])  # cut inside the first sample's pixels
    with pytest.raises(ShardError, match=r"train-000001\.tar: truncated in member 000000010\.rgb"):
        _load_all(shapes_out)


def test_corrupt_shard_bytes_name_file_and_samples(shapes_out):
    path = shapes_out / "train-000002.tar"
    data = bytearray(path.read_bytes())
    data[600] ^= 0xFF  # a pixel of the first sample: the tar stays valid, the hash does not
    path.write_bytes(bytes(data))
    with pytest.raises(
        ShardError, match=r"train-000002\.tar: size or sha256 does not match .*samples 000000020\.\.000000029"
    ):
        _load_all(shapes_out)


def test_corrupt_tar_header_names_file(shapes_out):
    path = shapes_out / "train-000003.tar"
    data = bytearray(path.read_bytes())
    data[512 * 11 + 10] ^= 0xFF  # header of the second sample's first member (after 2 + 2 + 7 blocks)
    path.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=r"train-000003\.tar: corrupt tar header after member 000000030\.rgb"):
        _load_all(shapes_out)


def test_index_that_does_not_match_its_shards(shapes_out):
    index_path = shapes_out / "train.index.json"
    meta = json.loads(index_path.read_text())
    meta["shards"][1]["count"] = 9
    meta["shards"][2]["first_id"] = 19
    index_path.write_text(json.dumps(meta))
    with pytest.raises(ShardError, match="train-000001.tar: holds 10 samples, index says ids 10..18"):
        _load_all(shapes_out)


def test_missing_shard_is_named(shapes_out):
    os.remove(shapes_out / "train-000000.tar")
    with pytest.raises(ShardError, match="train-000000.tar: shard listed in train.index.json is missing"):
        _load_all(shapes_out)


def _id_of(position: int, total: int) -> int:
    """The sample id of a sorted-source position (ids follow a seeded permutation)."""
    return int(np.argsort(id_order(total, 0))[position])


def test_undecodable_image_names_file_and_key_and_keeps_complete_shards(ray_local, tmp_path, image_folder):
    bad = image_folder / "train" / "emu" / "003.png"
    bad.write_bytes(b"\x89PNG not really")
    out = tmp_path / "out"
    with pytest.raises(SourceError, match=rf"emu/003\.png: sample {_id_of(13, 15):09d}: undecodable png image"):
        shard_dataset(
            ShardConfig(f"imagefolder:{image_folder}", str(out), splits=["train"], samples_per_shard=5, progress=False)
        )
    assert not (out / "train.index.json").exists()
    # The shards without the bad sample are complete, intact and verified.
    bad_shard = _id_of(13, 15) // 5
    for name in (f"train-{j:06d}.tar" for j in range(3) if j != bad_shard):
        record = json.loads((out / "_progress" / f"{name}.json").read_text())
        assert os.path.getsize(out / name) == record["info"]["bytes"]


def test_label_out_of_range(ray_local, tmp_path):
    root = write_cifar(tmp_path / "cifar", 10, bad_label=12)
    with pytest.raises(SourceError, match=rf"data_batch_2\[3\]: sample {_id_of(9, 30):09d}: label 12 outside 0\.\.9"):
        shard_dataset(ShardConfig(f"cifar10:{root}", str(tmp_path / "out"), splits=["train"], progress=False))


def test_empty_class_folder(ray_local, tmp_path, image_folder):
    (image_folder / "train" / "fox").mkdir()
    with pytest.raises(SourceError, match=r"train/fox: empty class folder"):
        shard_dataset(ShardConfig(f"imagefolder:{image_folder}", str(tmp_path / "out"), progress=False))


def test_cli_missing_source_exits_nonzero(tmp_path):
    missing = tmp_path / "nowhere"
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "shard", f"imagefolder:{missing}", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert f"{missing}: source path does not exist" in result.stderr
    assert not (tmp_path / "out").exists()
