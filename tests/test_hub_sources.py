"""ImageNet in the forms it ships in (issue 40): WebDataset shards as timm's converter
writes them, and Hugging Face's parquet files. Sharded with a local thread pool (no Ray), checked sample by sample:
ids from the seeded permutation of the source order, labels, bytes, class names, and
one line naming the file and key for a bad sample."""

from __future__ import annotations

import json
import os
import tarfile

import pytest

from pipeline.data.shard_format import load_shard, read_index
from pipeline.data.shard_writer import id_order
from pipeline.data.sources import SourceError
from tests.helpers.hub_datasets import shard_in_threads, write_hf_parquet, write_wds


def shard(source: str, out: str, **options) -> dict:
    return shard_in_threads(source, out, samples_per_shard=4, **options)


def check_against_source(out: str, split: str, expected: list) -> None:
    """Sample id i is source sample order[i]: same bytes, same label."""
    index = read_index(out, split)
    order = id_order(len(expected), 0)
    samples = [s for info in index.shards for s in load_shard(out, index, info)]
    assert [s.id for s in samples] == list(range(len(expected)))
    for sample in samples:
        source = expected[order[sample.id]]
        assert (sample.image, sample.label, sample.fmt) == (source.image, source.label, "jpg"), source.origin


def test_webdataset_folder_with_info_file_shards_every_split(tmp_path):
    expected = write_wds(str(tmp_path / "wds"), {"train": 23, "validation": 9})
    indexes = shard(f"webdataset:{tmp_path / 'wds'}", str(tmp_path / "out"))
    assert sorted(indexes) == ["train", "validation"]
    for split in indexes:
        check_against_source(str(tmp_path / "out"), split, expected[split])
        assert indexes[split].classes == [str(c) for c in range(7)]
    # The same split named by a brace pattern, its labels from the json: the same shards.
    pattern = f"webdataset:{tmp_path / 'wds'}/imagenet1k-train-{{0000..0004}}.tar"
    again = shard(pattern, str(tmp_path / "pattern"), label="json:label")
    assert again["train"].fingerprint != ""
    check_against_source(str(tmp_path / "pattern"), "train", expected["train"])


def test_webdataset_without_info_file_groups_shards_by_split_name(tmp_path):
    expected = write_wds(str(tmp_path / "wds"), {"train": 11, "validation": 6}, info=None)
    (tmp_path / "wds" / "README.md").write_text("not a shard")
    indexes = shard(f"webdataset:{tmp_path / 'wds'}", str(tmp_path / "out"), splits=["validation"])
    assert list(indexes) == ["validation"]
    check_against_source(str(tmp_path / "out"), "validation", expected["validation"])


def _rewrite_sample(path: str, key: str, drop: str | None = None, replace: dict | None = None) -> None:
    """Rewrite the tar at ``path`` without member ``key.drop`` / with new member bytes."""
    with tarfile.open(path) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            if drop and name == f"{key}.{drop}":
                continue
            data = (replace or {}).get(name, data)
            info = tarfile.TarInfo(name)
            info.size = len(data)
            import io

            tar.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize(
    ("damage", "options", "message"),
    [
        (("drop", "jpg"), {}, "imagenet1k-train-0001.tar: sample train_00000006: no image (jpg, jpeg, png, webp)"),
        (("drop", "cls"), {}, "imagenet1k-train-0001.tar: sample train_00000006: no .cls member"),
        (None, {"label": "json:class"}, "sample train_00000000: its .json has no field 'class'"),
        (None, {"label": "txt"}, "label: expected cls or json:FIELD"),
        (("corrupt", "jpg"), {}, "imagenet1k-train-0001.tar:train_00000006.jpg"),
    ],
)
def test_bad_webdataset_samples_are_one_line_naming_file_and_key(tmp_path, damage, options, message):
    write_wds(str(tmp_path / "wds"), {"train": 10})
    path = str(tmp_path / "wds" / "imagenet1k-train-0001.tar")
    if damage and damage[0] == "drop":
        _rewrite_sample(path, "train_00000006", drop=damage[1])
    elif damage:
        _rewrite_sample(path, "train_00000006", replace={"train_00000006.jpg": b"\xff\xd8 not a jpeg"})
    with pytest.raises(SourceError) as info:
        shard(f"webdataset:{tmp_path / 'wds'}", str(tmp_path / "out"), **options)
    assert message in str(info.value) and "\n" not in str(info.value), str(info.value)
    assert not os.path.exists(tmp_path / "out" / "train.index.json")


def test_webdataset_info_file_naming_a_missing_shard_is_refused(tmp_path):
    write_wds(str(tmp_path / "wds"), {"train": 10})
    info = json.loads((tmp_path / "wds" / "_info.json").read_text())
    info["splits"]["train"]["filenames"].append("imagenet1k-train-0009.tar")
    (tmp_path / "wds" / "_info.json").write_text(json.dumps(info))
    with pytest.raises(SourceError, match="imagenet1k-train-0009.tar: listed in _info.json but not in"):
        shard(f"webdataset:{tmp_path / 'wds'}", str(tmp_path / "out"))


def test_hf_parquet_folder_shards_every_split_with_its_class_names(tmp_path):
    expected = write_hf_parquet(str(tmp_path / "data"), {"train": 21, "validation": 6})
    indexes = shard(f"parquet:{tmp_path / 'data'}", str(tmp_path / "out"))
    assert sorted(indexes) == ["train", "validation"]
    for split in indexes:
        check_against_source(str(tmp_path / "out"), split, expected[split])
        assert indexes[split].classes == [f"n{c:08d}" for c in range(7)]  # the dataset's metadata
    assert not os.path.exists(tmp_path / "out" / "_staging")  # the staged images are gone


def test_bad_parquet_input_is_one_line_naming_file_and_row(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    write_hf_parquet(str(tmp_path / "data"), {"train": 8}, files_per_split=1)
    with pytest.raises(SourceError, match=r"train-00000-of-00001.parquet: no column 'lbl' \(has image, label\)"):
        shard(f"parquet:{tmp_path / 'data'}", str(tmp_path / "out"), label="lbl")
    path = tmp_path / "data" / "train-00000-of-00001.parquet"
    table = pq.read_table(path).to_pylist()
    table[5]["image"] = {"bytes": None, "path": "x.JPEG"}
    pq.write_table(pa.Table.from_pylist(table), path)
    with pytest.raises(SourceError, match=r"train-00000-of-00001.parquet: row 5: no image bytes in column 'image'"):
        shard(f"parquet:{tmp_path / 'data'}", str(tmp_path / "out2"))
    assert not os.path.exists(tmp_path / "out2" / "train.index.json")
