"""Settings of a cache build and the identity they give (DESIGN section 6)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from catkd.errors import ConfigError
from catkd.models import model_normalization, model_problem
from pipeline.cache.identity import CacheIdentity, StorageForm, identity_of, parse_storage
from pipeline.cache.teacher import CacheBuildError, Precision
from pipeline.data.shard_format import ShardIndex
from pipeline.data.stages import parse_stages
from pipeline.data.views import DECODERS, MEAN_STD, RENDERERS, AugmentSpec
from pipeline.settings import check_fields, check_normalization
from pipeline.weights import check_weights_given


@dataclass
class CacheBuildConfig:
    # The flags of `catkd cache build` are these fields (pipeline.settings.add_flags):
    # each comment is its --help line, each default the only one.
    data: str  # shards URL (from catkd shard)
    teacher: str  # teacher architecture (catkd models)
    root: str  # cache root URL; the cache goes to ROOT/<cache_id>
    # teacher checkpoint URL (ours, torchvision's, timm's, or the reference code base's);
    # default: the hub weights of a pretrained teacher spec (timm:NAME.TAG:pretrained=true,
    # tv_NAME:weights=ENUM), whose sha256 identifies the cache as a file's would
    weights: str | None = None
    split: str = "train"  # the split whose samples get targets
    num_views: int = 4  # augmentation views per sample (S)
    resolution: int = 2  # CAM pooling resolution r
    spec: str = "cifar"  # augmentation spec: cifar or imagenet
    spec_seed: int = 0  # seed of the view parameters
    # stronger augmentation after the crop, recorded in each view's parameters: none,
    # trivialaugment or randaugment:N:M (N ops at magnitude bin M of 31); part of the spec
    ops: str = "none"
    erase: float = 0.0  # then random erasing with this probability; part of the spec
    # then none, mixup:ALPHA or cutmix:ALPHA, with a partner from the same data shard; the
    # teacher's targets are for the mixed view; part of the spec
    mix: str = "none"
    # how targets are stored: float16, float32, int8, features, or topk:K (the K classes
    # with the highest teacher logits per view; docs/cache.md compares the forms and sizes)
    storage: StorageForm = "float16"
    binarize: bool = False  # store binarised CAMs (the paper's variant)
    actors: int = 1  # teacher actors (one per GPU on a GPU cluster)
    gpus_per_actor: float = 0.0  # GPUs per teacher actor; 0: CPU actors
    cpus_per_actor: int = 1  # CPUs per teacher actor; Ray sets its torch threads to this
    batch_size: int = 256  # views per teacher forward pass (as large as the GPU allows)
    # teacher compute: fp32, tf32 (GPU matrix units) or bf16 autocast; part of the identity
    precision: Precision = "fp32"
    # channels-last memory format for the teacher: 1.2-1.3x faster convolutions on CPU
    # (docs/cache.md), the usual choice on GPUs; changes rounding only, not the identity
    channels_last: bool = True
    # data shards rendered at once by CPU tasks (default: the CPUs the actors leave free)
    feed_tasks: int | None = None
    chunk_views: int = 512  # views per chunk streamed from a feed task to an actor
    # uncommitted data folders older than this (seconds) are leftovers of crashed writers
    orphan_lease_s: float = 3600.0
    # where views are cropped and resized: the host CPUs, or the teacher's GPU (auto: the
    # GPU when actors have one); part of the identity
    renderer: Literal["auto", "cpu", "device"] = "auto"
    # JPEG decoding: the host's libjpeg-turbo, or nvJPEG on the teacher's GPU (auto:
    # nvjpeg with the device renderer); part of the identity
    decoder: Literal["auto", "cpu", "nvjpeg"] = "auto"
    # the teacher's input normalisation per RGB channel (default: a timm teacher's
    # pretrained_cfg, else the spec's); part of the spec, hence of the identity
    mean: list[float] | None = None
    std: list[float] | None = None
    progress: bool = True  # a progress bar on stderr
    verbose: bool = False  # Ray's own output on the console too (worker logs)

    def __post_init__(self) -> None:
        check_fields(
            self,
            at_least={
                "num_views": 1,
                "resolution": 1,
                "actors": 1,
                "cpus_per_actor": 1,
                "batch_size": 1,
                "chunk_views": 1,
                "spec_seed": 0,
                "feed_tasks": 1,
                "gpus_per_actor": 0,
            },
        )
        kind, k = parse_storage(self.storage)
        self.storage = f"topk:{k}" if kind == "topk" else kind  # one spelling, one cache_id
        if self.spec not in MEAN_STD:
            raise ConfigError(f"spec: expected one of {', '.join(MEAN_STD)}, got {self.spec!r}")
        if problem := model_problem(self.teacher):
            raise ConfigError(f"teacher: {problem}")
        check_weights_given(self.teacher, self.weights, "weights")
        check_normalization(self)
        parse_stages(self.ops, self.erase, self.mix)

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
        spec = AugmentSpec.preset(
            self.spec, self.spec_seed, renderer=renderer, decoder=decoder, ops=self.ops, erase=self.erase, mix=self.mix
        )
        own = model_normalization(self.teacher) or (None, None)
        return spec.normalized_by(
            self.mean if self.mean is not None else own[0], self.std if self.std is not None else own[1]
        )


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
