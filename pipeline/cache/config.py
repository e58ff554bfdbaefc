"""Settings of a cache build and the identity they give (DESIGN section 6)."""

from __future__ import annotations

import dataclasses
import functools
import typing
from dataclasses import dataclass
from typing import Literal

from catkd.errors import ConfigError
from catkd.models import list_models
from pipeline.cache.identity import CacheIdentity, StorageForm, identity_of
from pipeline.cache.teacher import CacheBuildError, Precision
from pipeline.data.shard_format import ShardIndex
from pipeline.data.views import DECODERS, MEAN_STD, RENDERERS, AugmentSpec
from pipeline.settings import check_value


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
    channels_last: bool = (
        True  # NHWC convolutions: 1.2-1.3x faster on CPU (docs/cache.md) and on GPUs; rounding only, not identity
    )
    feed_tasks: int | None = None  # shards rendering at once; default: the CPUs the actors leave free (at least 1)
    chunk_views: int = 512  # views per chunk streamed from a feed task to an actor
    orphan_lease_s: float = 3600.0  # uncommitted data folders older than this are leftovers of crashed writers
    # Where views are rendered and who decodes JPEGs (both part of the identity). auto:
    # on the teacher's GPU with nvJPEG when actors have GPUs, on the host CPUs otherwise.
    renderer: Literal["auto", "cpu", "device"] = "auto"
    decoder: Literal["auto", "cpu", "nvjpeg"] = "auto"
    progress: bool = True

    def __post_init__(self) -> None:
        for name, value in dataclasses.asdict(self).items():
            check_value(name, value, _hints()[name])
        for name, low in (
            ("num_views", 1),
            ("resolution", 1),
            ("actors", 1),
            ("cpus_per_actor", 1),
            ("batch_size", 1),
            ("chunk_views", 1),
            ("spec_seed", 0),
        ):
            if getattr(self, name) < low:
                raise ConfigError(f"{name}: must be at least {low}, got {getattr(self, name)}")
        if self.gpus_per_actor < 0:
            raise ConfigError(f"gpus_per_actor: must not be negative, got {self.gpus_per_actor}")
        if self.feed_tasks is not None and self.feed_tasks < 1:
            raise ConfigError(f"feed_tasks: must be at least 1, got {self.feed_tasks}")
        if self.spec not in MEAN_STD:
            raise ConfigError(f"spec: expected one of {', '.join(MEAN_STD)}, got {self.spec!r}")
        if self.teacher not in list_models():
            raise ConfigError(f"teacher: unknown model {self.teacher!r}; `catkd models` lists them")

    def augment_spec(self) -> AugmentSpec:
        """The spec every part of the build renders with: made here, nowhere else."""
        on_gpu = self.gpus_per_actor > 0
        renderer = self.renderer if self.renderer != "auto" else ("device" if on_gpu else "cpu")
        decoder = self.decoder if self.decoder != "auto" else ("nvjpeg" if renderer == "device" and on_gpu else "cpu")
        if renderer not in RENDERERS or decoder not in DECODERS:
            raise ConfigError(
                f"renderer must be auto, {' or '.join(RENDERERS)} and decoder auto, {' or '.join(DECODERS)}; got "
                f"{self.renderer!r}, {self.decoder!r}"
            )
        if (renderer == "device" or decoder == "nvjpeg") and not on_gpu:
            raise CacheBuildError(
                f"renderer {renderer} with decoder {decoder} runs on the teacher's GPU, but the actors have none "
                "(--gpus-per-actor 0): use --renderer cpu --decoder cpu, or give the actors a GPU"
            )
        return AugmentSpec.preset(self.spec, self.spec_seed, renderer=renderer, decoder=decoder)


@functools.cache
def _hints() -> dict:
    return typing.get_type_hints(CacheBuildConfig)


def expected_identity(
    cfg: CacheBuildConfig, index: ShardIndex, weights_sha: str, spec: AugmentSpec | None = None
) -> CacheIdentity:
    """The identity of ``cfg``'s cache; ``spec`` replaces ``cfg.augment_spec()`` for a
    caller that renders otherwise (bench/gpu_check.py's dry run: the device renderer on CPU)."""
    return identity_of(
        teacher=cfg.teacher,
        weights_sha=weights_sha,
        index=index,
        split=cfg.split,
        spec=(spec or cfg.augment_spec()).to_dict(),
        num_views=cfg.num_views,
        resolution=cfg.resolution,
        binarize=cfg.binarize,
        storage=cfg.storage,
        precision=cfg.precision,
    )
