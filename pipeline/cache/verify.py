"""``catkd cache info`` and ``catkd cache verify``."""

from __future__ import annotations

import io
import shlex
import sys
import threading
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import ray
import torch
from tqdm import tqdm

from catkd.errors import CatkdError, first_line
from catkd.models import load_checkpoint
from catkd.models.hub_env import hub_env
from pipeline.cache.commit import array_checksums, retire_shards
from pipeline.cache.derive import derive_arrays
from pipeline.cache.identity import file_sha256, parse_storage
from pipeline.cache.layout import ArrayReadError, decode_view, raw_bytes_per_view, read_arrays, stored_arrays
from pipeline.cache.reader import TargetCache
from pipeline.cache.teacher import TeacherRunner, TeacherSettings
from pipeline.data.device_render import batch_views
from pipeline.data.partners import pack_for_device, shard_mix_source
from pipeline.data.shard_format import (
    Sample,
    ShardIndex,
    decode_image,
    load_shard,
    read_index,
    read_samples,
    sample_key,
)
from pipeline.data.views import AugmentSpec, ViewMismatchError, render_views
from pipeline.storage import filesystem, join
from pipeline.weights import read_weights

# Tolerances for recomputed targets, relative to the largest |value| of the sample's
# maps: the storage form's rounding plus what the compute precision lets a recompute
# differ by (another batch size runs other kernels; bf16 keeps 8 bits of mantissa).
# bench/cache.py measures both parts; docs/cache.md gives the figures.
TOLERANCE = {"float32": 1e-4, "float16": 2e-3, "features": 4e-3, "int8": 1.2e-2, "topk": 2e-3}
PRECISION_TOLERANCE = {"fp32": 0.0, "tf32": 1e-2, "bf16": 4e-2}
CHECKS_IN_FLIGHT = 4  # data shards one verify checker checks at once
# A data shard up to this size is read whole by the sampled check: at 100 MB/s, 1 MiB
# takes about 10 ms, less than the object-store round trip (20-50 ms) that reading only
# the samples adds (their offsets first). ImageNet's shards (~110 MB) are read by offsets.
WHOLE_SHARD_BYTES = 1 << 20


def cache_info(url: str) -> dict[str, Any]:
    cache = TargetCache(url)
    ident = cache.identity
    fs, root = filesystem(url)
    stored = fs.du(join(root, "data"), total=True)
    views = cache.manifest["num_samples"] * cache.identity.num_views
    return {
        "url": url,
        "cache_id": cache.manifest["cache_id"],
        "identity": cache.manifest["identity"],
        "arrays": cache.manifest["arrays"],
        "codecs": cache.manifest["codecs"],
        "shards_complete": f"{len(cache.records)}/{len(cache.records)}",
        # CAT resolutions a student may ask of it: r and, exactly, r's divisors (reader.py)
        "serves_resolutions": cache.served_resolutions,
        # a derived cache's lineage: its source (URL and cache_id) and the transform
        "derived_from": cache.manifest.get("derived_from"),
        "bytes_on_storage": stored,
        "size": f"{_human(stored)} on storage for {views:,} views: {stored / views:,.0f} B per view",
        "bytes_per_view": stored / views,
        # uncompressed, from the layout: what the size tables of docs/cache.md count
        "raw_bytes_per_view": raw_bytes_per_view(
            ident.storage,
            ident.num_classes,
            ident.resolution,
            _feature_dim(cache.manifest),
            AugmentSpec.from_dict(ident.spec).num_params,
        ),
        "created": cache.manifest["created"],
        "versions": cache.manifest["versions"],
    }


def _human(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:,.1f} {unit}" if unit != "B" else f"{size:,.0f} B"
        size /= 1000
    raise AssertionError


def _feature_dim(manifest: dict[str, Any]) -> int | None:
    shape = manifest["arrays"].get("features", {}).get("shape")
    return shape[2] if shape else None


def verify_cache(
    url: str,
    *,
    sample_views: int = 2,
    weights: str | None = None,
    seed: int = 0,
    progress: bool = False,
    damaged: list[int] | None = None,
) -> list[str]:
    """Problems found (empty when the cache is sound). Checker actors (``ShardChecker``,
    one per CPU) check the data shards, several at once each; the driver takes results
    as they come and only gathers the problems, so its memory does not grow with the
    cache. ``damaged``, when given, receives the data shards with a problem (what
    ``repair_cache`` retires)."""
    from pipeline.ray_setup import init_ray

    cache = TargetCache(url)
    teacher_bytes = b""
    if sample_views:
        # the URL given, else the one the build read, else (a pretrained teacher) the hub file
        weights_url = weights or cache.manifest.get("teacher_weights")
        teacher_bytes, weights_url = read_weights(cache.identity.teacher_arch, weights_url)
        if file_sha256(teacher_bytes) != cache.identity.teacher_sha256:
            return [f"{weights_url}: not the teacher this cache was built with (sha256 differs)"]
    _say_where_recomputed(cache, sample_views)
    source = _reachable_source(cache)
    init_ray()
    # The manifest is read once, here: each checker gets its head (``cache.manifest``, no
    # shard list) once and each call only its own shard's record, so the bytes moved grow
    # with the shard count, not with its square. A checker loads the teacher and the data
    # index once.
    todo = deque(sorted(cache.records))
    count = min(len(todo), max(1, int(ray.cluster_resources().get("CPU", 1))))
    weights_ref = ray.put(teacher_bytes)
    # A check mostly waits on storage (a shard's arrays, its tar): each checker runs
    # CHECKS_IN_FLIGHT of them at once in threads, with one more queued.
    checker = ray.remote(num_cpus=1, max_concurrency=CHECKS_IN_FLIGHT, runtime_env={"env_vars": hub_env()})(
        ShardChecker
    )
    source_head = (source.url, source.manifest) if source is not None else None
    checkers = [checker.remote(url, cache.manifest, sample_views, weights_ref, seed, source_head) for _ in range(count)]
    pending: dict[Any, tuple[int, Any]] = {}  # call -> (data shard, its checker)

    def submit(actor) -> None:
        j = todo.popleft()
        source_record = source.records.get(j) if source is not None else None
        pending[actor.check.remote(j, cache.records[j], source_record)] = (j, actor)

    for actor in checkers:
        for _ in range(CHECKS_IN_FLIGHT + 1):
            if todo:
                submit(actor)
    problems: list[str] = []
    try:
        with tqdm(total=len(cache.records), unit="shards", desc="verify", disable=not progress, file=sys.stderr) as bar:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                j, actor = pending.pop(ready[0])
                found = ray.get(ready[0])
                problems += found
                if found and damaged is not None:
                    damaged.append(j)
                bar.update(1)
                if todo:
                    submit(actor)
    finally:
        for actor in checkers:
            ray.kill(actor)
    if damaged is not None:
        damaged.sort()
    return sorted(problems)


def _reachable_source(cache: TargetCache) -> TargetCache | None:
    """A derived cache's source, opened, where it can be: verify then also derives each
    shard again from it and compares (``catkd cache derive`` is deterministic)."""
    lineage = cache.manifest.get("derived_from")
    if not lineage:
        return None
    try:
        source = TargetCache(lineage["url"])
    except (CatkdError, OSError) as exc:
        print(
            f"[verify] derived from {lineage['url']}, which cannot be opened ({first_line(exc)}): checked without it",
            file=sys.stderr,
        )
        return None
    if source.identity.cache_id != lineage["cache_id"]:
        print(
            f"[verify] derived from cache {lineage['cache_id']}, but {lineage['url']} now holds "
            f"{source.identity.cache_id}: checked without it",
            file=sys.stderr,
        )
        return None
    print(f"[verify] derived from {lineage['url']}: every shard is derived again from it and compared", file=sys.stderr)
    return source


def repair_cache(url: str, damaged: list[int]) -> str:
    """Retire the ``damaged`` data shards (commit.retire_shards) and return the command
    that rebuilds exactly them: the build's own settings, read from the manifest."""
    cache = TargetCache(url)
    command = rebuild_command(cache)
    fs, root = filesystem(url)
    retire_shards(fs, root, damaged)
    return command


def rebuild_command(cache: TargetCache) -> str:
    """``catkd cache build`` with the settings that made ``cache`` (so its cache_id)."""
    ident, manifest = cache.identity, cache.manifest
    spec = ident.spec
    root = cache.url.rstrip("/").rsplit("/", 1)[0]
    parts = [
        "catkd cache build",
        f"--data {shlex.quote(manifest['data'])}",
        f"--teacher {shlex.quote(ident.teacher_arch)}",
        *([f"--weights {shlex.quote(manifest['teacher_weights'])}"] if manifest.get("teacher_weights") else []),
        f"--root {shlex.quote(root)}",
        f"--split {ident.split}",
        f"--num-views {ident.num_views}",
        f"--resolution {ident.resolution}",
        f"--spec {spec['name']}",
        f"--spec-seed {spec['seed']}",
        f"--storage {ident.storage}",
        f"--precision {ident.precision}",
        f"--renderer {spec.get('renderer', 'cpu')}",
        f"--decoder {spec.get('decoder', 'cpu')}",
        f"--mean {' '.join(map(str, spec['mean']))}",
        f"--std {' '.join(map(str, spec['std']))}",
    ]
    for stage, off in (("ops", "none"), ("erase", 0.0), ("mix", "none")):  # the augmentation stages in use
        if spec.get(stage, off) != off:
            parts.append(f"--{stage} {spec[stage]}")
    build = manifest.get("build", {})
    # batches as the build made them, so that rebuilt values are bitwise the same
    if "batch_size" in build:
        parts.append(f"--batch-size {build['batch_size']}")
    if "chunk_views" in build:
        parts.append(f"--chunk-views {build['chunk_views']}")
    if build.get("channels_last") is False:
        parts.append("--no-channels-last")
    if ident.target_kind == "binarized_cam":
        parts.append("--binarize")
    if build.get("device") == "cuda":
        parts.append("--gpus-per-actor 1")
    return " ".join(parts)


def recompute_skipped(cache: TargetCache) -> str | None:
    """Why targets cannot be recomputed here, or None."""
    if cache.identity.spec.get("decoder") == "nvjpeg" and not torch.cuda.is_available():
        return "the cache's JPEGs were decoded by nvJPEG, which needs a GPU, and another decoder gives other pixels"
    return None


def _say_where_recomputed(cache: TargetCache, sample_views: int) -> None:
    if sample_views and (reason := recompute_skipped(cache)):
        print(f"[verify] targets not recomputed: {reason}; checksums and finite values are still checked")
    built_on = cache.manifest.get("build", {}).get("device", "cpu")
    if sample_views and built_on == "cuda" and not torch.cuda.is_available():
        precision = cache.identity.precision
        print(
            f"[verify] the cache was built on a GPU in {precision}; no GPU here, so targets are recomputed on the CPU "
            f"in {precision if precision == 'bf16' else 'fp32'} and compared within the {precision} tolerance"
        )


def _render_as_built(
    runner: TeacherRunner,
    shard: Sequence[Sample] | Mapping[int, Sample],
    k: int,
    index,
    j: int,
    view: int,
    stored: np.ndarray,
    source: str,
) -> torch.Tensor:
    """Sample k of data shard j (``shard``: its samples, all of them for a mixing spec,
    else at least sample k) in view ``view``, (1, 3, H, W) uint8, made by the renderer
    the cache was built with from the view's ``stored`` parameters (the shard's, (n, P));
    a mixing spec's partner replays its own stored view of the same index."""
    spec, sample, name = runner.spec, shard[k], index.shards[j].name
    ids, first = np.array([sample.id]), index.shards[j].first_id
    partner_stored = lambda p: stored[p.id - first]  # noqa: E731
    if spec.renderer == "device":
        packed = pack_for_device(
            spec, [sample], [shard], view, index.image_shape, name, stored[k : k + 1], partner_stored, source
        )
        return batch_views(spec, {n: torch.from_numpy(a) for n, a in packed.items()}, runner.device, source)[0]
    mixing = shard_mix_source([shard], index.image_shape, name, partner_stored) if spec.mixes else None
    image = decode_image(sample, index.image_shape, name)
    return render_views(spec, [image], ids, view, stored[k : k + 1], source, mixing=mixing)[1]


class ShardChecker:
    """Checks data shards of one cache (a Ray actor of ``verify_cache``): that each reads
    back (every chunk's crc32c), matches its recorded sha256s and holds finite values,
    then recomputes ``sample_views`` random (sample, view) pairs with the teacher, loaded
    once, in the build's precision (on a GPU when the build used one and one is here)."""

    def __init__(
        self,
        url: str,
        head: dict[str, Any],
        sample_views: int,
        weights: bytes,
        seed: int,
        source: tuple[str, dict[str, Any]] | None = None,
    ) -> None:
        self.url, self.sample_views, self.weights, self.seed = url, sample_views, weights, seed
        # a derived cache's source (URL, manifest head), reachable: each shard is derived again
        self.source = TargetCache(source[0], source[1] | {"shards": []}).with_records([]) if source else None
        self.runner: TeacherRunner | None = None
        self.index: ShardIndex | None = None
        # one store and head weight for every call, made here before calls run in threads
        self.cache = TargetCache(url, head | {"shards": []}).with_records([])
        self.loading = threading.Lock()  # calls run in threads: the teacher is loaded once

    def check(self, j: int, record: dict[str, Any], source_record: dict[str, Any] | None = None) -> list[str]:
        url, cache = self.url, self.cache.with_records([record])
        try:  # every array's shard in one round of concurrent reads
            arrays = read_arrays(cache.store(j), {name: slice(None) for name in record["checksums"]})
        except ArrayReadError as exc:  # zarr's shard-index and chunk crc32c checks, codec errors, missing objects
            return [f"{url}: data shard {j} (samples from {sample_key(record['first_id'])}): unreadable ({exc})"]
        problems = []
        for name, digest in array_checksums(arrays).items():
            if digest != record["checksums"][name]:
                problems.append(f"{url}: data shard {j}: array {name} does not match its checksum")
        for name, values in arrays.items():
            if values.dtype.kind == "f" and not np.isfinite(values).all():
                k = int(np.argwhere(~np.isfinite(values))[0][0])
                problems.append(f"{url}: data shard {j}: sample {sample_key(int(arrays['ids'][k]))}: non-finite {name}")
        if self.source is not None and not problems:
            problems += self._against_source(cache, j, record, source_record)
        if self.sample_views and not problems and recompute_skipped(cache) is None:
            problems += self._recompute(cache, j, arrays)
        return problems

    def _against_source(
        self, cache: TargetCache, j: int, record: dict[str, Any], source_record: dict[str, Any] | None
    ) -> list[str]:
        """Data shard ``j`` derived again from the source's, compared array by array."""
        where = f"{self.url}: data shard {j}"
        if source_record is None:
            return [f"{where}: its source {self.source.url} has no data shard {j}"]
        source = self.source.with_records([source_record])
        try:
            arrays = read_arrays(source.store(j), {name: slice(None) for name in source_record["checksums"]})
        except ArrayReadError as exc:
            return [f"{where}: its source's shard is unreadable ({exc}): derive from a sound source"]
        derived = derive_arrays(arrays, source.identity, cache.identity)
        return [
            f"{where}: array {name} differs from what {self.source.url} derives"
            for name, digest in array_checksums(derived).items()
            if digest != record["checksums"].get(name)
        ]

    def _load_teacher(self, cache: TargetCache) -> None:
        ident = cache.identity
        teacher = load_checkpoint(io.BytesIO(self.weights), ident.teacher_arch, ident.num_classes)
        built_on = cache.manifest.get("build", {}).get("device", "cpu")
        device = torch.device("cuda" if built_on == "cuda" and torch.cuda.is_available() else "cpu")
        precision = ident.precision if device.type == "cuda" or ident.precision == "bf16" else "fp32"
        settings = TeacherSettings(ident.resolution, ident.target_kind == "binarized_cam", precision, batch_size=1)
        self.runner = TeacherRunner(teacher, AugmentSpec.from_dict(ident.spec), settings, device)
        self.index = read_index(cache.manifest["data"], ident.split)

    @staticmethod
    def _view(cache: TargetCache, arrays: dict[str, np.ndarray], view: int) -> dict[str, np.ndarray]:
        """One view of the shard's arrays, already read and checked, decoded as a reader would."""
        form = cache.identity.storage
        one = {"ids": arrays["ids"]} | {
            name: arrays[name][:, view] for name in ("params", "logits", *stored_arrays(form))
        }
        return decode_view(one, form, cache.head_weight, cache.identity.num_classes)

    def draws(self, j: int, num_views: int, count: int) -> list[tuple[int, int]]:
        """The (view, sample) pairs of data shard ``j`` that are recomputed: the same for
        every verify with this seed."""
        rng = np.random.default_rng([self.seed, j])
        return [(int(rng.integers(num_views)), int(rng.integers(count))) for _ in range(self.sample_views)]

    def _recompute(self, cache: TargetCache, j: int, arrays: dict[str, np.ndarray]) -> list[str]:
        """``sample_views`` random (sample, view) pairs of data shard ``j``, recomputed and
        compared with its ``arrays``."""
        with self.loading:
            if self.runner is None:
                self._load_teacher(cache)
        ident, runner, index = cache.identity, self.runner, self.index
        tolerance = TOLERANCE[parse_storage(ident.storage)[0]] + PRECISION_TOLERANCE[ident.precision]
        logit_tolerance = TOLERANCE["float16"] + PRECISION_TOLERANCE[ident.precision]
        info = index.shards[j]
        draws = self.draws(j, ident.num_views, info.count)
        # Only the drawn samples' bytes, where the shard job stored their offsets and no
        # partner is needed; a mixing spec's partners (or an older shard) need it whole,
        # and so does a small shard: whole, it is one request where its offsets and then
        # its samples are two rounds, and its bytes cost less than the round trip saved.
        samples = (
            None
            if runner.spec.mixes or info.bytes <= WHOLE_SHARD_BYTES
            else read_samples(cache.manifest["data"], index, info, sorted({k for _, k in draws}))
        )
        if samples is None:
            samples = load_shard(cache.manifest["data"], index, info)
        problems = []
        for view, k in draws:
            stored = self._view(cache, arrays, view)
            sample = samples[k]
            try:
                views = _render_as_built(
                    runner, samples, k, index, j, view, stored["params"], f"{cache.url}: data shard {j}"
                )
            except ViewMismatchError as exc:
                problems.append(str(exc))
                continue
            expected, logits = runner.targets(views)[:2]
            cam_scale, logit_scale = (
                max(float(np.abs(expected[0]).max()), 1e-6),
                max(float(np.abs(logits[0]).max()), 1e-6),
            )
            kept = stored["classes"][k] if "classes" in stored else slice(None)  # a top-k cache: its K classes
            error = float(np.abs(expected[0][kept] - stored["cam"][k]).max()) / cam_scale
            logit_error = float(np.abs(logits[0][kept] - stored["logits"][k][kept]).max()) / logit_scale
            if "classes" in stored and len(kept) < len(logits[0]):
                # the stored classes are the teacher's top K: no other class beats the lowest kept one
                others = np.delete(logits[0], kept)
                logit_error = max(logit_error, float(others.max() - logits[0][kept].min()) / logit_scale)
            if error > tolerance or logit_error > logit_tolerance:
                problems.append(
                    f"data shard {j}: sample {sample_key(sample.id)} view {view}: stored targets differ from the "
                    "teacher's "
                    f"(relative error {error:.2e} in CAMs, {logit_error:.2e} in logits; {ident.storage} in "
                    f"{ident.precision} allows {tolerance:.1e})"
                )
        return problems
