"""Settings of a cache build and the identity they give (DESIGN section 6)."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.cache.identity import CacheIdentity, StorageForm
from pipeline.cache.teacher import Precision
from pipeline.data.shard_format import ShardIndex
from pipeline.data.views import AugmentSpec


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
    batch_size: int = 256  # views per teacher forward pass
    precision: Precision = "fp32"  # fp32, tf32 (GPU) or bf16 autocast: part of the identity
    channels_last: bool = True  # NHWC convolutions: 1.2-1.3x faster on CPU (docs/cache.md) and on GPUs; rounding only, not identity
    feed_tasks: int | None = None  # shards rendering at once; default: the CPUs the actors leave free (at least 1)
    chunk_views: int = 512  # views per chunk streamed from a feed task to an actor
    orphan_lease_s: float = 3600.0  # uncommitted data folders older than this are leftovers of crashed writers
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
        precision=cfg.precision,
    )
