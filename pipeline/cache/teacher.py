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
from typing import TYPE_CHECKING, Literal, NamedTuple

import numpy as np
import torch

from catkd.errors import CatkdError
from catkd.losses import teacher_cam_targets
from catkd.models import CAMClassifier
from pipeline.cache.identity import parse_storage
from pipeline.cache.layout import encode_targets, topk_classes
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
    # topk:K: compute the maps of each view's K kept classes only (None: every class's)
    keep_classes: int | None = None

    @classmethod
    def from_config(cls, cfg: CacheBuildConfig) -> TeacherSettings:
        """The settings of a build's teachers: the one mapping from its configuration."""
        kind, k = parse_storage(cfg.storage)
        return cls(
            cfg.resolution,
            cfg.binarize,
            cfg.precision,
            cfg.channels_last,
            cfg.batch_size,
            kind == "features",
            k if kind == "topk" else None,
        )


class ViewTargets(NamedTuple):
    """A teacher's targets for n views, float32 on the host: pooled CAMs (n, C, r, r),
    or (n, K, r, r) of the ``classes`` (n, K) kept for top-k; logits (n, C); pooled
    features (n, D, r, r) for the features form, else None."""

    cam: np.ndarray
    logits: np.ndarray
    features: np.ndarray | None = None
    classes: np.ndarray | None = None


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
    def targets(self, views: torch.Tensor) -> ViewTargets:
        """views (n, 3, H, W) uint8 -> the teacher's targets, computed ``batch_size`` views
        at a time."""
        s = self.settings
        parts: list[tuple[torch.Tensor, ...]] = []
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
                if s.keep_classes is None:
                    logit, cam = self.model.forward_head(features)
                    kept: tuple[torch.Tensor, ...] = ()
                else:
                    logit, cam, classes = self._kept_maps(features, s.keep_classes)
                    kept = (classes,)
            out = (teacher_cam_targets(cam.float(), s.resolution, binarize=s.binarize), logit.float(), *kept)
            if s.keep_features:
                out += (torch.nn.functional.adaptive_avg_pool2d(features.float(), s.resolution),)
            parts.append(tuple(t.to("cpu", non_blocking=True) for t in out))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the non-blocking copies above have landed
        cam, logits, *rest = (torch.cat(column).numpy() for column in zip(*parts, strict=True))
        classes = rest.pop(0) if s.keep_classes is not None else None
        return ViewTargets(cam, logits, rest[0] if rest else None, classes)

    def _kept_maps(self, features: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logits (n, C), full-resolution CAMs of the K kept classes (n, K, H, W), their
        classes (n, K)) without the CAM of every class: a CAM is linear in the features,
        so the logits are the class weights applied to the pooled features (the
        classifier form's own computation), and only the K chosen classes' weights are
        applied at every location. Memory and compute of the head are flat in C, where
        the full CAM (n, C, H, W) took gigabytes at C = 21,841."""
        weight = self.model.head.weight.flatten(1)  # (C, D)
        logits = torch.nn.functional.linear(features.mean(dim=(2, 3)), weight)
        if self.model.bias is not None:
            logits = logits + self.model.bias
        classes = topk_classes(logits.float(), k)
        cam = torch.einsum("nkd,ndhw->nkhw", weight[classes].to(features.dtype), features)
        return logits, cam, classes


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

    def __init__(self, j: int, first_id: int, count: int, num_views: int, source: str, storage: str) -> None:
        self.j, self.first_id, self.count, self.num_views, self.source = j, first_id, count, num_views, source
        self.storage = storage
        # Each chunk's targets in their storage form, cut as the chunk leaves the teacher:
        # an actor holds a shard's stored bytes (K maps a view for top-k, float16 for
        # float16), never a shard's float32 maps of every class.
        self.parts: list[tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]] = []
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
        out = runner.targets(torch.as_tensor(views).flatten(0, 1))  # (m * S, ...), sample-major
        cam, logits, feats, classes = (a.reshape(m, views_per, *a.shape[1:]) if a is not None else None for a in out)
        for view in range(views_per):
            check_finite(cam[:, view], logits[:, view], ids, view, self.source)
        self.parts.append((ids, params, encode_targets(self.storage, cam, logits, feats, classes)))
        self.received += m

    @property
    def complete(self) -> bool:
        return self.received == self.count

    def arrays(self) -> dict[str, np.ndarray]:
        """The shard's arrays as stored: every array is per (sample, view), so the chunks'
        encodings concatenated are the shard's encoding, bit for bit."""
        parts = sorted(self.parts, key=lambda part: int(part[0][0]))  # by first id: chunks may come in any order
        ids = np.concatenate([part[0] for part in parts])
        expected = np.arange(self.first_id, self.first_id + self.count)
        if not np.array_equal(ids, expected):
            raise CacheBuildError(
                f"{self.source}: rendered ids do not cover the shard in order (expected {expected[0]}..{expected[-1]})"
            )
        stored = {name: np.concatenate([part[2][name] for part in parts]) for name in parts[0][2]}
        params = np.concatenate([part[1] for part in parts])
        return stored | {"params": params.astype(np.int32), "ids": ids}
