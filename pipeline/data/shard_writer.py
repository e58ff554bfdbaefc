"""``catkd shard SOURCE OUT``: a dataset -> WebDataset shards + index, as Ray tasks.

One Ray task writes one shard. Every shard appears atomically (temporary name, then a
move) followed by a small completion record in ``_progress/``; a rerun skips shards
whose record and bytes check out, so a crash never leaves half a shard and never
costs the finished ones. ``<split>.index.json`` is written last. An OUT that already
holds a dataset sharded with other settings is refused, never overwritten.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import ray
from tqdm import tqdm

from pipeline.ray_setup import init_ray
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
from pipeline.data.sources import Record, Source, SourceError, SubsetSource, open_source
from pipeline.storage import check_location, filesystem, join, write_atomic

Encoding = Literal["keep", "raw"]
PROGRESS_DIR = "_progress"


@dataclass
class ShardConfig:
    source: str
    out: str
    splits: list[str] | None = None  # default: every split the source has
    samples_per_shard: int = 1000
    encoding: Encoding = "keep"  # keep the source's encoding, or store raw RGB pixels
    subset: int | None = None  # keep this many samples per split, evenly spaced (SubsetSource)
    synthetic: dict[str, Any] = field(default_factory=dict)  # options of synthetic:shapes
    progress: bool = True


def shard_dataset(cfg: ShardConfig) -> dict[str, ShardIndex]:
    source = open_source(cfg.source, **cfg.synthetic)
    if cfg.subset is not None:
        source = SubsetSource(source, cfg.subset)
    splits = cfg.splits or source.splits()
    unknown = sorted(set(splits) - set(source.splits()))
    if unknown:
        raise SourceError(f"{cfg.source}: no split {unknown[0]!r} (has {', '.join(source.splits())})")
    if cfg.samples_per_shard < 1:
        raise ValueError("samples_per_shard must be at least 1")
    check_location(cfg.out)
    init_ray()
    source_ref = ray.put(source)
    return {split: _shard_split(cfg, source, source_ref, split) for split in splits}


def _settings(cfg: ShardConfig, source: Source, split: str) -> dict[str, Any]:
    return {**source.settings(), "split": split, "samples_per_shard": cfg.samples_per_shard, "encoding": cfg.encoding}


def _settings_digest(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def _shard_split(cfg: ShardConfig, source: Source, source_ref: ray.ObjectRef, split: str) -> ShardIndex:
    classes = source.classes(split)
    total = source.size(split)
    if total == 0:
        raise SourceError(f"{cfg.source}: split {split!r} has no samples")
    settings = _settings(cfg, source, split)
    digest = _settings_digest(settings)
    fs, root = filesystem(cfg.out)
    existing = _existing_index(cfg.out, split, settings)
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
    pending = {
        _write_shard.remote(source_ref, split, j, first, count, cfg.out, cfg.encoding, len(classes), digest): j
        for j, first, count in todo
    }
    failure: Exception | None = None
    try:
        # On a failure the other shards still finish, so that complete shards are kept
        # and a rerun after fixing the input has less to do; the first error is raised.
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            j = pending.pop(ready[0])
            try:
                done[j] = ray.get(ready[0])
                bar.update(done[j]["info"]["count"])
            except ray.exceptions.RayTaskError as exc:
                cause = exc.cause if isinstance(exc.cause, Exception) else exc
                failure = failure or (type(cause)(str(cause)) if isinstance(cause, (ShardError, SourceError)) else cause)
    finally:
        bar.close()
    if failure is not None:
        raise failure
    records = [done[j] for j, _, _ in plan]
    index = ShardIndex(
        split=split,
        classes=classes,
        image_format=_one_or_mixed({f for r in records for f in r["formats"]}),
        image_shape=_common_shape(records, cfg, split),
        has_boxes=all(r["has_boxes"] for r in records),
        shards=[ShardInfo(**r["info"]) for r in records],
        settings=settings | {"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
    )
    write_index(cfg.out, index)
    print(f"[shard] {split}: {index.num_samples} samples in {len(index.shards)} shards -> {join(cfg.out, index_name(split))}")
    return index


def _existing_index(out: str, split: str, settings: dict[str, Any]) -> ShardIndex | None:
    fs, root = filesystem(out)
    if not fs.exists(join(root, index_name(split))):
        return None
    index = read_index(out, split)
    old = {k: v for k, v in index.settings.items() if k != "created"}
    if old != settings:
        field_name = next(k for k in sorted(set(old) | set(settings)) if old.get(k) != settings.get(k))
        raise ShardError(
            f"{join(root, index_name(split))}: already holds split {split!r} sharded with other settings "
            f"({field_name}: {old.get(field_name)!r} there, {settings.get(field_name)!r} now); "
            "choose another OUT, nothing was overwritten"
        )
    return index


def _completed(fs, root: str, name: str, digest: str, first: int, count: int) -> dict[str, Any] | None:
    """The completion record of a shard whose bytes still match it, else None."""
    record_path = join(root, PROGRESS_DIR, f"{name}.json")
    shard_path = join(root, name)
    if not (fs.exists(record_path) and fs.exists(shard_path)):
        return None
    record = json.loads(fs.cat_file(record_path))
    info = record["info"]
    if record.get("settings") != digest or (info["first_id"], info["count"]) != (first, count):
        return None
    if fs.size(shard_path) != info["bytes"] or hashlib.sha256(fs.cat_file(shard_path)).hexdigest() != info["sha256"]:
        return None
    return record


def _one_or_mixed(formats: set[str]) -> str:
    return formats.pop() if len(formats) == 1 else "mixed"


def _common_shape(records: list[dict[str, Any]], cfg: ShardConfig, split: str) -> list[int] | None:
    shapes = {tuple(s) for r in records for s in r["shapes"]}
    if len(shapes) == 1:
        return list(shapes.pop())
    if any(RAW_FORMAT in r["formats"] for r in records):
        raise ShardError(f"{cfg.out}: split {split}: raw pixels need images of one size, found {sorted(shapes)[:4]}; use --encoding keep")
    return None


def _validate(record: Record, sample_id: int, num_classes: int, encoding: Encoding) -> tuple[Sample, tuple[int, int]]:
    key = sample_key(sample_id)
    if not 0 <= record.label < num_classes:
        raise SourceError(f"{record.origin}: sample {key}: label {record.label} outside 0..{num_classes - 1}")
    if isinstance(record.image, np.ndarray):
        pixels = record.image
        sample = Sample(sample_id, record.label, pixels.tobytes(), RAW_FORMAT, record.box)
    else:
        sample = Sample(sample_id, record.label, record.image, record.fmt, record.box)
        try:
            pixels = decode_image(sample, None, record.origin)
        except ShardError as exc:
            raise SourceError(str(exc)) from None
        if encoding == "raw":
            sample = Sample(sample_id, record.label, np.ascontiguousarray(pixels).tobytes(), RAW_FORMAT, record.box)
    if pixels.ndim != 3 or pixels.shape[2] != 3 or pixels.dtype != np.uint8:
        raise SourceError(f"{record.origin}: sample {key}: pixels of shape {pixels.shape} {pixels.dtype}, expected (H, W, 3) uint8")
    return sample, pixels.shape[:2]


@ray.remote(num_cpus=1)
def _write_shard(source: Source, split: str, j: int, first: int, count: int, out: str, encoding: Encoding, num_classes: int, digest: str) -> dict[str, Any]:
    samples, shapes = [], set()
    for offset, record in enumerate(source.read(split, first, count)):
        sample, shape = _validate(record, first + offset, num_classes, encoding)
        samples.append(sample)
        shapes.add(shape)
    data = encode_shard(samples)
    name = shard_name(split, j)
    fs, root = filesystem(out)
    write_atomic(fs, join(root, name), data)
    info = ShardInfo(name=name, first_id=first, count=count, bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    record = {
        "settings": digest,
        "info": asdict(info),
        "formats": sorted({s.fmt for s in samples}),
        "shapes": sorted(shapes),
        "has_boxes": all(s.box is not None for s in samples),
    }
    write_atomic(fs, join(root, PROGRESS_DIR, f"{name}.json"), json.dumps(record).encode())
    return record
