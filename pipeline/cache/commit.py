"""The cache's commit protocol (DESIGN section 6), in one place: its file names, the
completion record of each data shard (with the checksums ``catkd cache verify``
compares), orphan removal and the manifest written last.

Under a cache root ``<root>/<cache_id>``:

    identity.json                      created once, first: what the cache is for
    head.npy                           the teacher's head weight (the features form)
    data/<writer uuid>/shard-<j>.zarr  one writer's targets of data shard j
    done/shard-<j>.json                the completion record of data shard j
    manifest.json                      written last: the cache is complete

1. A writer stores a data shard's zarr group under a fresh, unique folder, so no two
   writers (a concurrent build, a retried actor) ever touch the same store.
2. It then creates the shard's completion record (path, ids, checksums) with the
   store's conditional write; a loser deletes its own copy and takes the winner's
   record (the values are identical: same identity, same inputs).
3. Once every data shard has a record, folders no record points to that nothing has
   written for a lease are removed (leftovers of crashed writers), and the manifest
   is written. A rerun skips data shards with a record.

A repair (``catkd cache verify --repair``) retires damaged shards: manifest, then their
records, then their data (``retire_shards``); the next build redoes steps 1-3 for them.
"""

from __future__ import annotations

import hashlib
import io
import json
import platform
import posixpath
import time
import uuid
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from pipeline.cache.identity import CacheIdentity
from pipeline.cache.layout import write_group
from pipeline.cache.teacher import CacheBuildError
from pipeline.data.shard_format import ShardIndex
from pipeline.record_batches import read_batched, remove_batches
from pipeline.storage import create_exclusive, filesystem, join, list_folder, read_many, write_atomic

if TYPE_CHECKING:
    from pipeline.cache.config import CacheBuildConfig

IDENTITY = "identity.json"
HEAD = "head.npy"
MANIFEST = "manifest.json"
DONE_DIR = "done"
DONE_BATCH_DIR = "done_batches"  # the same records, gathered by the driver (pipeline.record_batches)
DATA_DIR = "data"


def done_path(root: str, j: int) -> str:
    return join(root, DONE_DIR, f"shard-{j:06d}.json")


def start_cache(fs, root: str, identity: CacheIdentity, head_weight: np.ndarray | None) -> None:
    """The first files of a cache (kept as they are when a build resumes)."""
    fs.makedirs(root, exist_ok=True)
    create_exclusive(fs, join(root, IDENTITY), identity.canonical().encode())
    if head_weight is not None and not fs.exists(join(root, HEAD)):
        buf = io.BytesIO()
        np.save(buf, head_weight)
        write_atomic(fs, join(root, HEAD), buf.getvalue())


def read_head(fs, root: str) -> np.ndarray:
    return np.load(io.BytesIO(fs.cat_file(join(root, HEAD))))


def array_checksums(arrays: dict[str, np.ndarray]) -> dict[str, str]:
    return {name: hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest() for name, a in arrays.items()}


def read_done(fs, root: str, j: int) -> dict[str, Any] | None:
    return _parse_done(done_path(root, j), read_many(fs, [done_path(root, j)])[0])


def _parse_done(path: str, data: bytes | None) -> dict[str, Any] | None:
    if data is None:
        return None
    try:
        return json.loads(data)
    except ValueError:
        raise CacheBuildError(
            f"{path}: damaged completion record (not JSON); delete it and rerun the build, which redoes that shard"
        ) from None


def done_records(fs, root: str, num_shards: int) -> dict[int, dict[str, Any]]:
    """The completion records present, by data shard: one listing of ``done/``, the
    records the driver gathered into batches (``done_batches/``, about one object per 256
    shards) and, in one batched read, the listed records no batch holds. A batched record
    counts only while its shard's own record is listed: records never change once created
    (step 2's conditional write) and ``retire_shards`` removes the batches before it
    removes any record. At 14,000 shards and 20 ms a request that is a few listing pages
    and two rounds of reads, where one read per shard in turn took minutes."""
    present = list_folder(fs, join(root, DONE_DIR))
    shards = [j for j in range(num_shards) if posixpath.basename(done_path(root, j)) in present]
    batched = {r.get("shard"): r for r in read_batched(fs, join(root, DONE_BATCH_DIR))}
    records = {j: batched[j] for j in shards if j in batched}
    unbatched = [j for j in shards if j not in records]
    paths = [done_path(root, j) for j in unbatched]
    for j, path, data in zip(unbatched, paths, read_many(fs, paths), strict=True):
        record = _parse_done(path, data)
        if record is not None:
            records[j] = record
    return records


def commit_shard(url: str, j: int, first_id: int, arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    """Steps 1 and 2 for data shard ``j``; returns the record that holds (ours or the
    winner's)."""
    fs, root = filesystem(url)
    rel = posixpath.join(DATA_DIR, uuid.uuid4().hex, f"shard-{j:06d}.zarr")
    write_group(join(url, rel), arrays)
    record = {
        "shard": j,
        "first_id": first_id,
        "count": int(len(arrays["ids"])),
        "path": rel,
        "checksums": array_checksums(arrays),
        "arrays": {name: {"shape": list(a.shape), "dtype": str(a.dtype)} for name, a in arrays.items()},
    }
    if create_exclusive(fs, done_path(root, j), json.dumps(record).encode()):
        return record
    _remove_folder(fs, join(root, posixpath.dirname(rel)))  # another build committed this shard first
    return read_done(fs, root, j)


def _remove_folder(fs, folder: str) -> None:
    """Remove ``folder`` and what it holds; one already gone (removed by a concurrent
    build's orphan sweep) is not an error."""
    try:
        fs.rm(folder, recursive=True)
    except FileNotFoundError:
        pass


def retire_shards(fs, root: str, shards: list[int]) -> None:
    """Take damaged data shards out of a complete cache, so that the next build with the
    same settings rebuilds exactly them (step 2 and then 3 again, for those shards). The
    manifest goes first: from then on a reader refuses the cache as partial instead of
    reading a shard being rebuilt; a reader that opened it before holds records that name
    the retired folders, never the rebuilt ones (a rebuild writes under a new folder).
    Then each shard's completion record, then its data."""
    if fs.exists(join(root, MANIFEST)):
        fs.rm(join(root, MANIFEST))
    remove_batches(fs, join(root, DONE_BATCH_DIR))  # they would name the retired folders
    for j in shards:
        record = read_done(fs, root, j)
        if record is None:
            continue
        fs.rm(done_path(root, j))
        folder = join(root, posixpath.dirname(record["path"]))
        if fs.exists(folder):
            fs.rm(folder, recursive=True)


def remove_orphans(fs, root: str, records: dict[int, dict[str, Any]], lease_s: float) -> None:
    """Remove data folders that no completion record points to and that nothing has
    written for ``lease_s`` seconds. ``records`` are the build's own, complete: a record
    never changes once created (step 2's conditional write), and a shard this build lost
    to a concurrent one holds the winner's record, so none needs reading again. A folder
    younger than the lease may belong to a concurrent build about to lose its race and
    delete it, so it stays (a later build removes it)."""
    data_dir = join(root, DATA_DIR)
    if not fs.exists(data_dir):
        return
    kept = {posixpath.dirname(record["path"]) for record in records.values()}
    now = time.time()
    for folder in fs.ls(data_dir, detail=False):
        name = posixpath.join(DATA_DIR, posixpath.basename(folder.rstrip("/")))
        if name in kept:
            continue
        try:
            # the folder's own time too: a writer's folder exists before its first file,
            # and a folder with no file yet is not old (it counted as written at time 0)
            infos = [*fs.find(folder, detail=True, withdirs=True).values(), fs.info(folder)]
        except FileNotFoundError:
            continue  # removed meanwhile by the build that lost its race for it
        newest = max(_mtime(info) for info in infos)
        if now - newest > lease_s:
            _remove_folder(fs, folder)
    fs.invalidate_cache(data_dir)


def _mtime(info: dict[str, Any]) -> float:
    """Modification time (seconds since the epoch) of an fsspec info dict, local or S3."""
    value = info.get("mtime", info.get("LastModified", info.get("updated", 0)))
    return value.timestamp() if hasattr(value, "timestamp") else float(value or 0)


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:  # run from a source tree without installing (bench/gpu_check.py)
        return "not installed"


def _versions() -> dict[str, str]:
    import numcodecs
    import torchvision
    import zarr

    return {
        "catkd": _version("catkd"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "zarr": zarr.__version__,
        "numcodecs": numcodecs.__version__,
        "ray": _version("ray"),
        "numpy": np.__version__,
    }


def write_build_manifest(
    fs,
    root: str,
    identity: CacheIdentity,
    index: ShardIndex,
    cfg: CacheBuildConfig,
    records: dict[int, dict[str, Any]],
    cam_size: tuple[int, int] | None = None,
) -> None:
    """A build's manifest: every data shard's record, and how the teacher computed them."""
    write_manifest(
        fs,
        root,
        identity,
        index.num_samples,
        [records[j] for j in range(len(index.shards))],
        teacher_weights=cfg.weights,
        data=cfg.data,
        build={
            "precision": cfg.precision,
            "device": "cuda" if cfg.gpus_per_actor > 0 else "cpu",
            "channels_last": cfg.channels_last,
            "batch_size": cfg.batch_size,
            "chunk_views": cfg.chunk_views,  # with batch_size, what a bitwise-equal rebuild batches by
        },
        cam_size=cam_size,
    )


def write_manifest(
    fs,
    root: str,
    identity: CacheIdentity,
    num_samples: int,
    records: list[dict[str, Any]],
    *,
    teacher_weights: str | None,
    data: str,
    build: dict[str, Any],
    cam_size: tuple[int, int] | list[int] | None = None,
    derived_from: dict[str, Any] | None = None,
) -> None:
    """Step 3's last write: the cache is complete. ``cam_size`` is the side of the
    teacher's CAMs before pooling (which coarser resolutions the cache serves exactly);
    ``derived_from`` a derived cache's source (URL, cache_id, transform)."""
    manifest = {
        "identity": asdict(identity),
        "cache_id": identity.cache_id,
        "num_samples": num_samples,
        "teacher_cam_size": list(cam_size) if cam_size else None,
        "shards": records,
        "arrays": records[0]["arrays"],
        "codecs": {
            "compressor": "blosc zstd clevel 5 bitshuffle, then crc32c per chunk",
            "layout": "one zarr shard per array, one inner chunk per view",
        },
        "teacher_weights": teacher_weights,
        "data": data,
        "build": build,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "versions": _versions(),
        "complete": True,
    }
    if derived_from is not None:
        manifest["derived_from"] = derived_from
    write_atomic(fs, join(root, MANIFEST), json.dumps(manifest, indent=1).encode())
