"""Training configuration: one dataclass, loaded from YAML, any field overridable.

    catkd train jobs/configs/demo_catkd.yaml epochs=3 beta=2.0 data=/other/shards
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from pipeline.data.views import AugmentSpec

Mode = Literal["ce", "kd", "catkd", "cat", "online-catkd"]
MODES = ("ce", "kd", "catkd", "cat", "online-catkd")


@dataclass
class TrainConfig:
    # what to train
    mode: Mode = "catkd"
    student: str = "resnet20"
    # data
    data: str = ""  # shards URL
    train_split: str = "train"
    test_split: str = "test"
    spec: str = "cifar"
    spec_seed: int = 0
    # Where views are rendered and who decodes JPEGs. auto: as the cache's views were
    # made (a student sees what its teacher saw); without a cache, on the GPU with
    # nvJPEG when use_gpu, else on the host. Set, they must match the cache's.
    renderer: Literal["auto", "cpu", "device"] = "auto"
    decoder: Literal["auto", "cpu", "nvjpeg"] = "auto"
    num_views: int = 0  # S; 0 takes the cache's, or without a cache draws a new view every epoch; set, it must equal the cache's
    view_offset: int = 0
    # teacher side
    cache: str | None = None  # cache URL (kd, catkd, cat)
    teacher: str | None = None  # architecture (online-catkd; also checked against the cache)
    teacher_weights: str | None = None  # checkpoint URL (online-catkd)
    # loss
    beta: float = 1.0
    ce_weight: float = 1.0
    resolution: int = 2
    normalize: bool = False
    binarize: bool = False
    select_n: int | None = None
    select_strategy: Literal["top", "bottom"] = "top"
    kd_temperature: float = 4.0
    kd_weight: float = 1.0
    # optimisation (SGD with momentum, multi-step decay as in the paper)
    epochs: int = 240
    batch_size: int = 64  # per worker
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr_decay_epochs: list[int] = field(default_factory=lambda: [150, 180, 210])
    lr_decay_rate: float = 0.1
    lr_schedule: Literal["step", "cosine"] = "step"  # step: x lr_decay_rate at each lr_decay_epochs; cosine: to 0 at the end
    warmup_epochs: int = 0  # linear warm-up to lr over these epochs (large global batches)
    # "linear": lr is for a global batch of lr_base_batch and is scaled by
    # batch_size x num_workers / lr_base_batch (Goyal et al., 2017). Off by default, so
    # that the paper configs keep their meaning.
    lr_scaling: Literal["none", "linear"] = "none"
    lr_base_batch: int = 256
    seed: int = 0
    # execution
    num_workers: int = 1  # Ray Train workers (ranks)
    use_gpu: bool = False
    loader_workers: int = 2  # DataLoader processes per rank (they persist across epochs)
    cpus_per_worker: int = 0  # CPUs Ray reserves per rank; 0: loader_workers + 1 (capped at what a local Ray has)
    bf16: bool = False
    channels_last: bool = False
    storage_path: str = "runs"
    name: str = "run"
    max_failures: int = 0
    shuffle_buffer: int = 2048
    verbose: bool = False  # keep Ray Train's own INFO lines (each report, each checkpoint) on the console
    compile: bool = False  # wrap the student in torch.compile (docs/training.md says when it helps)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        needs_cache = self.mode in ("kd", "catkd", "cat")
        if needs_cache and not self.cache:
            raise ValueError(f"mode {self.mode} reads teacher targets from a cache: set cache=URL")
        if self.mode == "online-catkd" and not (self.teacher and self.teacher_weights):
            raise ValueError("mode online-catkd runs a live teacher: set teacher= and teacher_weights=")
        if not self.data:
            raise ValueError("set data=URL (the shards from catkd shard)")
        if self.mode == "cat":
            self.ce_weight = 0.0  # CAT only: no labels used
        if self.warmup_epochs < 0 or self.warmup_epochs >= max(self.epochs, 1):
            raise ValueError(f"warmup_epochs must be in 0..epochs-1, got {self.warmup_epochs}")

    def augment_spec(self) -> AugmentSpec:
        """The spec this run renders with; ``auto`` choices as for a run without a cache
        (``pipeline.train.run.resolve`` first replaces them with the cache's)."""
        renderer = self.renderer if self.renderer != "auto" else ("device" if self.use_gpu else "cpu")
        decoder = self.decoder if self.decoder != "auto" else ("nvjpeg" if renderer == "device" and self.use_gpu else "cpu")
        if (renderer == "device" or decoder == "nvjpeg") and not self.use_gpu:
            raise ValueError(f"renderer={renderer} decoder={decoder} render on the training GPU, but use_gpu=false: set renderer=cpu decoder=cpu, or use_gpu=true")
        return AugmentSpec.preset(self.spec, self.spec_seed, renderer=renderer, decoder=decoder)

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.num_workers

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

    @property
    def uses_cam_targets(self) -> bool:
        return self.mode in ("catkd", "cat", "online-catkd")


def _coerce(value: str, current: Any, name: str) -> Any:
    parsed = yaml.safe_load(value)  # numbers, booleans, lists, null as YAML reads them
    if current is None or parsed is None:
        return parsed
    if isinstance(current, bool) and not isinstance(parsed, bool):
        raise ValueError(f"{name}: expected true/false, got {value!r}")
    if isinstance(current, float) and isinstance(parsed, int):
        return float(parsed)
    if isinstance(current, str) and not isinstance(parsed, str):
        return value
    return parsed


def load_config(path: str | None, overrides: list[str] | None = None) -> TrainConfig:
    """YAML file (optional) then ``key=value`` overrides; unknown keys are errors."""
    values: dict[str, Any] = {}
    if path:
        with open(path) as f:
            values = yaml.safe_load(f) or {}
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(f"{path}: unknown config keys {unknown}")
    defaults = TrainConfig.__dataclass_fields__
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or key not in fields:
            raise ValueError(f"override {item!r}: unknown key or not key=value; keys: {', '.join(fields)}")
        default = defaults[key].default if defaults[key].default is not dataclasses.MISSING else defaults[key].default_factory()
        values[key] = _coerce(raw, values.get(key, default), key)
    return TrainConfig(**values)


# Fields a resumed run may change: they do not change what the run computes.
RESUMABLE = ("epochs", "loader_workers", "cpus_per_worker", "max_failures", "storage_path", "name", "verbose", "compile")


def resume_conflicts(saved: dict[str, Any], now: TrainConfig) -> tuple[list[str], list[str]]:
    """(fields that differ and change results, fields that differ harmlessly)."""
    current = dataclasses.asdict(now)
    changed = [k for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]
    return [k for k in changed if k not in RESUMABLE], [k for k in changed if k in RESUMABLE]
