"""The teacher side of a cache build, free of Ray: precision settings, the forward
pass over rendered views, and one data shard's targets gathered for its commit
(``pipeline.cache.commit``).

``pipeline.cache.builder`` wraps these in Ray actors; ``bench/gpu_check.py`` drives
them in-process. Precision is part of the cache identity (DESIGN section 6):

    fp32  float32 everywhere; TF32 matrix units off (exact float32 products)
    tf32  float32 tensors, TF32 matrix units on (GPU only; CPUs have none)
    bf16  bfloat16 autocast over the float32 model
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch

from catkd.errors import CatkdError
from catkd.losses import teacher_cam_targets
from catkd.models import CAMClassifier
from pipeline.cache.layout import encode_targets
from pipeline.data.device_render import render_packed
from pipeline.data.host_images import FALLBACK_REASONS
from pipeline.data.shard_format import sample_key
from pipeline.data.views import AugmentSpec, normalize_batch
from pipeline.malloc import keep_freed_memory

if TYPE_CHECKING:
    from pipeline.cache.config import CacheBuildConfig

Precision = Literal["fp32", "tf32", "bf16"]
PRECISIONS: tuple[str, ...] = ("fp32", "tf32", "bf16")


class CacheBuildError(CatkdError, RuntimeError):
    """The build cannot produce correct targets; the message names shard and sample."""


def build_device(gpus: float) -> torch.device:
    """The device a teacher runs on: a GPU when one was asked for, which must then exist."""
    if gpus <= 0:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise CacheBuildError(
            f"asked for {gpus} GPU per teacher, but torch finds no CUDA device here "
            f"(torch {torch.__version__}, CUDA build {torch.version.cuda}); check the driver, or build on CPU with "
            "--gpus-per-actor 0"
        )
    return torch.device("cuda")


@contextmanager
def precision_scope(precision: Precision, device: torch.device):
    """Autocast and TF32 exactly as ``precision`` says, restored afterwards."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, not {precision!r}")
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    tf32 = precision == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
    try:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


@dataclass
class TeacherSettings:
    resolution: int = 2
    binarize: bool = False
    precision: Precision = "fp32"
    channels_last: bool = True  # see CacheBuildConfig.channels_last
    batch_size: int = 256  # views per forward pass
    keep_features: bool = False  # the `features` storage form needs pooled features

    @classmethod
    def from_config(cls, cfg: CacheBuildConfig) -> TeacherSettings:
        """The settings of a build's teachers: the one mapping from its configuration."""
        return cls(
            cfg.resolution, cfg.binarize, cfg.precision, cfg.channels_last, cfg.batch_size, cfg.storage == "features"
        )


class TeacherRunner:
    """Holds the teacher once on its device and turns uint8 views into targets."""

    def __init__(
        self, model: CAMClassifier, spec: AugmentSpec, settings: TeacherSettings, device: torch.device
    ) -> None:
        self.spec, self.settings, self.device = spec, settings, device
        if device.type == "cpu":
            keep_freed_memory()  # 1.2x on CPU: activations are not page-faulted in at every batch
        model = model.eval().to(device)
        self.model = model.to(memory_format=torch.channels_last) if settings.channels_last else model
        self.pin = device.type == "cuda"

    @torch.inference_mode()
    def targets(self, views: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """views (n, 3, H, W) uint8 -> pooled CAM targets (n, C, r, r), logits (n, C),
        pooled features (n, D, r, r) or None; float32 on the host."""
        s = self.settings
        cams, logits, feats = [], [], []
        for start in range(0, len(views), s.batch_size):
            part = views[start : start + s.batch_size]
            if (
                self.pin and not part.is_pinned()
            ):  # pinned host memory lets the copy overlap the previous batch's kernels
                part = part.pin_memory()
            x = normalize_batch(self.spec, part.to(self.device, non_blocking=True))
            if s.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with precision_scope(s.precision, self.device):
                features = self.model.forward_features(x)
                logit, cam = self.model.forward_head(features)
            cams.append(
                teacher_cam_targets(cam.float(), s.resolution, binarize=s.binarize).to("cpu", non_blocking=True)
            )
            logits.append(logit.float().to("cpu", non_blocking=True))
            if s.keep_features:
                feats.append(
                    torch.nn.functional.adaptive_avg_pool2d(features.float(), s.resolution).to("cpu", non_blocking=True)
                )
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the non-blocking copies above have landed
        return torch.cat(cams).numpy(), torch.cat(logits).numpy(), torch.cat(feats).numpy() if feats else None


def check_finite(cam: np.ndarray, logits: np.ndarray, ids: np.ndarray, view: int, source: str) -> None:
    bad = ~(np.isfinite(cam).reshape(len(ids), -1).all(1) & np.isfinite(logits).all(1))
    if bad.any():
        k = int(np.argmax(bad))
        raise CacheBuildError(
            f"{source}: sample {sample_key(int(ids[k]))} view {view}: non-finite teacher output (NaN or inf); nothing "
            "was stored for this shard"
        )


class ShardTargets:
    """Targets of one data shard, gathered chunk by chunk (each chunk: some of its
    samples, all S views), then encoded in the storage form."""

    def __init__(self, j: int, first_id: int, count: int, num_views: int, source: str) -> None:
        self.j, self.first_id, self.count, self.num_views, self.source = j, first_id, count, num_views, source
        self.parts: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]] = []
        self.received = 0
        self.fallbacks = np.zeros(len(FALLBACK_REASONS), np.int64)  # images decoded on the host instead of nvJPEG

    def add(
        self,
        runner: TeacherRunner,
        ids: np.ndarray,
        params: np.ndarray,
        views: np.ndarray | torch.Tensor | None = None,
        images: dict | None = None,
    ) -> None:
        """ids (m,), params (m, S, 5) of consecutive samples, and either their views
        (m, S, 3, H, W) uint8 (cpu renderer) or their packed images (device renderer:
        rendered here, on the teacher's device)."""
        if views is None:
            views, fallbacks = render_packed(runner.spec, images, params, ids, runner.device, self.source)
            self.fallbacks += fallbacks
        m, views_per = views.shape[:2]
        cam, logits, feats = runner.targets(torch.as_tensor(views).flatten(0, 1))  # (m * S, ...), sample-major
        cam, logits = cam.reshape(m, views_per, *cam.shape[1:]), logits.reshape(m, views_per, -1)
        for view in range(views_per):
            check_finite(cam[:, view], logits[:, view], ids, view, self.source)
        feats = feats.reshape(m, views_per, *feats.shape[1:]) if feats is not None else None
        self.parts.append((ids, params, cam, logits, feats))
        self.received += m

    @property
    def complete(self) -> bool:
        return self.received == self.count

    def arrays(self, storage: str) -> dict[str, np.ndarray]:
        parts = sorted(self.parts, key=lambda part: int(part[0][0]))  # by first id: chunks may come in any order
        ids, params, cam, logits, feats = (
            np.concatenate(p) if p[0] is not None else None for p in zip(*parts, strict=True)
        )
        expected = np.arange(self.first_id, self.first_id + self.count)
        if not np.array_equal(ids, expected):
            raise CacheBuildError(
                f"{self.source}: rendered ids do not cover the shard in order (expected {expected[0]}..{expected[-1]})"
            )
        return encode_targets(storage, cam, logits, feats) | {"params": params.astype(np.int32), "ids": ids}
