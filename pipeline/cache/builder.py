"""``catkd cache build``: run the teacher once over every (sample, view) of a split
and store its pooled CAM targets and logits (DESIGN section 6).

Ray actors each hold the teacher once (one per GPU, or CPU actors) and process whole
data shards. While the teacher runs on one view's batches, a thread decodes and
augments the next view, so the device does not wait on the CPU.

Commit protocol, which makes reruns resume and concurrent jobs safe:
  1. an actor writes a data shard's zarr group under a fresh, unique folder
     ``data/<uuid>/shard-<j>.zarr`` (no two writers ever touch the same store);
  2. it then creates ``done/shard-<j>.json`` (path, ids, checksums) exclusively: the
     first writer wins, a loser deletes its own copy (the values are identical);
  3. ``manifest.json`` is written last, once every data shard has its record.
A rerun skips data shards with a record; folders without one are leftovers of a
crash and are removed.
"""

from __future__ import annotations

import hashlib
import io
import json
import platform
import posixpath
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import ray
import torch
from tqdm import tqdm

from catkd.losses import teacher_cam_targets
from catkd.models import load_checkpoint
from pipeline.data.views import AugmentSpec, normalize_batch, render_views
from pipeline.cache.identity import CacheIdentity, StorageForm, file_sha256
from pipeline.cache.layout import encode_targets, write_group
from pipeline.ray_setup import init_ray
from pipeline.data.shard_format import ShardIndex, decode_image, load_shard, read_index, sample_key
from pipeline.storage import check_location, create_exclusive, filesystem, join, write_atomic, zarr_store

MANIFEST = "manifest.json"
DONE_DIR = "done"
DATA_DIR = "data"


class CacheBuildError(RuntimeError):
    """The build cannot produce correct targets; the message names shard and sample."""


@dataclass
class CacheBuildConfig:
    data: str  # shards URL
    teacher: str  # architecture name
    weights: str  # URL of the teacher checkpoint (any form catkd.models converts)
    root: str  # cache root URL; the cache goes to <root>/<cache_id>
    split: str = "train"
    num_views: int = 4
    resolution: int = 2
    spec: str = "cifar"
    spec_seed: int = 0
    storage: StorageForm = "float16"
    binarize: bool = False
    actors: int = 1
    gpus_per_actor: float = 0.0  # 0: CPU actors
    cpus_per_actor: int = 1  # Ray sets the actor's torch threads to this
    batch_size: int = 256
    bf16: bool = False  # bf16 autocast (GPU, or CPU); its effect on targets is measured in bench/cache.py
    channels_last: bool = False
    progress: bool = True


def expected_identity(cfg: CacheBuildConfig, index: ShardIndex, weights_sha: str) -> CacheIdentity:
    return CacheIdentity(
        teacher_arch=cfg.teacher,
        teacher_sha256=weights_sha,
        dataset_fingerprint=index.fingerprint,
        split=cfg.split,
        spec=AugmentSpec.preset(cfg.spec, cfg.spec_seed).to_dict(),
        num_views=cfg.num_views,
        resolution=cfg.resolution,
        num_classes=index.num_classes,
        target_kind="binarized_cam" if cfg.binarize else "cam",
        storage=cfg.storage,
    )


def build_cache(cfg: CacheBuildConfig) -> str:
    """Build (or resume) the cache; returns its URL."""
    check_location(cfg.root)
    index = read_index(cfg.data, cfg.split)
    wfs, wpath = filesystem(cfg.weights)
    weights = wfs.cat_file(wpath)
    identity = expected_identity(cfg, index, file_sha256(weights))
    if cfg.storage == "features" and cfg.binarize:
        raise ValueError("the features form stores pooled features; binarised targets are not linear in them")
    teacher = load_checkpoint(io.BytesIO(weights), cfg.teacher, index.num_classes)  # fail fast on a wrong checkpoint
    url = join(cfg.root, identity.cache_id)
    fs, root = filesystem(url)
    if fs.exists(join(root, MANIFEST)):
        print(f"[cache] complete: {url}")
        return url
    fs.makedirs(root, exist_ok=True)
    create_exclusive(fs, join(root, "identity.json"), identity.canonical().encode())
    if cfg.storage == "features":
        head = teacher.head.weight.detach().flatten(1).numpy().astype(np.float32)
        if not fs.exists(join(root, "head.npy")):
            buf = io.BytesIO()
            np.save(buf, head)
            write_atomic(fs, join(root, "head.npy"), buf.getvalue())

    records = {j: rec for j in range(len(index.shards)) if (rec := read_done(fs, root, j)) is not None}
    todo = [j for j in range(len(index.shards)) if j not in records]
    init_ray()
    total_views = index.num_samples * cfg.num_views
    bar = tqdm(total=total_views, unit="views", desc=f"cache {identity.cache_id}", disable=not cfg.progress, file=sys.stderr)
    bar.update(sum(records[j]["count"] for j in records) * cfg.num_views)
    if records:
        bar.write(f"[cache] resuming: {len(records)} of {len(index.shards)} data shards already complete")
    if todo:
        weights_ref = ray.put(weights)
        actors = [
            TeacherActor.options(num_gpus=cfg.gpus_per_actor, num_cpus=cfg.cpus_per_actor).remote(cfg, weights_ref, index, identity, url)
            for _ in range(min(cfg.actors, len(todo)))
        ]
        pool = ray.util.ActorPool(actors)
        try:
            for record in pool.map_unordered(lambda actor, j: actor.process.remote(j), todo):
                records[record["shard"]] = record
                bar.update(record["count"] * cfg.num_views)
        except ray.exceptions.RayTaskError as exc:
            cause = exc.cause if isinstance(exc.cause, Exception) else exc
            raise CacheBuildError(str(cause)) from None
        finally:
            bar.close()
            for actor in actors:
                ray.kill(actor)
    _remove_orphans(fs, root, records)
    write_manifest(fs, root, identity, index, cfg, [records[j] for j in range(len(index.shards))])
    print(f"[cache] {identity.cache_id}: {total_views} views of {index.num_samples} samples -> {url}")
    return url


def read_done(fs, root: str, j: int) -> dict[str, Any] | None:
    path = join(root, DONE_DIR, f"shard-{j:06d}.json")
    return json.loads(fs.cat_file(path)) if fs.exists(path) else None


def _remove_orphans(fs, root: str, records: dict[int, dict[str, Any]]) -> None:
    """Data folders no completion record points to: leftovers of crashed or losing writers."""
    kept = {posixpath.dirname(r["path"]) for r in records.values()}
    data_dir = join(root, DATA_DIR)
    if not fs.exists(data_dir):
        return
    for folder in fs.ls(data_dir, detail=False):
        name = posixpath.relpath(folder.rstrip("/"), root) if folder.startswith(root) else posixpath.join(DATA_DIR, posixpath.basename(folder.rstrip("/")))
        if name not in kept:
            fs.rm(folder, recursive=True)


def _versions() -> dict[str, str]:
    import numcodecs
    import torchvision
    import zarr

    from importlib.metadata import version

    return {
        "catkd": version("catkd"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "zarr": zarr.__version__,
        "numcodecs": numcodecs.__version__,
        "ray": ray.__version__,
        "numpy": np.__version__,
    }


def write_manifest(fs, root: str, identity: CacheIdentity, index: ShardIndex, cfg: CacheBuildConfig, records: list[dict[str, Any]]) -> None:
    manifest = {
        "identity": asdict(identity),
        "cache_id": identity.cache_id,
        "num_samples": index.num_samples,
        "shards": records,
        "arrays": records[0]["arrays"],
        "codecs": {"compressor": "blosc zstd clevel 5 bitshuffle", "layout": "one zarr shard per array, one inner chunk per view"},
        "teacher_weights": cfg.weights,
        "data": cfg.data,
        "build": {"bf16": cfg.bf16, "channels_last": cfg.channels_last, "batch_size": cfg.batch_size},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "versions": _versions(),
        "complete": True,
    }
    write_atomic(fs, join(root, MANIFEST), json.dumps(manifest, indent=1).encode())


def array_checksums(arrays: dict[str, np.ndarray]) -> dict[str, str]:
    return {name: hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest() for name, a in arrays.items()}


@ray.remote
class TeacherActor:
    """Holds the teacher once and turns whole data shards into stored targets."""

    def __init__(self, cfg: CacheBuildConfig, weights: bytes, index: ShardIndex, identity: CacheIdentity, url: str) -> None:
        self.cfg, self.index, self.identity, self.url = cfg, index, identity, url
        self.device = torch.device("cuda" if torch.cuda.is_available() and cfg.gpus_per_actor > 0 else "cpu")
        model = load_checkpoint(io.BytesIO(weights), cfg.teacher, index.num_classes).eval().to(self.device)
        self.model = model.to(memory_format=torch.channels_last) if cfg.channels_last else model
        self.spec = AugmentSpec.preset(cfg.spec, cfg.spec_seed)
        self.prefetch = ThreadPoolExecutor(max_workers=1)

    def process(self, j: int) -> dict[str, Any]:
        info = self.index.shards[j]
        shard_path = join(self.cfg.data, info.name)
        samples = load_shard(self.cfg.data, self.index, info)
        images = [decode_image(s, self.index.image_shape, shard_path) for s in samples]
        ids = np.array([s.id for s in samples], np.int64)
        n, views = len(samples), self.cfg.num_views

        def prepare(view: int) -> tuple[np.ndarray, torch.Tensor]:
            return render_views(self.spec, images, ids, view)

        params_all = np.zeros((n, views, 5), np.int32)
        cams, logits, features = [], [], []
        upcoming = self.prefetch.submit(prepare, 0)
        for view in range(views):
            params, batch = upcoming.result()
            if view + 1 < views:
                upcoming = self.prefetch.submit(prepare, view + 1)  # overlaps the forward passes below
            params_all[:, view] = params
            cam_v, logit_v, feat_v = self._forward(batch)
            self._check_finite(cam_v, logit_v, ids, view, shard_path)
            cams.append(cam_v)
            logits.append(logit_v)
            features.append(feat_v)
        cam = np.stack(cams, axis=1)  # (n, S, C, r, r)
        arrays = encode_targets(self.cfg.storage, cam, np.stack(features, axis=1) if features[0] is not None else None)
        arrays |= {"logits": np.stack(logits, axis=1).astype(np.float16 if self.cfg.storage != "float32" else np.float32), "params": params_all, "ids": ids}
        return self._commit(j, info.first_id, arrays)

    @torch.inference_mode()
    def _forward(self, batch_uint8: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        cams, logits, feats = [], [], []
        r = self.cfg.resolution
        for start in range(0, len(batch_uint8), self.cfg.batch_size):
            x = normalize_batch(self.spec, batch_uint8[start : start + self.cfg.batch_size].to(self.device, non_blocking=True))
            if self.cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.bf16):
                features = self.model.forward_features(x)
                logit, cam = self.model.forward_head(features)
            cams.append(teacher_cam_targets(cam.float(), r, binarize=self.cfg.binarize).cpu())
            logits.append(logit.float().cpu())
            if self.cfg.storage == "features":
                feats.append(torch.nn.functional.adaptive_avg_pool2d(features.float(), r).cpu())
        return torch.cat(cams).numpy(), torch.cat(logits).numpy(), torch.cat(feats).numpy() if feats else None

    @staticmethod
    def _check_finite(cam: np.ndarray, logits: np.ndarray, ids: np.ndarray, view: int, source: str) -> None:
        bad = ~(np.isfinite(cam).reshape(len(ids), -1).all(1) & np.isfinite(logits).all(1))
        if bad.any():
            k = int(np.argmax(bad))
            raise CacheBuildError(f"{source}: sample {sample_key(int(ids[k]))} view {view}: non-finite teacher output (NaN or inf); nothing was stored for this shard")

    def _commit(self, j: int, first_id: int, arrays: dict[str, np.ndarray]) -> dict[str, Any]:
        fs, root = filesystem(self.url)
        rel = posixpath.join(DATA_DIR, uuid.uuid4().hex, f"shard-{j:06d}.zarr")
        write_group(zarr_store(join(self.url, rel)), arrays)
        record = {
            "shard": j,
            "first_id": first_id,
            "count": int(len(arrays["ids"])),
            "path": rel,
            "checksums": array_checksums(arrays),
            "arrays": {name: {"shape": list(a.shape), "dtype": str(a.dtype)} for name, a in arrays.items()},
        }
        if create_exclusive(fs, join(root, DONE_DIR, f"shard-{j:06d}.json"), json.dumps(record).encode()):
            return record
        fs.rm(join(root, posixpath.dirname(rel)), recursive=True)  # another job committed this shard first
        return read_done(fs, root, j)
