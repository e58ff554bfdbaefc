"""``catkd cache derive``: a new cache computed from an existing one, without the teacher.

What a cache holds fixes what can be derived from it:

    --storage FORM     a dense source (float32, float16, int8) -> any dense form or topk:K;
                       topk:K -> topk:K' for K' <= K; features -> features (the other forms
                       need the teacher's maps of every class, which a top-k or features
                       cache does not hold in that form)
    --num-views S'     the first S' of the source's S views: a view's parameters depend on
                       (seed, sample id, view index) only, so they are the views a build
                       with S' views makes
    --resolution R'    a divisor of the source's r that the source serves exactly
                       (TargetCache.served_resolutions): the stored maps average-pooled again

The transform is one function of a data shard's stored arrays (``derive_arrays``), run
shard by shard as Ray tasks and committed with the build's protocol (a fresh folder per
writer, the completion record by conditional write, orphans swept, the manifest last), so
a derive resumes, runs beside another derive of the same cache, and never writes under
the source. Its identity is the source's with the new storage, views and resolution and
``derived_from`` (the source's cache_id and the transform): two derivations of one source
with the same settings are the same cache.
"""

from __future__ import annotations

import dataclasses
import sys
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
import torch
from tqdm import tqdm

from catkd.errors import ConfigError
from pipeline.cache.commit import (
    DONE_BATCH_DIR,
    MANIFEST,
    commit_shard,
    done_records,
    remove_orphans,
    start_cache,
    write_manifest,
)
from pipeline.cache.identity import CacheIdentity, check_topk, parse_storage
from pipeline.cache.layout import decode_stored, encode_targets, read_arrays, stored_arrays
from pipeline.cache.reader import TargetCache
from pipeline.record_batches import RecordBatcher
from pipeline.settings import check_fields
from pipeline.storage import check_location, filesystem, join

SHARDS_IN_FLIGHT_PER_CPU = 2  # a task mostly waits on storage (read the source shard, write its own)


@dataclass
class DeriveConfig:
    source: str  # the cache derived from (a complete cache's URL)
    root: str  # where the derived cache goes: ROOT/<its cache_id>
    storage: str | None = None  # the new storage form (default: the source's)
    num_views: int | None = None  # the first S' views (default: all of the source's)
    resolution: int | None = None  # a divisor of the source's r it serves exactly (default: its r)
    progress: bool = True
    orphan_lease_s: float = 3600.0  # as a build's: a folder younger than this may be a live writer's

    def __post_init__(self) -> None:
        check_fields(self, at_least={"num_views": 1, "resolution": 1, "orphan_lease_s": 0})
        if self.storage is not None:
            parse_storage(self.storage)


def plan(cfg: DeriveConfig, source: TargetCache) -> CacheIdentity:
    """The derived cache's identity; a transform the source cannot give is a ConfigError
    naming the option."""
    src = source.identity
    storage = cfg.storage or src.storage
    views = cfg.num_views or src.num_views
    resolution = cfg.resolution or src.resolution
    src_kind, src_k = parse_storage(src.storage)
    kind, k = parse_storage(storage)
    check_topk(storage, src.num_classes)
    if src_kind == "topk" and (kind != "topk" or k > src_k):
        raise ConfigError(
            f"storage: {source.url} keeps the top {src_k} classes per view (storage {src.storage}); it gives "
            f"topk:K for K <= {src_k} only, not {storage} (build that from the teacher, or derive from a dense cache)"
        )
    if (src_kind == "features") != (kind == "features"):
        raise ConfigError(
            f"storage: {storage} from a {src.storage} cache needs the teacher's "
            f"{'pooled features' if kind == 'features' else 'maps as the teacher computed them'}: build it instead"
        )
    if not 1 <= views <= src.num_views:
        raise ConfigError(f"num_views: {source.url} holds {src.num_views} views per sample; got {views}")
    if resolution not in source.served_resolutions:
        raise ConfigError(
            f"resolution: {source.url} serves resolution {', '.join(map(str, source.served_resolutions))} "
            f"exactly; got {resolution}"
        )
    transform = {"storage": storage, "num_views": views, "resolution": resolution}
    if transform == {"storage": src.storage, "num_views": src.num_views, "resolution": src.resolution}:
        raise ConfigError(f"{source.url}: nothing to derive: give --storage, --num-views or --resolution")
    return dataclasses.replace(
        src,
        storage=storage,
        num_views=views,
        resolution=resolution,
        derived_from={"cache_id": src.cache_id, "transform": transform},
    )


def derive_arrays(arrays: dict[str, np.ndarray], source: CacheIdentity, target: CacheIdentity) -> dict[str, np.ndarray]:
    """One data shard's stored arrays in the source's form -> in the target's: the first
    S' views, the maps pooled to r', re-encoded (``layout.encode_targets``, as a build
    encodes). A dense float32 source gives what a build of the target settings stores;
    from float16 the values went through float16 once more (for pooled maps and a top-k
    form's leftover logit: within float16 rounding)."""
    views = target.num_views
    out = {"ids": arrays["ids"], "params": arrays["params"][:, :views]}
    form, kind = source.storage, parse_storage(source.storage)[0]
    stored = {name: arrays[name][:, :views] for name in ("logits", *stored_arrays(form))}
    n = len(arrays["ids"])
    factor = source.resolution // target.resolution

    def pool(maps: np.ndarray) -> np.ndarray:  # (..., r, r) float32 -> (..., r', r'), exact average pools
        if factor == 1:
            return maps
        r = target.resolution
        return (
            maps.reshape(*maps.shape[:-2], r, factor, r, factor)
            .mean(axis=(-3, -1), dtype=np.float64)
            .astype(np.float32)
        )

    if kind == "features":
        features = pool(stored["features"].astype(np.float32))
        logits = stored["logits"].astype(np.float32)
        return out | encode_targets(target.storage, None, logits, features)
    flat = {
        name: torch.from_numpy(np.ascontiguousarray(a.reshape(n * views, *a.shape[2:]))) for name, a in stored.items()
    }
    cam, logits, classes = decode_stored(flat, None, source.num_classes)
    cam = pool(cam.numpy()).reshape(n, views, *cam.shape[1:-2], target.resolution, target.resolution)
    logits = logits.numpy().reshape(n, views, -1)
    if classes is not None:  # top-k -> top-k': the first K' kept classes, highest first
        k = parse_storage(target.storage)[1]
        classes = classes.numpy().reshape(n, views, -1)[..., :k]
        cam = cam[:, :, :k]
    return out | encode_targets(target.storage, cam, logits, None, classes)


class ShardDeriver:
    """Derives data shards of one cache (a Ray actor of ``derive_cache``; several shards
    at once in threads): reads a source shard's arrays in one concurrent round, derives
    and commits them."""

    def __init__(self, source_url: str, source_head: dict[str, Any], target: CacheIdentity, url: str) -> None:
        self.source = TargetCache(source_url, source_head | {"shards": []}).with_records([])
        self.target, self.url = target, url

    def derive(self, record: dict[str, Any]) -> dict[str, Any]:
        source = self.source.with_records([record])
        j = record["shard"]
        arrays = read_arrays(source.store(j), dict.fromkeys(record["checksums"], slice(None)))
        derived = derive_arrays(arrays, source.identity, self.target)
        return commit_shard(self.url, j, record["first_id"], derived)


def derive_cache(cfg: DeriveConfig) -> str:
    """Derive (or resume deriving) the cache; returns its URL."""
    from pipeline.ray_setup import init_ray

    check_location(cfg.root)
    source = TargetCache(cfg.source)
    target = plan(cfg, source)
    url = join(cfg.root, target.cache_id)
    fs, root = filesystem(url)
    if fs.exists(join(root, MANIFEST)):
        print(f"[cache] complete: {url}")
        return url
    head = source.head_weight if parse_storage(target.storage)[0] == "features" else None
    start_cache(fs, root, target, head)
    count = len(source.records)
    records = done_records(fs, root, count)
    todo = deque(j for j in range(count) if j not in records)
    if records:
        print(f"[cache] resuming: {len(records)} of {count} data shards already derived", file=sys.stderr)
    if todo:
        init_ray()
        workers = max(1, int(ray.cluster_resources().get("CPU", 1)))
        deriver = ray.remote(num_cpus=1, max_concurrency=SHARDS_IN_FLIGHT_PER_CPU)(ShardDeriver)
        actors = [deriver.remote(cfg.source, source.manifest, target, url) for _ in range(min(workers, len(todo)))]
        batcher = RecordBatcher(fs, join(root, DONE_BATCH_DIR))
        pending: dict[Any, Any] = {}

        def submit(actor) -> None:
            pending[actor.derive.remote(source.records[todo.popleft()])] = actor

        bar = tqdm(
            total=count,
            initial=len(records),
            unit="shards",
            desc=f"derive {target.cache_id}",
            disable=not cfg.progress,
            file=sys.stderr,
        )
        try:
            for actor in actors:
                for _ in range(SHARDS_IN_FLIGHT_PER_CPU + 1):
                    if todo:
                        submit(actor)
            while pending:  # results as they come, a bounded window in flight
                (ready,), _ = ray.wait(list(pending), num_returns=1)
                actor = pending.pop(ready)
                record = ray.get(ready)
                records[record["shard"]] = record
                batcher.add(record)
                bar.update(1)
                if todo:
                    submit(actor)
        finally:
            batcher.flush()
            bar.close()
            for actor in actors:
                ray.kill(actor)
    remove_orphans(fs, root, records, cfg.orphan_lease_s)
    write_manifest(
        fs,
        root,
        target,
        source.manifest["num_samples"],
        [records[j] for j in range(count)],
        teacher_weights=source.manifest.get("teacher_weights"),
        data=source.manifest["data"],
        build=source.manifest.get("build", {}),
        cam_size=source.manifest.get("teacher_cam_size"),
        derived_from={"url": cfg.source, **target.derived_from},
    )
    views = source.manifest["num_samples"] * target.num_views
    print(f"[cache] {target.cache_id}: {views} views derived from {source.identity.cache_id} -> {url}")
    return url
