"""Costs that must not grow one round trip per shard (issue 39), checked structurally on
a loopback S3 server that counts every request (tests/helpers/slow_s3.py): request
counts and concurrency, never timings."""

from __future__ import annotations

import io
import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from pipeline.cache.identity import parse_storage
from tests.helpers.slow_s3 import SlowS3

SHARDS = 200


@pytest.fixture(scope="module")
def slow_s3():
    # Requests wait only while a test measures (slow_s3.delay_s), so that requests in
    # flight overlap visibly; setting up is served at once.
    with SlowS3(delay_s=0.0) as server:
        fs = server.filesystem()
        fs.mkdir("scale")
        yield server


@pytest.fixture
def s3_env(slow_s3, monkeypatch):
    """catkd's own filesystem() in this process talks to the slow server."""
    import s3fs

    for name, value in slow_s3.env().items():
        monkeypatch.setenv(name, value)
    s3fs.S3FileSystem.clear_instance_cache()
    yield slow_s3
    slow_s3.delay_s = 0.0
    s3fs.S3FileSystem.clear_instance_cache()


def test_cache_records_are_listed_once_and_read_concurrently(s3_env):
    from pipeline.cache.commit import DONE_DIR, done_path, done_records
    from pipeline.storage import filesystem

    fs, root = filesystem("s3://scale/cache-records")
    present = list(range(0, SHARDS, 2))
    s3_env.filesystem().pipe(
        {done_path(root, j): json.dumps({"shard": j, "path": f"data/x/{j}"}).encode() for j in present}
    )
    s3_env.reset()
    s3_env.delay_s = 0.005
    records = done_records(fs, root, SHARDS)
    counts = s3_env.counts()
    assert sorted(records) == present and records[4]["shard"] == 4
    assert counts.get("LIST", 0) <= 3, counts  # done/ (a page per 1,000 keys) and done_batches/
    assert counts.get("GET", 0) == len(present), counts  # no read of an absent record
    assert counts.get("HEAD", 0) == 0, counts
    assert s3_env.peak_in_flight > 4, "the records were read one after another"
    assert fs.ls(f"{root}/{DONE_DIR}")  # and nothing was removed


def test_cache_records_come_from_batches_and_loose_records_fill_the_rest(s3_env):
    """A resume reads the driver's batches (one request per 256 shards) and only the
    records no batch holds; a batched record whose own record is gone does not count,
    and retiring shards removes the batches, which would name the retired folders."""
    from pipeline.cache.commit import DONE_BATCH_DIR, done_path, done_records, retire_shards
    from pipeline.record_batches import RecordBatcher
    from pipeline.storage import filesystem, list_folder

    fs, root = filesystem("s3://scale/cache-batched")
    record = lambda j: {"shard": j, "path": f"data/x{j}/shard-{j:06d}.zarr"}  # noqa: E731
    s3_env.filesystem().pipe({done_path(root, j): json.dumps(record(j)).encode() for j in range(SHARDS)})
    batcher = RecordBatcher(fs, f"{root}/{DONE_BATCH_DIR}", every=64)
    for j in range(SHARDS - 10):  # the last 10 committed after the last batch was written
        batcher.add(record(j) | {"batched": True})
    batcher.flush()  # batches of 64, 64 and 62
    fs.rm(done_path(root, 7))  # a batched shard without its own record
    s3_env.reset()
    s3_env.delay_s = 0.005
    records = done_records(fs, root, SHARDS)
    counts = s3_env.counts()
    assert sorted(records) == [j for j in range(SHARDS) if j != 7]
    assert all(records[j].get("batched") for j in range(SHARDS - 10) if j != 7)
    assert not any(records[j].get("batched") for j in range(SHARDS - 10, SHARDS))
    assert counts.get("GET", 0) == 3 + 10, counts  # the three full batches, then the loose records
    assert counts.get("LIST", 0) <= 3, counts
    s3_env.delay_s = 0.0
    retire_shards(fs, root, [3])
    assert not list_folder(fs, f"{root}/{DONE_BATCH_DIR}")
    assert 3 not in done_records(fs, root, SHARDS)


def test_shard_job_resume_plans_from_listings(s3_env, tmp_path):
    """A shard job over 200 shards whose index was lost resumes from listings and the
    driver's batches of records: no request per shard, nothing rewritten."""
    from pipeline.data.shard_format import PROGRESS_DIR, index_name
    from pipeline.data.shard_writer import ShardConfig, shard_dataset
    from pipeline.storage import filesystem

    out = "s3://scale/shards"
    cfg = ShardConfig(
        "synthetic:shapes",
        out,
        samples_per_shard=1,
        splits=["train"],
        synthetic={"image_size": 16, "train_samples": SHARDS, "test_samples": 1},
        progress=False,
    )
    with ThreadPoolExecutor(8) as pool:
        first = shard_dataset(cfg, pool)["train"]
        fs, root = filesystem(out)
        fs.rm(f"{root}/{index_name('train')}")
        s3_env.reset()
        s3_env.delay_s = 0.005
        again = shard_dataset(cfg, pool)["train"]
    counts = s3_env.counts()
    assert again.shards == first.shards
    assert counts.get("PUT", 0) <= 3, counts  # the index (and its temporary name), no shard written again
    assert counts.get("GET", 0) <= 5, counts  # the records come from the driver's batches (256 a batch)
    assert counts.get("LIST", 0) <= 10, counts
    assert counts.get("HEAD", 0) <= 10, counts  # no stat per shard

    # A kill before a batch was written leaves loose records only: read concurrently.
    fs.rm(f"{root}/{index_name('train')}")
    fs.rm(fs.ls(f"{root}/{PROGRESS_DIR}/batches"))
    s3_env.reset()
    with ThreadPoolExecutor(8) as pool:
        assert shard_dataset(cfg, pool)["train"].shards == first.shards
    counts = s3_env.counts()
    assert counts.get("PUT", 0) <= 4, counts  # the index and a new batch
    assert counts.get("GET", 0) <= SHARDS + 5, counts  # each record once
    assert s3_env.peak_in_flight > 4, "the records were read one after another"


# ---------------------------------------------------------------- teacher memory


def _teacher_outputs(storage: str, chunk_samples: int, binarize: bool = False):
    """A shard's stored arrays from a resnet8 teacher with 100 classes (random weights,
    with a bias as converted teachers have): the build's way (each chunk cut to its
    storage form as it leaves the teacher) and the former way (every class's float32
    maps of the whole shard, then encoded)."""
    from catkd.models import build_model
    from pipeline.cache.layout import encode_targets
    from pipeline.cache.teacher import ShardTargets, TeacherRunner, TeacherSettings
    from pipeline.data.views import AugmentSpec

    torch.manual_seed(0)
    model = build_model("resnet8", 100, bias=True)
    with torch.no_grad():
        model.bias.normal_()
    spec = AugmentSpec.preset("cifar", seed=0)
    n, views_per = 6, 2
    views = torch.randint(0, 256, (n, views_per, 3, 32, 32), dtype=torch.uint8)
    ids, params = np.arange(10, 10 + n), np.zeros((n, views_per, 5), np.int32)
    settings = dict(resolution=2, binarize=binarize, batch_size=5)
    dense = TeacherRunner(model, spec, TeacherSettings(**settings), torch.device("cpu"))
    out = dense.targets(views.flatten(0, 1))
    former = encode_targets(
        storage, out.cam.reshape(n, views_per, *out.cam.shape[1:]), out.logits.reshape(n, views_per, -1), None
    )
    kind, k = parse_storage(storage)
    runner = TeacherRunner(
        model, spec, TeacherSettings(**settings, keep_classes=k if kind == "topk" else None), torch.device("cpu")
    )
    shard = ShardTargets(0, 10, n, views_per, "shard-0", storage)
    for start in range(0, n, chunk_samples):
        part = slice(start, start + chunk_samples)
        shard.add(runner, ids[part], params[part], views[part])
    return shard.arrays(), former


@pytest.mark.parametrize("storage", ["float32", "float16", "int8"])
def test_dense_targets_cut_per_chunk_equal_the_whole_shard_bitwise(storage):
    chunked, former = _teacher_outputs(storage, chunk_samples=2)
    assert set(chunked) == set(former) | {"ids", "params"}
    for name, array in former.items():
        assert chunked[name].dtype == array.dtype and np.array_equal(chunked[name], array), name


@pytest.mark.parametrize("binarize", [False, True])
def test_topk_targets_of_the_kept_classes_only_equal_the_full_maps_cut(binarize):
    """A top-k build computes the maps of its K classes only (logits from the pooled
    features): the same kept classes in the same order, maps and logits within float32
    rounding of those cut from every class's maps (stored in float16)."""
    chunked, former = _teacher_outputs("topk:7", chunk_samples=4, binarize=binarize)
    assert np.array_equal(chunked["classes"], former["classes"])
    assert chunked["classes"].shape == (6, 2, 7)
    for name in ("cam", "logits"):
        new, old = chunked[name].astype(np.float32), former[name].astype(np.float32)
        assert np.allclose(new, old, rtol=2e-3, atol=2e-3 * np.abs(old).max()), name


# ---------------------------------------------------------------- the manifest in every process


def _records(count: int, seed: int = 0) -> tuple[list[dict], dict]:
    """Completion records as commit_shard writes them (the last shard shorter)."""
    rng = np.random.default_rng(seed)
    arrays = {"cam": ([1000, 8, 100, 4, 4], "float16"), "logits": ([1000, 8, 101], "float16"), "ids": ([1000], "int64")}
    records = []
    for j in range(count):
        n = 1000 if j < count - 1 else 417
        records.append(
            {
                "shard": j,
                "first_id": 1000 * j,
                "count": n,
                "path": f"data/{rng.bytes(16).hex()}/shard-{j:06d}.zarr",
                "checksums": {name: rng.bytes(32).hex() for name in arrays},
                "arrays": {name: {"shape": [n, *shape[1:]], "dtype": dtype} for name, (shape, dtype) in arrays.items()},
            }
        )
    return records, records[0]["arrays"]


def test_shard_records_held_as_columns_give_the_manifest_records_back():
    from pipeline.cache.reader import ShardRecords

    records, arrays = _records(300)
    records[7] = records[7] | {"note": "a field this catkd does not know"}  # kept as it is
    shuffled = [records[j] for j in np.random.default_rng(1).permutation(len(records))]
    held = ShardRecords(shuffled, arrays)
    assert len(held) == 300 and sorted(held) == list(range(300))
    assert all(held[j] == records[j] for j in range(300))
    assert 299 in held and 300 not in held and -1 not in held
    with pytest.raises(KeyError):
        held[300]


# ---------------------------------------------------------------- sources on object storage


def _image_tree(folder, splits=("train", "val"), classes=40, per_class=3) -> None:
    """A tiny image folder with the strays a real one has (a README, a file beside the
    class folders, a folder inside a class folder)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (1, 2, 3)).save(buf, format="PNG")
    for split in splits:
        for c in range(classes):
            (folder / split / f"n{c:04d}").mkdir(parents=True)
            for k in range(per_class):
                (folder / split / f"n{c:04d}" / f"img{k}.png").write_bytes(buf.getvalue() + bytes([c, k]))
        (folder / split / "LICENSE.txt").write_text("x")
    (folder / "README.md").write_text("x")
    (folder / "train" / "n0000" / "extra").mkdir()
    (folder / "train" / "n0000" / "extra" / "deep.png").write_bytes(buf.getvalue())


def _listing(source) -> dict:
    return {
        split: (source.classes(split), source._split(split).names, source._split(split).labels.tolist())
        for split in source.splits()
    } | {"notes": [note.split(": ", 1)[1] for note in source.notes()]}


def test_image_folder_on_s3_is_listed_a_class_folder_at_a_time_concurrently(s3_env, tmp_path):
    from pipeline.data.sources import ImageFolderSource

    local = tmp_path / "folder"
    _image_tree(local)
    fs = s3_env.filesystem()
    fs.put(str(local), "scale/folder", recursive=True)
    s3_env.reset()
    s3_env.delay_s = 0.005
    remote = ImageFolderSource("s3://scale/folder")
    listing = _listing(remote)
    counts = s3_env.counts()
    assert listing == _listing(ImageFolderSource(str(local)))
    assert counts.get("GET", 0) == 0, counts  # no object read to list
    assert counts.get("LIST", 0) <= 1 + 2 + 2 * 40 + 4, counts  # root, splits, class folders (+ checks)
    assert s3_env.peak_in_flight > 4, "class folders were listed one after another"
    assert not remote.fs.dircache, "listing info kept after the listing"


def test_tar_on_s3_is_listed_as_one_stream(s3_env, tmp_path):
    import tarfile

    from pipeline.data.sources import ImageFolderSource

    _image_tree(tmp_path / "folder", classes=30)
    archive = tmp_path / "images.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(tmp_path / "folder", arcname=".")
    s3_env.filesystem().put(str(archive), "scale/images.tar")
    s3_env.reset()
    remote = ImageFolderSource("s3://scale/images.tar")
    listing = _listing(remote)
    counts = s3_env.counts()
    assert listing == _listing(ImageFolderSource(str(archive)))
    assert counts.get("GET", 0) <= 3, counts  # the magic bytes, then the archive in one block
    records = remote.slice("train", np.arange(5)).read()
    local = ImageFolderSource(str(archive)).slice("train", np.arange(5)).read()
    assert [(r.image, r.label) for r in records] == [(r.image, r.label) for r in local]


def test_webdataset_on_s3_shards_like_local_listing_shards_concurrently(s3_env, tmp_path):
    """WebDataset shards with their _info.json on the object store give the same output
    shards (fingerprint) as on local disk; each source shard is listed as one stream,
    several at once, and the output is resumable from its records."""
    from tests.helpers.hub_datasets import shard_in_threads, write_wds

    write_wds(str(tmp_path / "wds"), {"train": 40, "validation": 8}, per_shard=4)
    s3_env.filesystem().put(str(tmp_path / "wds"), "scale/wds", recursive=True)

    local = shard_in_threads(f"webdataset:{tmp_path / 'wds'}", str(tmp_path / "out"), samples_per_shard=8)
    s3_env.reset()
    s3_env.delay_s = 0.005
    remote = shard_in_threads("webdataset:s3://scale/wds", "s3://scale/wds-out", samples_per_shard=8)
    counts = s3_env.counts()
    assert {k: v.fingerprint for k, v in remote.items()} == {k: v.fingerprint for k, v in local.items()}
    # the info file, each of the 12 source shards streamed, then the 48 images by range
    assert counts.get("GET", 0) <= 1 + 12 * 2 + 48 + 4, counts
    assert s3_env.peak_in_flight > 4, "the source shards were listed one after another"
    s3_env.delay_s = 0.0
    s3_env.filesystem().rm("scale/wds-out/train.index.json")
    s3_env.reset()
    again = shard_in_threads("webdataset:s3://scale/wds", "s3://scale/wds-out", samples_per_shard=8)
    assert again["train"].fingerprint == local["train"].fingerprint
    assert s3_env.counts().get("PUT", 0) <= 3  # the index again; no shard rewritten


def test_hf_parquet_on_s3_shards_like_local_reading_each_file_once(s3_env, tmp_path):
    """Hugging Face parquet files on the object store give the same output shards as on
    local disk; each file is staged once (its row groups read once, several files at
    once) into the output's staging folder, which is gone when the job completes."""
    from tests.helpers.hub_datasets import shard_in_threads, write_hf_parquet

    write_hf_parquet(str(tmp_path / "data"), {"train": 30, "validation": 6}, files_per_split=3)
    fs = s3_env.filesystem()
    fs.put(str(tmp_path / "data"), "scale/hf", recursive=True)

    local = shard_in_threads(f"parquet:{tmp_path / 'data'}", str(tmp_path / "out"), samples_per_shard=8)
    s3_env.reset()
    s3_env.delay_s = 0.005
    remote = shard_in_threads("parquet:s3://scale/hf", "s3://scale/hf-out", samples_per_shard=8)
    assert {k: v.fingerprint for k, v in remote.items()} == {k: v.fingerprint for k, v in local.items()}
    assert s3_env.peak_in_flight > 4, "the files were staged one after another"
    assert not fs.exists("scale/hf-out/_staging")


# ---------------------------------------------------------------- verify reads only the sampled samples


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_few_samples_are_read_by_their_offsets_alone(where, tmp_path, request):
    from pipeline.data.shard_format import load_shard, offsets_path, read_index, read_samples
    from pipeline.data.shard_writer import ShardConfig, shard_dataset
    from pipeline.storage import filesystem

    s3 = request.getfixturevalue("s3_env") if where == "s3" else None
    out = "s3://scale/offsets" if s3 else str(tmp_path / "shards")
    cfg = ShardConfig(
        "synthetic:shapes",
        out,
        samples_per_shard=7,
        splits=["train"],
        synthetic={"image_size": 16, "train_samples": 17, "test_samples": 1},
        progress=False,
    )
    with ThreadPoolExecutor(2) as pool:
        shard_dataset(cfg, pool)
    index = read_index(out, "train")
    for info in index.shards:
        whole = load_shard(out, index, info)
        positions = [0, info.count // 2, info.count - 1]
        if s3:
            s3.reset()
        some = read_samples(out, index, info, positions)
        if s3:  # two rounds of ranged reads: the samples' offsets in one, then their bytes
            assert s3.counts() == {"GET": 1 + len(set(positions))}, s3.counts()
        assert sorted(some) == sorted(set(positions))
        for k in positions:
            got, want = some[k], whole[k]
            assert (got.id, got.label, got.image, got.fmt, got.box) == (
                want.id,
                want.label,
                want.image,
                want.fmt,
                want.box,
            )
    fs, root = filesystem(out)
    fs.rm(offsets_path(root, index.shards[0]))  # a shard written by an older catkd: read it whole
    assert read_samples(out, index, index.shards[0], [1]) is None


# ---------------------------------------------------------------- a cache shard opens in one request


def test_a_cache_shard_opens_with_one_metadata_read(s3_env):
    """The group's zarr.json carries every array's metadata: reading a shard's arrays is
    one metadata GET and one GET per array, in two rounds; a shard written before (each
    array's metadata in its own zarr.json only) reads the same arrays the old way."""
    import zarr

    from pipeline.cache.layout import read_arrays, read_view, write_group
    from pipeline.storage import filesystem, zarr_store

    rng = np.random.default_rng(0)
    arrays = {
        "ids": np.arange(5, dtype=np.int64),
        "params": rng.integers(0, 9, (5, 2, 5)).astype(np.int32),
        "logits": rng.standard_normal((5, 2, 3)).astype(np.float16),
        "cam": rng.standard_normal((5, 2, 3, 2, 2)).astype(np.float16),
    }
    write_group("s3://scale/consolidated/0", arrays)
    fs, root = filesystem("s3://scale/consolidated")
    s3_env.reset()
    store = zarr.storage.StorePath(zarr_store("s3://scale/consolidated", read_only=True), "0")
    got = read_arrays(store, dict.fromkeys(arrays, slice(None)))
    assert s3_env.counts() == {"GET": 1 + len(arrays)}, s3_env.counts()
    for name, want in arrays.items():
        np.testing.assert_array_equal(got[name], want)

    s3_env.reset()
    read_view(store, "float16", 1, None)
    consolidated = s3_env.counts()["GET"]

    # the same shard without the consolidated copy: every array's own zarr.json is read too
    group = json.loads(fs.cat_file(f"{root}/0/zarr.json"))
    group.pop("consolidated_metadata")
    fs.pipe_file(f"{root}/0/zarr.json", json.dumps(group).encode())
    s3_env.reset()
    view = read_view(store, "float16", 1, None)
    assert s3_env.counts()["GET"] == consolidated + len(arrays), (s3_env.counts(), consolidated)
    np.testing.assert_array_equal(view["cam"], arrays["cam"][:, 1].astype(np.float32))
