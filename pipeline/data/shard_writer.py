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
import io
import json
import resource
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import ray
from tqdm import tqdm

from pipeline.data.shard_format import (
    RAW_FORMAT,
    Sample,
    ShardError,
    ShardIndex,
    ShardInfo,
    decode_image,
    encode_shard,
    index_name,
    read_index,
    sample_key,
    shard_name,
    write_index,
)
from pipeline.data.sources import Record, Source, SourceError, SourceSlice, SubsetSource, open_source
from pipeline.ray_setup import init_ray
from pipeline.storage import check_location, filesystem, join, write_atomic

Encoding = Literal["keep", "raw"]
PROGRESS_DIR = "_progress"
STAGING_DIR = "_staging"


@dataclass
class ShardConfig:
    source: str
    out: str
    splits: list[str] | None = None  # default: every split the source has
    samples_per_shard: int = 1000
    encoding: Encoding = "keep"  # keep the source's encoding, or store raw RGB pixels
    subset: int | None = None  # keep this many samples per split, evenly spaced (SubsetSource)
    order_seed: int = 0  # seed of the permutation that mixes classes across shards
    max_short_side: int | None = None  # store images with the shorter side at most this (re-encoded)
    jpeg_quality: int = 90  # quality of images re-encoded after a resize
    synthetic: dict[str, Any] = field(default_factory=dict)  # options of synthetic:shapes
    progress: bool = True


@dataclass(frozen=True)
class _ShardTask:
    """What one Ray task needs to write one shard: its entries and how to store them."""

    split: str
    j: int
    first: int
    entries: SourceSlice
    out: str
    encoding: Encoding
    num_classes: int
    digest: str
    max_short_side: int | None
    jpeg_quality: int


def shard_dataset(cfg: ShardConfig) -> dict[str, ShardIndex]:
    if cfg.samples_per_shard < 1:
        raise ValueError("samples_per_shard must be at least 1")
    if cfg.max_short_side is not None and cfg.max_short_side < 1:
        raise ValueError("max_short_side must be at least 1")
    check_location(cfg.out)
    source = open_source(cfg.source, staging=join(cfg.out, STAGING_DIR), **cfg.synthetic)
    if cfg.subset is not None:
        source = SubsetSource(source, cfg.subset)
    splits = cfg.splits or source.splits()
    unknown = sorted(set(splits) - set(source.splits()))
    if unknown:
        raise SourceError(f"{cfg.source}: no split {unknown[0]!r} (has {', '.join(source.splits())})")
    for note in source.notes():
        print(f"[shard] {note}", file=sys.stderr)
    init_ray()
    indexes = {split: _shard_split(cfg, source, split) for split in splits}
    fs, root = filesystem(cfg.out)
    if fs.exists(join(root, STAGING_DIR)):  # a decompressed archive: no longer needed
        fs.rm(join(root, STAGING_DIR), recursive=True)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"[shard] driver peak memory {peak_mb:.0f} MB")
    return indexes


def _settings(cfg: ShardConfig, source: Source, split: str) -> dict[str, Any]:
    settings = {**source.settings(), "split": split, "samples_per_shard": cfg.samples_per_shard, "encoding": cfg.encoding,
                "order_seed": cfg.order_seed, "num_samples": source.size(split), "listing": source.listing_digest(split)}  # fmt: skip
    if cfg.max_short_side is not None:
        settings |= {"max_short_side": cfg.max_short_side, "jpeg_quality": cfg.jpeg_quality}
    return settings


def _settings_digest(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def id_order(total: int, seed: int) -> np.ndarray:
    """``order[i]``: the sorted-source position of sample id ``i`` (a seeded permutation)."""
    return np.random.default_rng([seed, total]).permutation(total)


def _shard_split(cfg: ShardConfig, source: Source, split: str) -> ShardIndex:
    classes = source.classes(split)
    total = source.size(split)
    if total == 0:
        raise SourceError(f"{cfg.source}: split {split!r} has no samples")
    settings = _settings(cfg, source, split)
    digest = _settings_digest(settings)
    fs, root = filesystem(cfg.out)
    existing = _check_settings(cfg.out, split, settings)
    if existing is not None:
        print(f"[shard] {split}: already complete in {cfg.out} ({existing.num_samples} samples, {len(existing.shards)} shards)")
        return existing

    plan = [(j, first, min(cfg.samples_per_shard, total - first)) for j, first in enumerate(range(0, total, cfg.samples_per_shard))]
    done: dict[int, dict[str, Any]] = {}
    for j, first, count in plan:
        record = _completed(fs, root, shard_name(split, j), digest, first, count)
        if record is not None:
            done[j] = record
    todo = [p for p in plan if p[0] not in done]
    bar = tqdm(total=total, unit="samples", desc=f"shard {split}", disable=not cfg.progress, file=sys.stderr, smoothing=0.1)
    bar.update(sum(done[j]["info"]["count"] for j in done))
    if done:
        bar.write(f"[shard] {split}: {len(done)} of {len(plan)} shards already complete, writing {len(todo)}")
    order = id_order(total, cfg.order_seed)
    tasks = (
        _ShardTask(split, j, first, source.slice(split, order[first : first + count]), cfg.out, cfg.encoding, len(classes), digest, cfg.max_short_side, cfg.jpeg_quality)
        for j, first, count in todo
    )
    try:
        for record in _run_bounded(tasks, bar):
            done[record["j"]] = record
    finally:
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
    print(f"[shard] {split}: {index.num_samples} samples in {len(index.shards)} shards -> {join(cfg.out, index_name(split))}")
    return index


def _run_bounded(tasks: Iterator[_ShardTask], bar: tqdm) -> Iterator[dict[str, Any]]:
    """Run shard tasks with a bounded number in flight, so the driver never holds every
    shard's slice at once. On a failure the tasks in flight still finish (complete shards
    are kept, and a rerun after fixing the input has less to do); the first error is raised."""
    window = max(4, 2 * int(ray.cluster_resources().get("CPU", 1)))
    pending: dict[ray.ObjectRef, int] = {}
    failure: Exception | None = None
    exhausted = False
    while pending or not exhausted:
        while not exhausted and failure is None and len(pending) < window:
            task = next(tasks, None)
            if task is None:
                exhausted = True
            else:
                pending[_write_shard.remote(task)] = task.j
        if not pending:
            break
        ready, _ = ray.wait(list(pending), num_returns=1)
        pending.pop(ready[0])
        try:
            record = ray.get(ready[0])
        except ray.exceptions.RayTaskError as exc:
            cause = exc.cause if isinstance(exc.cause, Exception) else exc
            failure = failure or (type(cause)(str(cause)) if isinstance(cause, (ShardError, SourceError)) else cause)
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


def _completed(fs, root: str, name: str, digest: str, first: int, count: int) -> dict[str, Any] | None:
    """The completion record of a shard whose file still has the size (and ETag) recorded
    when it was written, else None. Bytes are not read again: ``--verify`` does that."""
    record_path = join(root, PROGRESS_DIR, f"{name}.json")
    try:
        record = json.loads(fs.cat_file(record_path))
        stat = fs.info(join(root, name))
    except FileNotFoundError:
        return None
    info = record["info"]
    if record.get("settings") != digest or (info["first_id"], info["count"]) != (first, count):
        return None
    if stat["size"] != info["bytes"] or (record.get("etag") and _etag(stat) != record["etag"]):
        return None
    return record


def _etag(stat: dict[str, Any]) -> str | None:
    tag = stat.get("ETag") or stat.get("etag")
    return str(tag).strip('"') if tag else None


def _one_or_mixed(formats: set[str]) -> str:
    return formats.pop() if len(formats) == 1 else "mixed"


def _common_shape(records: list[dict[str, Any]], cfg: ShardConfig, split: str) -> list[int] | None:
    shapes = {tuple(s) for r in records for s in r["shapes"]}
    if len(shapes) == 1:
        return list(shapes.pop())
    if any(RAW_FORMAT in r["formats"] for r in records):
        raise ShardError(f"{cfg.out}: split {split}: raw pixels need images of one size, found {sorted(shapes)[:4]}; use --encoding keep")
    return None


def _shrink(pixels: np.ndarray, max_short_side: int) -> np.ndarray:
    """Resize (antialiased) so that the shorter side is ``max_short_side``."""
    import torch
    from torchvision.transforms.v2 import functional as TF

    tensor = torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1)
    return TF.resize(tensor, max_short_side, antialias=True).permute(1, 2, 0).contiguous().numpy()


def _jpeg(pixels: np.ndarray, quality: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _to_sample(record: Record, sample_id: int, task: _ShardTask) -> tuple[Sample, tuple[int, int]]:
    """Validate one record and turn it into the sample the shard stores: decoded once to
    check it, resized when it is larger than ``max_short_side``, raw when asked."""
    key = sample_key(sample_id)
    if not 0 <= record.label < task.num_classes:
        raise SourceError(f"{record.origin}: sample {key}: label {record.label} outside 0..{task.num_classes - 1}")
    if isinstance(record.image, np.ndarray):
        pixels, sample = record.image, Sample(sample_id, record.label, b"", RAW_FORMAT, record.box)
    else:
        sample = Sample(sample_id, record.label, record.image, record.fmt, record.box)
        try:
            pixels = decode_image(sample, None, record.origin)
        except ShardError as exc:
            raise SourceError(str(exc)) from None
    if pixels.ndim != 3 or pixels.shape[2] != 3 or pixels.dtype != np.uint8:
        raise SourceError(f"{record.origin}: sample {key}: pixels of shape {pixels.shape} {pixels.dtype}, expected (H, W, 3) uint8")
    if task.max_short_side is not None and min(pixels.shape[:2]) > task.max_short_side:
        if record.box is not None:
            raise SourceError(f"{record.origin}: sample {key}: resizing would invalidate its object box; shard it without --max-short-side")
        pixels = _shrink(pixels, task.max_short_side)
        sample.image, sample.fmt = _jpeg(pixels, task.jpeg_quality), "jpg"
    if task.encoding == "raw" or sample.fmt == RAW_FORMAT:
        sample.image, sample.fmt = np.ascontiguousarray(pixels).tobytes(), RAW_FORMAT
    return sample, pixels.shape[:2]


@ray.remote(num_cpus=1)
def _write_shard(task: _ShardTask) -> dict[str, Any]:
    samples, shapes = [], set()
    for offset, record in enumerate(task.entries.read()):
        sample, shape = _to_sample(record, task.first + offset, task)
        samples.append(sample)
        shapes.add(shape)
    data = encode_shard(samples)
    name = shard_name(task.split, task.j)
    fs, root = filesystem(task.out)
    write_atomic(fs, join(root, name), data)
    info = ShardInfo(name=name, first_id=task.first, count=len(samples), bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    record = {
        "j": task.j,
        "settings": task.digest,
        "info": asdict(info),
        "etag": _etag(fs.info(join(root, name))),
        "formats": sorted({s.fmt for s in samples}),
        "shapes": sorted(shapes),
        "has_boxes": all(s.box is not None for s in samples),
    }
    write_atomic(fs, join(root, PROGRESS_DIR, f"{name}.json"), json.dumps(record).encode())
    return record


# ---------------------------------------------------------------- verify


@ray.remote(num_cpus=1)
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
        return f"{path}: size or sha256 does not match the index ({size} bytes, index says {info.bytes}; samples {sample_key(info.first_id)}..{sample_key(info.first_id + info.count - 1)})"
    return None


def verify_shards(out: str, splits: list[str] | None = None, progress: bool = True) -> list[str]:
    """Re-hash every shard of every split (in parallel Ray tasks) against its index; the problems found."""
    fs, root = filesystem(out)
    if splits is None:
        splits = sorted(p.rsplit("/", 1)[-1].removesuffix(".index.json") for p in fs.glob(join(root, "*.index.json")))
        if not splits:
            raise ShardError(f"{out}: no <split>.index.json here (was a dataset sharded into it?)")
    init_ray()
    problems = []
    for split in splits:
        index = read_index(out, split)
        refs = [_hash_shard.remote(out, info) for info in index.shards]
        with tqdm(total=len(refs), unit="shards", desc=f"verify {split}", disable=not progress, file=sys.stderr) as bar:
            while refs:
                ready, refs = ray.wait(refs, num_returns=1)
                problem = ray.get(ready[0])
                if problem:
                    problems.append(problem)
                bar.update(1)
    return problems
