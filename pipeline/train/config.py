"""Training configuration: one dataclass, loaded from YAML, any field overridable.

    catkd train jobs/configs/demo_catkd.yaml epochs=3 beta=2.0 data=/other/shards
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

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
    num_views: int = 0  # S; 0 takes the cache's (1 without a cache); set, it must equal the cache's
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
    seed: int = 0
    # execution
    num_workers: int = 1  # Ray Train workers (ranks)
    use_gpu: bool = False
    loader_workers: int = 2  # DataLoader processes per rank
    bf16: bool = False
    channels_last: bool = False
    storage_path: str = "runs"
    name: str = "run"
    max_failures: int = 0
    shuffle_buffer: int = 2048

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
