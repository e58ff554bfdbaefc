"""Training configuration: one dataclass, loaded from YAML, any field overridable.

catkd train jobs/configs/demo_catkd.yaml epochs=3 beta=2.0 data=/other/shards
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from catkd.errors import ConfigError
from catkd.models import model_normalization, model_problem
from pipeline.data.stages import parse_stages
from pipeline.data.views import MEAN_STD, AugmentSpec
from pipeline.settings import check_fields, check_normalization, load_settings
from pipeline.train.tracking import check_tracking
from pipeline.weights import check_weights_given

Mode = Literal["ce", "kd", "dkd", "dist", "catkd", "cat", "online-kd", "online-dkd", "online-dist", "online-catkd"]
# Each distillation method reads its teacher's targets from a cache; its online- twin
# computes the same targets with a live teacher on the same views (cached = online).
CACHED_MODES = ("kd", "dkd", "dist", "catkd", "cat")
ONLINE_MODES = ("online-kd", "online-dkd", "online-dist", "online-catkd")
MODES = ("ce", *CACHED_MODES, *ONLINE_MODES)
LOGIT_METHODS = ("kd", "dkd", "dist")  # the methods that read only the teacher's logits


@dataclass(frozen=True)
class WorldBatch:
    """How a run's global batch is split at one world size (TrainConfig.batch_for)."""

    world: int
    per_worker: int
    lr_scale: float  # the global batch used over the one configured (1.0 where it divides)

    @property
    def global_batch(self) -> int:
        return self.per_worker * self.world

    @property
    def kept(self) -> bool:
        return self.lr_scale == 1.0


@dataclass
class TrainConfig:
    # Every field is a key=value override; `catkd train --help` lists them with these
    # comments (pipeline.settings.field_table), so each field says what it is on its line.
    # what to train

    # ce (alone, also teachers); from a cache: kd, dkd, dist, catkd, cat (CAT only, no
    # labels); with a live teacher instead: online-kd, online-dkd, online-dist, online-catkd.
    # From a topk:K cache kd, dkd and dist read the C logits rebuilt from the K kept ones
    # (a label outside the K reads the even share of the rest: docs/training.md)
    mode: Mode = "catkd"
    # architecture (`catkd models`, or timm:NAME); a pretrained spec
    # (timm:NAME.TAG:pretrained=true, tv_NAME:weights=ENUM) starts from the hub's weights
    student: str = "resnet20"
    # data
    data: str = ""  # shards URL (from catkd shard)
    train_split: str = "train"  # split trained on
    test_split: str = "test"  # split evaluated after every epoch
    spec: str = "cifar"  # augmentation spec: cifar or imagenet
    spec_seed: int = 0  # seed of the view parameters (a cache's must match)
    # stronger augmentation after the crop, replayed from each view's parameters: none,
    # trivialaugment or randaugment:N:M (N ops at magnitude bin M of 31); a cache's must match
    ops: str = "none"
    erase: float = 0.0  # then random erasing with this probability (a cache's must match)
    # then none, mixup:ALPHA or cutmix:ALPHA with a partner from the same data shard, labels
    # mixed with the same lambda (a cache's must match)
    mix: str = "none"
    # where views are cropped and resized; auto: as the cache's views were made, without a
    # cache the GPU when use_gpu, else the host; set, it must match the cache's
    renderer: Literal["auto", "cpu", "device"] = "auto"
    # who decodes JPEGs: the host or nvJPEG on the GPU; auto and matching as for renderer
    decoder: Literal["auto", "cpu", "nvjpeg"] = "auto"
    # the student's input normalisation per RGB channel (default: a timm student's
    # pretrained_cfg, else the spec's); a cache's teacher keeps its own, on the same pixels
    mean: list[float] | None = None
    std: list[float] | None = None  # see mean
    # S; 0 takes the cache's, or without a cache draws a new view every epoch; set, it
    # must equal the cache's
    num_views: int = 0
    view_offset: int = 0  # epoch e uses view (e + view_offset) mod S
    # teacher side
    cache: str | None = None  # cache URL (kd, dkd, dist, catkd, cat)
    teacher: str | None = None  # architecture (online- modes; also checked against the cache)
    teacher_weights: str | None = None  # checkpoint URL (online- modes; default: a pretrained spec's hub file)
    # loss
    beta: float = 1.0  # weight of the CAT loss (aim for a CAT loss of 1-50 after epoch 1)
    ce_weight: float = 1.0  # weight of cross-entropy on the labels (0: no labels)
    resolution: int = 2  # CAM pooling resolution r (a cache's must match)
    normalize: bool = False  # L2-normalise each pooled class map before the MSE
    binarize: bool = False  # binarised teacher CAMs (a cache's target kind must match)
    select_n: int | None = None  # transfer only n classes' CAMs (a top-k cache: at most its K)
    select_strategy: Literal["top", "bottom"] = "top"  # the n highest or lowest teacher logits
    kd_temperature: float = 4.0  # temperature T of kd, dkd and dist (DIST's ImageNet recipe: 1)
    kd_weight: float = 1.0  # weight of the KD loss (mode kd)
    # z-score each sample's teacher and student logits before kd's or dkd's softmax
    # (logit standardisation, CVPR 2024); kd_temperature is then its base temperature
    logit_std: bool = False
    dkd_alpha: float = 1.0  # weight of DKD's target-class term (TCKD)
    dkd_beta: float = 8.0  # weight of DKD's non-target-class term (NCKD; the paper: 8 on CIFAR-100, 0.5 on ImageNet)
    dkd_warmup: int = 20  # epochs over which DKD's loss weight rises linearly to 1 (0: none)
    dist_beta: float = 1.0  # weight of DIST's inter-class relation term (the paper's CIFAR-100: 2)
    dist_gamma: float = 1.0  # weight of DIST's intra-class relation term (the paper's CIFAR-100: 2)
    # optimisation (SGD with momentum, multi-step decay as in the paper)
    epochs: int = 240  # epochs to train (a rerun with more extends the run)
    batch_size: int = 64  # per worker
    lr: float = 0.05  # peak learning rate (SGD)
    momentum: float = 0.9  # SGD momentum
    weight_decay: float = 5e-4  # L2 weight decay
    lr_decay_epochs: list[int] = field(default_factory=lambda: [150, 180, 210])  # step schedule's milestones
    lr_decay_rate: float = 0.1  # lr factor at each milestone
    lr_schedule: Literal["step", "cosine"] = "step"  # step: x lr_decay_rate at each milestone; cosine: to 0
    warmup_epochs: int = 0  # linear warm-up to lr over these epochs (large global batches)
    # "linear": lr is for a global batch of lr_base_batch and is scaled by
    # batch_size x num_workers / lr_base_batch (Goyal et al., 2017). Off by default, so
    # that the paper configs keep their meaning.
    lr_scaling: Literal["none", "linear"] = "none"
    lr_base_batch: int = 256  # the global batch lr is meant for (lr_scaling=linear)
    seed: int = 0  # initial weights, data order and shuffling
    # execution
    num_workers: int = 1  # Ray Train workers (ranks); with min_workers, the most an elastic run grows to
    # elastic: start once this many workers fit, grow to num_workers as capacity comes,
    # shrink after a lost node (Ray Train V2 elastic scaling); 0: exactly num_workers
    min_workers: int = 0
    resize_check_s: float = 60.0  # an elastic run's check for capacity to grow into, in seconds
    use_gpu: bool = False  # one GPU per worker
    loader_workers: int = 2  # DataLoader processes per rank (they persist across epochs)
    cpus_per_worker: int = 0  # CPUs Ray reserves per rank; 0: loader_workers + 1 (capped at what a local Ray has)
    bf16: bool = False  # bf16 autocast for the student's forward
    channels_last: bool = False  # channels-last memory format
    storage_path: str = "runs"  # where runs live (checkpoints, metrics, exports): path or URL
    name: str = "run"  # the run's folder under storage_path; the same name resumes
    # the team's tracker as well: none, mlflow (catkd[mlflow]) or wandb (catkd[wandb])
    tracking: str = "none"
    tracking_uri: str | None = None  # MLflow's tracking URI (default: MLFLOW_TRACKING_URI)
    experiment: str | None = None  # the tracker's experiment / W&B project (default: catkd; a sweep's name)
    max_failures: int = 0  # worker-group restarts after a lost worker or node (-1: unlimited)
    shuffle_buffer: int = 2048  # samples pooled across consecutive shards before shuffling
    verbose: bool = False  # Ray's own output on the console too (worker logs, Ray Train's INFO lines)
    compile: bool = False  # wrap the student in torch.compile (docs/training.md says when it helps)

    def __post_init__(self) -> None:
        check_fields(
            self,
            at_least={
                "epochs": 1,
                "batch_size": 1,
                "num_workers": 1,
                "min_workers": 0,
                "loader_workers": 0,
                "cpus_per_worker": 0,
                "resolution": 1,
                "num_views": 0,
                "view_offset": 0,
                "shuffle_buffer": 1,
                "lr_base_batch": 1,
                "max_failures": -1,
                "spec_seed": 0,
                "select_n": 1,
                "dkd_warmup": 0,
            },
        )
        if self.mode not in MODES:
            raise ConfigError(f"mode: expected one of {', '.join(MODES)}, got {self.mode!r}")
        for name in ("lr", "kd_temperature"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name}: must be positive, got {getattr(self, name)}")
        for name in (
            "beta",
            "ce_weight",
            "kd_weight",
            "dkd_alpha",
            "dkd_beta",
            "dist_beta",
            "dist_gamma",
            "momentum",
            "weight_decay",
            "lr_decay_rate",
        ):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: must not be negative, got {getattr(self, name)}")
        if self.spec not in MEAN_STD:
            raise ConfigError(f"spec: expected one of {', '.join(MEAN_STD)}, got {self.spec!r}")
        for name in ("student", "teacher"):
            if getattr(self, name) is not None and (problem := model_problem(getattr(self, name))):
                raise ConfigError(f"{name}: {problem}")
        check_normalization(self)
        parse_stages(self.ops, self.erase, self.mix)
        check_tracking(self)
        if self.needs_cache and not self.cache:
            raise ConfigError(f"cache: mode {self.mode} reads teacher targets from a cache: set cache=URL")
        if self.mode in ONLINE_MODES:
            if not self.teacher:
                raise ConfigError(f"teacher: mode {self.mode} runs a live teacher: set teacher= (and teacher_weights=)")
            check_weights_given(self.teacher, self.teacher_weights, "teacher_weights")
        if not self.data:
            raise ConfigError("data: set data=URL (the shards from catkd shard)")
        if self.mode == "cat":
            self.ce_weight = 0.0  # CAT only: no labels used
        if self.logit_std and self.method not in ("kd", "dkd"):
            raise ConfigError(f"logit_std: standardises the logits of kd and dkd; mode {self.mode} has no KD term")
        if self.min_workers > self.num_workers:
            raise ConfigError(
                f"min_workers: an elastic run grows from min_workers to num_workers, got min_workers="
                f"{self.min_workers} > num_workers={self.num_workers}"
            )
        if self.resize_check_s < 0:
            raise ConfigError(f"resize_check_s: must not be negative, got {self.resize_check_s}")
        if self.warmup_epochs < 0 or self.warmup_epochs >= max(self.epochs, 1):
            raise ConfigError(f"warmup_epochs: must be in 0..epochs-1, got {self.warmup_epochs}")

    @property
    def needs_cache(self) -> bool:
        """Whether the run reads teacher targets from a cache (kd, dkd, dist, catkd, cat)."""
        return self.mode in CACHED_MODES

    @property
    def method(self) -> str:
        """The loss the mode trains with: an online- mode's is its cached twin's."""
        return self.mode.removeprefix("online-")

    def augment_spec(self) -> AugmentSpec:
        """The spec this run renders with; ``auto`` choices as for a run without a cache
        (``pipeline.train.run.resolve`` first replaces them with the cache's)."""
        renderer = self.renderer if self.renderer != "auto" else ("device" if self.use_gpu else "cpu")
        decoder = (
            self.decoder if self.decoder != "auto" else ("nvjpeg" if renderer == "device" and self.use_gpu else "cpu")
        )
        if (renderer == "device" or decoder == "nvjpeg") and not self.use_gpu:
            raise ConfigError(
                f"renderer={renderer} decoder={decoder} render on the training GPU, but use_gpu=false: set "
                "renderer=cpu decoder=cpu, or use_gpu=true"
            )
        spec = AugmentSpec.preset(
            self.spec, self.spec_seed, renderer=renderer, decoder=decoder, ops=self.ops, erase=self.erase, mix=self.mix
        )
        own = model_normalization(self.student) or (None, None)
        return spec.normalized_by(
            self.mean if self.mean is not None else own[0], self.std if self.std is not None else own[1]
        )

    def teacher_spec(self) -> AugmentSpec:
        """The spec with the live teacher's normalisation (online- modes): its own model's,
        else the spec's; the pixels are the student's."""
        own = model_normalization(self.teacher) if self.teacher else None
        base = AugmentSpec.preset(self.spec, self.spec_seed)
        return self.augment_spec().normalized_by(*(own or (base.mean, base.std)))

    @property
    def elastic(self) -> bool:
        """Whether the run's world size may change (min_workers set below num_workers)."""
        return 0 < self.min_workers < self.num_workers

    @property
    def global_batch(self) -> int:
        """The global batch the configuration asks for: batch_size per worker at num_workers
        (an elastic run's full size); an elastic run keeps it at every size it can."""
        return self.batch_size * self.num_workers

    def batch_for(self, world: int) -> WorldBatch:
        """Per-worker batch and learning-rate scale at world size ``world``. The global
        batch stays ``global_batch`` where ``world`` divides it; otherwise each worker takes
        the nearest whole share (so the global batch is the nearest multiple of ``world``)
        and the learning rate is scaled by the same ratio (the linear scaling rule)."""
        per_worker = max(1, round(self.global_batch / world))
        return WorldBatch(world, per_worker, per_worker * world / self.global_batch)

    @property
    def peak_lr(self) -> float:
        """The learning rate after warm-up: ``lr``, scaled with the global batch when asked."""
        return self.lr * self.global_batch / self.lr_base_batch if self.lr_scaling == "linear" else self.lr

    def lr_factor(self, epoch: int) -> float:
        """Multiplier of ``peak_lr`` during epoch ``epoch`` (0-based): warm-up, then step or cosine."""
        import math

        if epoch < self.warmup_epochs:
            return (epoch + 1) / (self.warmup_epochs + 1)
        if self.lr_schedule == "cosine":
            span = max(1, self.epochs - self.warmup_epochs)
            return 0.5 * (1 + math.cos(math.pi * (epoch - self.warmup_epochs) / span))
        return self.lr_decay_rate ** sum(epoch >= m for m in self.lr_decay_epochs)


def load_config(path: str | None, overrides: list[str] | None = None) -> TrainConfig:
    """YAML file (optional) then ``key=value`` overrides, typed as the fields are;
    unknown keys, wrong types and values out of range are ConfigErrors. A file's
    ``sweep:`` section is ``catkd sweep``'s (pipeline.train.sweep.load_sweep_config)."""
    return load_settings(TrainConfig, path, overrides, sections=("sweep",))


# Fields a resumed run may change: they do not change what the run computes.
RESUMABLE = (
    "epochs",
    "loader_workers",
    "cpus_per_worker",
    "max_failures",
    "min_workers",  # an elastic run keeps the recipe (global batch, learning rate) at every size
    "resize_check_s",
    "storage_path",
    "name",
    "verbose",
    "compile",
    "tracking",
    "tracking_uri",
    "experiment",
)


def resume_conflicts(saved: dict[str, Any], now: TrainConfig) -> tuple[list[str], list[str]]:
    """(fields that differ and change results, fields that differ harmlessly). A field the
    saved config lacks (added to catkd since the run started) counts as its default,
    which is what that run used."""
    current = dataclasses.asdict(now)
    defaults = {
        f.name: f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
        for f in dataclasses.fields(TrainConfig)
    }
    saved = {k: defaults[k] for k in current if k not in saved} | saved
    changed = [k for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]
    return [k for k in changed if k not in RESUMABLE], [k for k in changed if k in RESUMABLE]
