"""``catkd shard SOURCE OUT``: a dataset -> class-mixed WebDataset shards + index, as Ray tasks.

Sample ids are positions in a seeded permutation of the sorted source order (DESIGN
section 4): id ``i`` is source entry ``permutation(order_seed)[i]``, and shard ``j``
holds a contiguous id range, so every shard mixes the classes as the whole split
does. The driver lists the source once and holds only that listing and the
permutation; each Ray task receives the slice of entries for its one shard.

Every shard appears atomically (temporary name, then a move) followed by a small
completion record in ``_progress/`` holding its size and sha256 as written; a rerun
skips a shard whose record matches its settings and whose file has that size (and
ETag, where the store gives one), without reading it again. ``--verify`` re-hashes
every shard. ``<split>.index.json`` is written last. An OUT that already holds a
dataset sharded with other settings, or from a listing that changed since, is
refused, never overwritten.
"""

from __future__ import annotations

import hashlib
import json
import resource
import sys
import time
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Executor, Future, wait
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tqdm import tqdm

try:
    import ray
except ImportError:  # a machine without Ray (bench/gpu_check.py) shards with a local process pool
    ray = None

from catkd.errors import ConfigError, user_error
from pipeline.data.shard_format import (
    RAW_FORMAT,
    ShardError,
    ShardIndex,
    ShardInfo,
    index_name,
    read_index,
    sample_key,
    shard_name,
    write_index,
)
from pipeline.data.shard_task import PROGRESS_DIR, Encoding, ShardTask, etag, write_shard
from pipeline.data.sources import Source, SourceError, SubsetSource, open_source
from pipeline.record_batches import RecordBatcher, read_batched
from pipeline.settings import check_fields
from pipeline.storage import check_location, filesystem, join, list_folder, read_many, write_atomic

STAGING_DIR = "_staging"


@dataclass
class ShardConfig:
    # The flags of `catkd shard` are these fields (pipeline.settings.add_flags): each
    # comment is its --help line, each default the only one.
    # imagefolder:URL (a folder or .tar/.tar.gz), webdataset:URL (a folder of shards with
    # its info.json, or a brace pattern), parquet:URL (Hugging Face's data/ folder),
    # cifar10:PATH, cifar100:PATH or synthetic:shapes
    source: str
    out: str  # output URL (path, file://, s3://, ...)
    splits: list[str] | None = None  # the splits to shard (default: every split the source has)
    samples_per_shard: int = 1000  # samples per tar shard
    encoding: Encoding = "keep"  # keep the source's encoding, or store raw RGB pixels
    subset: int | None = None  # keep N samples per split, evenly spaced over the sorted source (class-balanced)
    order_seed: int = 0  # seed of the permutation that mixes classes across shards
    # store images with the shorter side at most N (re-encoded as JPEG); 256-320 for ImageNet
    max_short_side: int | None = None
    jpeg_quality: int = 90  # JPEG quality of images re-encoded after a resize
    # where a sample's label is: webdataset: cls (default) or json:FIELD; parquet: its column (default label)
    label: str | None = None
    image_column: str | None = None  # parquet: the image column (default image)
    # the split of a webdataset brace pattern's shards or of parquet files (default: from their names)
    source_split: str | None = None
    # options of synthetic:shapes (the fields of pipeline.data.sources.ShapesSource)
    synthetic: dict[str, Any] = field(default_factory=dict)
    progress: bool = True  # progress bars on stderr
    verbose: bool = False  # Ray's own output on the console too (worker logs)

    def __post_init__(self) -> None:
        check_fields(self, at_least={"samples_per_shard": 1, "subset": 1, "max_short_side": 1, "jpeg_quality": 1})
        if self.jpeg_quality > 100:
            raise ConfigError(f"jpeg_quality: must be at most 100, got {self.jpeg_quality}")


def shard_dataset(cfg: ShardConfig, pool: Executor | None = None) -> dict[str, ShardIndex]:
    """Shard every split of ``cfg.source`` into ``cfg.out``: one Ray task per shard, or
    one ``pool`` task per shard (a local process pool, where Ray is not installed)."""
    check_location(cfg.out)
    source = open_source(
        cfg.source,
        staging=join(cfg.out, STAGING_DIR),
        label=cfg.label,
        source_split=cfg.source_split,
        image_column=cfg.image_column,
        **cfg.synthetic,
    )
    if cfg.subset is not None:
        source = SubsetSource(source, cfg.subset)
    splits = cfg.splits or source.splits()
    unknown = sorted(set(splits) - set(source.splits()))
    if unknown:
        raise SourceError(f"{cfg.source}: no split {unknown[0]!r} (has {', '.join(source.splits())})")
    for note in source.notes():
        print(f"[shard] {note}", file=sys.stderr)
    if pool is None:
        from pipeline.ray_setup import init_ray

        init_ray(verbose=cfg.verbose)
    indexes = {split: _shard_split(cfg, source, split, pool) for split in splits}
    fs, root = filesystem(cfg.out)
    if fs.exists(join(root, STAGING_DIR)):  # a decompressed archive: no longer needed
        fs.rm(join(root, STAGING_DIR), recursive=True)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"[shard] driver peak memory {peak_mb:.0f} MB")
    return indexes


def _settings(cfg: ShardConfig, source: Source, split: str) -> dict[str, Any]:
    settings = {
        **source.settings(),
        "split": split,
        "samples_per_shard": cfg.samples_per_shard,
        "encoding": cfg.encoding,
        "order_seed": cfg.order_seed,
        "num_samples": source.size(split),
        "listing": source.listing_digest(split),
    }
    if cfg.max_short_side is not None:
        settings |= {"max_short_side": cfg.max_short_side, "jpeg_quality": cfg.jpeg_quality}
    return settings


def _settings_digest(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def id_order(total: int, seed: int) -> np.ndarray:
    """``order[i]``: the sorted-source position of sample id ``i`` (a seeded permutation)."""
    return np.random.default_rng([seed, total]).permutation(total)


def _shard_split(cfg: ShardConfig, source: Source, split: str, pool: Executor | None) -> ShardIndex:
    classes = source.classes(split)
    total = source.size(split)
    if total == 0:
        raise SourceError(f"{cfg.source}: split {split!r} has no samples")
    settings = _settings(cfg, source, split)
    digest = _settings_digest(settings)
    fs, root = filesystem(cfg.out)
    existing = _check_settings(cfg.out, split, settings)
    if existing is not None:
        print(
            f"[shard] {split}: already complete in {cfg.out} "
            f"({existing.num_samples} samples, {len(existing.shards)} shards)"
        )
        return existing

    plan = [
        (j, first, min(cfg.samples_per_shard, total - first))
        for j, first in enumerate(range(0, total, cfg.samples_per_shard))
    ]
    done = _completed(fs, root, split, plan, digest)
    todo = [p for p in plan if p[0] not in done]
    bar = tqdm(
        total=total, unit="samples", desc=f"shard {split}", disable=not cfg.progress, file=sys.stderr, smoothing=0.1
    )
    bar.update(sum(done[j]["info"]["count"] for j in done))
    if done:
        bar.write(f"[shard] {split}: {len(done)} of {len(plan)} shards already complete, writing {len(todo)}")
    order = id_order(total, cfg.order_seed)
    tasks = (
        ShardTask(
            split,
            j,
            first,
            source.slice(split, order[first : first + count]),
            cfg.out,
            cfg.encoding,
            len(classes),
            digest,
            cfg.max_short_side,
            cfg.jpeg_quality,
        )
        for j, first, count in todo
    )
    batcher = RecordBatcher(fs, _batch_folder(root))
    try:
        for record in _run_bounded(tasks, bar, pool):
            done[record["j"]] = record
            batcher.add(record)
    finally:
        batcher.flush()
        bar.close()
    records = [done[j] for j, _, _ in plan]
    index = ShardIndex(
        split=split,
        classes=classes,
        image_format=_one_or_mixed({f for r in records for f in r["formats"]}),
        image_shape=_common_shape(records, cfg, split),
        has_boxes=all(r["has_boxes"] for r in records),
        shards=[ShardInfo(**r["info"]) for r in records],
        order_seed=cfg.order_seed,
        settings=settings | {"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
    )
    write_index(cfg.out, index)
    print(
        f"[shard] {split}: {index.num_samples} samples in {len(index.shards)} shards -> "
        f"{join(cfg.out, index_name(split))}"
    )
    return index


def _run_bounded(tasks: Iterator[ShardTask], bar: tqdm, pool: Executor | None) -> Iterator[dict[str, Any]]:
    """Run shard tasks (as Ray tasks, or in ``pool``) with a bounded number in flight, so
    the driver never holds every shard's slice at once. On a failure the tasks in flight
    still finish (complete shards are kept, and a rerun after fixing the input has less
    to do); the first error is raised."""
    if pool is None:
        remote = ray.remote(num_cpus=1)(write_shard)
        window = max(4, 2 * int(ray.cluster_resources().get("CPU", 1)))

        def submit(task: ShardTask) -> Future:
            return remote.remote(task).future()
    else:
        window = 2 * (getattr(pool, "_max_workers", None) or 2)

        def submit(task: ShardTask) -> Future:
            return pool.submit(write_shard, task)

    pending: set[Future] = set()
    failure: Exception | None = None
    exhausted = False
    while pending or not exhausted:
        while not exhausted and failure is None and len(pending) < window:
            task = next(tasks, None)
            if task is None:
                exhausted = True
            else:
                pending.add(submit(task))
        if not pending:
            break
        done, pending = wait(pending, return_when=FIRST_COMPLETED)
        for future in done:
            try:
                record = future.result()
            except Exception as exc:  # a Ray task error carries the task's own exception as its cause
                failure = failure or user_error(exc)
                exhausted = True
                continue
            bar.update(record["info"]["count"])
            yield record
    if failure is not None:
        raise failure


def _check_settings(out: str, split: str, settings: dict[str, Any]) -> ShardIndex | None:
    """The complete index of this split, if any; refuses an OUT holding the split
    sharded (fully or in part) with other settings or from a listing that changed."""
    fs, root = filesystem(out)
    index_path = join(root, index_name(split))
    started_path = join(root, PROGRESS_DIR, f"{split}.settings.json")
    if fs.exists(index_path):
        index = read_index(out, split)
        old, where = {k: v for k, v in index.settings.items() if k != "created"}, index_path
    elif fs.exists(started_path):
        index, old, where = None, json.loads(fs.cat_file(started_path)), started_path
    else:
        write_atomic(fs, started_path, json.dumps(settings, sort_keys=True).encode())
        return None
    if old != settings:
        name = next(k for k in sorted(set(old) | set(settings)) if old.get(k) != settings.get(k))
        what = "the source listing changed since" if name in ("listing", "num_samples") else "other settings"
        raise ShardError(
            f"{where}: split {split!r} was sharded here from {what} ({name}: {old.get(name)!r} there, "
            f"{settings.get(name)!r} now); choose another OUT, nothing was overwritten"
        )
    return index


def _completed(fs, root: str, split: str, plan: list[tuple[int, int, int]], digest: str) -> dict[int, dict[str, Any]]:
    """The completion records of the planned shards whose files still have the size (and
    ETag) recorded when they were written. Three listings (the shard files, the records
    and their batches), one batched read of the batches and one of the loose records no
    batch holds, concurrent on object storage: never a request per shard in turn, and
    about one request per ``RecordBatcher.every`` shards. Bytes are not read again:
    ``--verify`` does that."""
    files = list_folder(fs, root)
    records_listed = list_folder(fs, join(root, PROGRESS_DIR))
    batched = {r["info"]["name"]: r for r in read_batched(fs, _batch_folder(root)) if "info" in r}

    def holds(record: dict[str, Any] | None, j: int, first: int, count: int) -> bool:
        if record is None:
            return False
        info, stat = record["info"], files[shard_name(split, j)]
        if record.get("settings") != digest or (info["first_id"], info["count"]) != (first, count):
            return False
        return stat["size"] == info["bytes"] and not (record.get("etag") and etag(stat) != record["etag"])

    wanted = [
        (j, first, count)
        for j, first, count in plan
        if shard_name(split, j) in files and f"{shard_name(split, j)}.json" in records_listed
    ]
    done = {
        j: batched[shard_name(split, j)]
        for j, first, count in wanted
        if holds(batched.get(shard_name(split, j)), j, first, count)
    }
    unbatched = [p for p in wanted if p[0] not in done]
    paths = [join(root, PROGRESS_DIR, f"{shard_name(split, j)}.json") for j, _, _ in unbatched]
    for (j, first, count), data in zip(unbatched, read_many(fs, paths), strict=True):
        try:
            record = json.loads(data) if data is not None else None
        except ValueError:
            record = None  # a damaged record: the shard is written again
        if holds(record, j, first, count):
            done[j] = record
    return done


def _batch_folder(root: str) -> str:
    return join(root, PROGRESS_DIR, "batches")


def _one_or_mixed(formats: set[str]) -> str:
    return formats.pop() if len(formats) == 1 else "mixed"


def _common_shape(records: list[dict[str, Any]], cfg: ShardConfig, split: str) -> list[int] | None:
    shapes = {tuple(s) for r in records for s in r["shapes"]}
    if len(shapes) == 1:
        return list(shapes.pop())
    if any(RAW_FORMAT in r["formats"] for r in records):
        raise ShardError(
            f"{cfg.out}: split {split}: raw pixels need images of one size, found {sorted(shapes)[:4]}; "
            "use --encoding keep"
        )
    return None


# ---------------------------------------------------------------- verify


def _hash_shard(out: str, info: ShardInfo) -> str | None:
    fs, root = filesystem(out)
    path = join(root, info.name)
    h, size = hashlib.sha256(), 0
    try:
        with fs.open(path, "rb") as f:
            while chunk := f.read(8 << 20):
                h.update(chunk)
                size += len(chunk)
    except FileNotFoundError:
        return f"{path}: missing"
    if size != info.bytes or h.hexdigest() != info.sha256:
        return (
            f"{path}: size or sha256 does not match the index ({size} bytes, index says {info.bytes}; samples "
            f"{sample_key(info.first_id)}..{sample_key(info.first_id + info.count - 1)})"
        )
    return None


def verify_shards(out: str, splits: list[str] | None = None, progress: bool = True) -> list[str]:
    """Re-hash every shard of every split (in parallel Ray tasks) against its index; the problems found."""
    fs, root = filesystem(out)
    if splits is None:
        splits = sorted(p.rsplit("/", 1)[-1].removesuffix(".index.json") for p in fs.glob(join(root, "*.index.json")))
        if not splits:
            raise ShardError(f"{out}: no <split>.index.json here (was a dataset sharded into it?)")
    from pipeline.ray_setup import init_ray

    init_ray()
    hash_shard = ray.remote(num_cpus=1)(_hash_shard)
    problems = []
    for split in splits:
        index = read_index(out, split)
        refs = [hash_shard.remote(out, info) for info in index.shards]
        with tqdm(total=len(refs), unit="shards", desc=f"verify {split}", disable=not progress, file=sys.stderr) as bar:
            while refs:
                ready, refs = ray.wait(refs, num_returns=1)
                problem = ray.get(ready[0])
                if problem:
                    problems.append(problem)
                bar.update(1)
    return problems
