"""``catkd cache build``: run the teacher once over every (sample, view) of a split
and store its pooled CAM targets and logits (DESIGN section 6).

Two kinds of Ray workers, so that a GPU teacher never waits on one CPU core:

- **feed tasks** (``pipeline.cache.feed.render_chunks`` as Ray generator tasks, one
  CPU each, one per data shard): read the shard, decode each sample once, render
  all S views with the one view renderer, and stream them as uint8 chunks;
- **teacher actors** (one per GPU, or CPU actors): hold the teacher once and turn
  each chunk into targets (``pipeline.cache.teacher``); a data shard's targets are
  committed when its last chunk is in.

The driver only passes object references: it starts the feed tasks of the next
shards ahead of the actors (so the next shard renders while the teacher runs the
current one), with back-pressure of two unconsumed chunks per shard, and forwards
each chunk to the actor that owns the shard. CPU tasks feeding actors were chosen
over Ray Data's CPU and GPU actor stages because a data shard's S views must all
reach the one writer of that shard's zarr group, in order, which a per-shard stream
gives directly (docs/cache.md).

Shards are committed and the cache completed by the protocol of ``pipeline.cache.commit``,
which makes reruns resume and concurrent builds safe.
"""

from __future__ import annotations

import io
import sys
import threading
import time
import warnings
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray
import torch
from tqdm import tqdm

from catkd.errors import ConfigError, user_error
from catkd.models import load_checkpoint
from catkd.models.hub_env import hub_env
from pipeline.cache.commit import (
    DONE_BATCH_DIR,
    MANIFEST,
    commit_shard,
    done_records,
    remove_orphans,
    start_cache,
    write_build_manifest,
)
from pipeline.cache.config import CacheBuildConfig, expected_identity
from pipeline.cache.feed import FeedChunk, render_chunks
from pipeline.cache.identity import check_topk, file_sha256
from pipeline.cache.teacher import (
    CacheBuildError,
    ShardTargets,
    TeacherRunner,
    TeacherSettings,
    build_device,
)
from pipeline.data.host_images import FALLBACK_REASONS, describe_fallbacks
from pipeline.data.shard_format import ShardIndex, read_index
from pipeline.ray_setup import check_request_fits, init_ray
from pipeline.record_batches import RecordBatcher
from pipeline.storage import check_location, filesystem, join
from pipeline.weights import read_weights


def build_cache(cfg: CacheBuildConfig, timing: BuildTiming | None = None) -> str:
    """Build (or resume) the cache; returns its URL. ``timing``, when given, receives
    where the time went (also printed)."""
    timing = timing or BuildTiming()
    cfg.augment_spec()  # a renderer the actors cannot run is refused before anything is read
    check_location(cfg.root)
    index = read_index(cfg.data, cfg.split)
    check_topk(cfg.storage, index.num_classes)
    weights, source = read_weights(cfg.teacher, cfg.weights)
    if cfg.weights is None:
        print(f"[cache] teacher {cfg.teacher}: pretrained weights {source}", file=sys.stderr)
    identity = expected_identity(cfg, index, file_sha256(weights))
    if cfg.storage == "features" and cfg.binarize:
        raise ConfigError("the features form stores pooled features; binarised targets are not linear in them")
    teacher = load_checkpoint(io.BytesIO(weights), cfg.teacher, index.num_classes)  # fail fast on a wrong checkpoint
    url = join(cfg.root, identity.cache_id)
    fs, root = filesystem(url)
    if fs.exists(join(root, MANIFEST)):
        print(f"[cache] complete: {url}")
        return url
    head = teacher.head.weight.detach().flatten(1).numpy().astype(np.float32) if cfg.storage == "features" else None
    start_cache(fs, root, identity, head)
    records = done_records(fs, root, len(index.shards))
    todo = [j for j in range(len(index.shards)) if j not in records]
    resumed = bool(records)  # records fills in as shards commit below
    init_ray(verbose=cfg.verbose)
    total_views = index.num_samples * cfg.num_views
    bar = tqdm(
        total=total_views, unit="views", desc=f"cache {identity.cache_id}", disable=not cfg.progress, file=sys.stderr
    )
    bar.update(sum(records[j]["count"] for j in records) * cfg.num_views)
    if records:
        bar.write(f"[cache] resuming: {len(records)} of {len(index.shards)} data shards already complete")
    if todo:
        batcher = RecordBatcher(fs, join(root, DONE_BATCH_DIR))
        try:
            timing.teachers = _run_actors(
                cfg, index, url, weights, todo, records, batcher, lambda n: bar.update(n * cfg.num_views)
            )
        finally:
            batcher.flush()
            bar.close()
    remove_orphans(fs, root, records, cfg.orphan_lease_s)
    if resumed and todo:  # a resumed or repaired cache: say how much was redone
        print(f"[cache] rebuilt {len(todo)} of {len(index.shards)} shards")
    write_build_manifest(fs, root, identity, index, cfg, records, teacher_cam_size(teacher, cfg.augment_spec().size))
    print(f"[cache] {identity.cache_id}: {total_views} views of {index.num_samples} samples -> {url}")
    timing.ended_at = time.time()
    if timing.teachers:
        print(timing.summary(cfg.num_views))
    return url


def teacher_cam_size(teacher: torch.nn.Module, side: int) -> tuple[int, int]:
    """The (h, w) of the teacher's CAMs before pooling, for views of ``side`` pixels: the
    cache serves a coarser resolution exactly where its r x r cells tile them evenly."""
    with torch.no_grad():
        _, cam = teacher.eval()(torch.zeros(1, 3, side, side))
    return int(cam.shape[-2]), int(cam.shape[-1])


@dataclass
class TeacherTiming:
    """One teacher actor's time."""

    ready_at: float  # wall clock when the actor held its teacher
    busy_s: float = 0.0  # computing targets (forward, pooling); the rest it waited for views
    views: int = 0
    done_at: float = 0.0  # wall clock when its last commit had finished
    decode_fallbacks: list[int] = field(default_factory=lambda: [0] * len(FALLBACK_REASONS))  # by FALLBACK_REASONS


@dataclass
class BuildTiming:
    """Where a build's time went. Teachers busy most of the time they were held means
    the build ran at the teachers' speed; a low figure means they waited for the feed."""

    started_at: float = field(default_factory=time.time)
    ended_at: float = 0.0
    teachers: list[TeacherTiming] = field(default_factory=list)

    @property
    def views(self) -> int:
        return sum(t.views for t in self.teachers)

    @property
    def startup_s(self) -> float:
        """From the command's start until the first teacher was ready."""
        return min(t.ready_at for t in self.teachers) - self.started_at

    @property
    def busy_fraction(self) -> float:
        return sum(t.busy_s for t in self.teachers) / sum(t.done_at - t.ready_at for t in self.teachers)

    @property
    def busy_views_per_s(self) -> float:
        """Views/s of the teachers while busy: their own speed inside the build."""
        return self.views / sum(t.busy_s for t in self.teachers)

    @property
    def decode_fallbacks(self) -> np.ndarray:
        """Images decoded on the host although the decoder is nvjpeg, by FALLBACK_REASONS."""
        return (
            np.sum([t.decode_fallbacks for t in self.teachers], axis=0)
            if self.teachers
            else np.zeros(len(FALLBACK_REASONS), np.int64)
        )

    def summary(self, num_views: int = 1) -> str:
        wall = self.ended_at - self.started_at
        line = (
            f"[cache] built {self.views:,} views in {wall:.1f} s ({self.views / wall:,.0f} views/s); teachers busy "
            f"{self.busy_fraction:.0%} of the time they were held ({self.busy_views_per_s:,.0f} views/s while busy); "
            f"the first was ready after {self.startup_s:.1f} s"
        )
        fallbacks = describe_fallbacks(self.decode_fallbacks, self.views // max(1, num_views))
        return line + (f"\n[cache] {fallbacks}" if fallbacks else "")


def _run_actors(
    cfg: CacheBuildConfig,
    index: ShardIndex,
    url: str,
    weights: bytes,
    todo: list[int],
    records: dict[int, dict[str, Any]],
    batcher: RecordBatcher,
    progress: Callable[[int], None],
) -> list[TeacherTiming]:
    """Feed tasks render the data shards in ``todo``; teacher actors turn them into
    committed targets (``records`` and ``batcher`` get each shard's completion record).
    Returns the timing of each actor that took part."""
    resources = ray.cluster_resources()
    if cfg.gpus_per_actor > 0 and resources.get("GPU", 0) < cfg.gpus_per_actor:
        raise CacheBuildError(
            f"asked for {cfg.gpus_per_actor} GPU per teacher actor, but the Ray cluster has no GPU "
            f"({resources.get('GPU', 0)} in all)"
        )
    check_request_fits({"CPU": cfg.cpus_per_actor, "GPU": cfg.gpus_per_actor}, 1, "catkd cache build's teacher actor")
    cpus = int(resources.get("CPU", 1))
    actor_count = min(cfg.actors, len(todo))
    free = cpus - actor_count * cfg.cpus_per_actor
    feed_tasks = cfg.feed_tasks or max(1, free)
    # Feed tasks of GPU actors reserve a CPU each, from those the actors leave. Feed tasks
    # of CPU actors reserve none: they share the cores the teacher runs on, and a CPU
    # that the actors (of this build, or of another build on the same Ray) hold while
    # they wait for rendered views never frees up for a feed task that would render them.
    feed_cpus = 1 if cfg.gpus_per_actor > 0 and free >= 1 else 0
    if free < 1:
        print(
            f"[cache] {actor_count} actors x {cfg.cpus_per_actor} CPUs hold all {cpus} CPUs: "
            "the feed shares their cores",
            file=sys.stderr,
        )
    chunk_samples = max(1, cfg.chunk_views // cfg.num_views)
    spec = cfg.augment_spec()
    index_ref, weights_ref = ray.put(index), ray.put(weights)
    # At most two rendered chunks wait per shard: the feed runs ahead, memory stays bounded.
    render = ray.remote(render_chunks).options(num_cpus=feed_cpus, _generator_backpressure_num_objects=2)
    feeds = _FeedQueue(
        todo, lambda j: render.remote(cfg.data, index_ref, j, spec, cfg.num_views, chunk_samples), ahead=feed_tasks
    )
    actors = [
        TeacherActor.options(
            num_gpus=cfg.gpus_per_actor, num_cpus=cfg.cpus_per_actor, runtime_env={"env_vars": hub_env()}
        ).remote(cfg, weights_ref, index_ref, url)
        for _ in range(actor_count)
    ]
    lock, stop = threading.Lock(), threading.Event()
    timings: list[TeacherTiming] = []

    def drive(actor) -> None:
        # An actor takes shards only once Ray has placed it: on a Ray shared with other
        # work (another build, a training) some actors may wait for CPUs, and a shard
        # handed to one of them would wait too. One never placed while work remained
        # gives up; the others did its share.
        placed = actor.__ray_ready__.remote()
        while not ray.wait([placed], timeout=1.0)[0]:
            if stop.is_set() or feeds.empty():
                return
        # Up to two chunks queued at each actor (one computing, one arriving); commits
        # happen in the actor's background thread, so shards follow one another freely.
        in_flight: deque = deque()
        while not stop.is_set() and (item := feeds.next()) is not None:
            j, stream = item
            for chunk_ref in stream:
                in_flight.append(actor.consume.remote(j, chunk_ref))
                while len(in_flight) > 2:
                    collect(*ray.get(in_flight.popleft()))
        while in_flight:
            collect(*ray.get(in_flight.popleft()))
        records, timing = ray.get(actor.flush.remote())
        collect(0, records)
        timings.append(timing)
        ray.kill(actor)  # its CPUs (or GPU) go back now, to whatever else waits for them

    def collect(samples: int, committed: list[dict[str, Any]]) -> None:
        with lock:
            progress(samples)
            for record in committed:
                records[record["shard"]] = record
                batcher.add(record)

    try:
        with ThreadPoolExecutor(len(actors)) as pool:
            futures = [pool.submit(drive, actor) for actor in actors]
            for future in futures:
                try:
                    future.result()
                except Exception:
                    stop.set()
                    raise
    except ray.exceptions.RayTaskError as exc:
        error = user_error(exc)
        if error is exc:
            raise
        raise error from None
    finally:
        for actor in actors:
            ray.kill(actor)
    return timings


class _FeedQueue:
    """Data shards in build order, each with its feed task started ``ahead`` shards
    before an actor takes it (thread-safe: one driver thread per actor takes from it)."""

    def __init__(self, todo: list[int], start: Callable[[int], Any], ahead: int) -> None:
        self.todo, self.started, self.start, self.ahead = deque(todo), deque(), start, ahead
        self.lock = threading.Lock()

    def _top_up(self) -> None:
        while self.todo and len(self.started) < self.ahead:
            j = self.todo.popleft()
            self.started.append((j, self.start(j)))

    def empty(self) -> bool:
        with self.lock:
            return not self.todo and not self.started

    def next(self) -> tuple[int, Any] | None:
        with self.lock:
            self._top_up()
            if not self.started:
                return None
            item = self.started.popleft()
            self._top_up()
            return item


@ray.remote
class TeacherActor:
    """Holds the teacher once; turns the chunks it is sent (in order: a synchronous
    actor) into shard targets, committed in a background thread (zarr's compression is
    CPU work) while the teacher goes on with the next chunks. Each call returns the
    records of the commits finished since the last call; ``flush`` waits for the rest."""

    def __init__(self, cfg: CacheBuildConfig, weights: bytes, index: ShardIndex, url: str) -> None:
        # Chunks arrive as read-only arrays from the object store; the runner copies them
        # to the device (or into a float batch) before anything writes.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        self.cfg, self.index, self.url = cfg, index, url
        device = build_device(cfg.gpus_per_actor)
        model = load_checkpoint(io.BytesIO(weights), cfg.teacher, index.num_classes)
        self.runner = TeacherRunner(model, cfg.augment_spec(), TeacherSettings.from_config(cfg), device)
        self.shards: dict[int, ShardTargets] = {}
        self.committer = ThreadPoolExecutor(2)
        self.commits: list[Future] = []
        self.timing = TeacherTiming(ready_at=time.time())

    def _finished(self, wait_all: bool = False) -> list[dict[str, Any]]:
        done = [f for f in self.commits if wait_all or f.done()]
        self.commits = [f for f in self.commits if f not in done]
        return [f.result() for f in done]  # a failed commit raises here, naming its shard

    def flush(self) -> tuple[list[dict[str, Any]], TeacherTiming]:
        """The records of every commit still pending, and the actor's timing."""
        records = self._finished(wait_all=True)
        self.timing.done_at = time.time()
        return records, self.timing

    def consume(self, j: int, chunk: FeedChunk) -> tuple[int, list[dict[str, Any]]]:
        """(samples computed, completion records of shards committed since the last call)."""
        info = self.index.shards[j]
        targets = self.shards.setdefault(
            j,
            ShardTargets(
                j, info.first_id, info.count, self.cfg.num_views, join(self.cfg.data, info.name), self.cfg.storage
            ),
        )
        start = time.perf_counter()
        targets.add(self.runner, chunk.ids, chunk.params, chunk.views, chunk.images)
        self.timing.busy_s += time.perf_counter() - start
        self.timing.views += len(chunk.ids) * self.cfg.num_views
        if targets.complete:
            del self.shards[j]
            self.timing.decode_fallbacks = (np.array(self.timing.decode_fallbacks) + targets.fallbacks).tolist()
            self.commits.append(self.committer.submit(commit_shard, self.url, j, info.first_id, targets.arrays()))
        return len(chunk.ids), self._finished()
