"""Replayable augmentation views (DESIGN section 5).

A view is (sample id i, view index s). A spec turns (spec seed, i, s) into plain
integer parameters with a counter-based hash (splitmix64), the same on every machine
and in every process, with no state: ``params[k] = (x0, y0, w, h, flip)``, the crop box
in source pixels (x0/y0 may be negative: CIFAR padding) and the flip bit. Applying
parameters is deterministic, so a student replaying the parameters stored in the cache
sees exactly the image the teacher saw.

Nothing random happens outside the parameters: stronger augmentation (TrivialAugment,
RandAugment, random erasing, MixUp and CutMix with a partner from the same data shard)
is offered only as recorded stages (``pipeline.data.stages``), whose draws are stored
after the crop box and flip, so a view's parameters are ``5 + stages.width`` integers
(``AugmentSpec.num_params``).

Where the views are rendered is part of the spec: ``renderer`` is ``cpu`` (this
module, on the host, per image) or ``device`` (``pipeline.data.device_render``: the
decoded image goes to the device once and all its views are rendered there in
batches), ``decoder`` is ``cpu`` (libjpeg-turbo through torchvision) or ``nvjpeg``
(the GPU's JPEG decoder). The pairs do not give identical pixels, so caches record
them and students must match them (``pipeline.train.run.resolve``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
import torch
from torchvision.transforms.v2 import functional as TF

from catkd.errors import CatkdError
from pipeline.data import stages as view_stages

NUM_PARAMS = 5  # x0, y0, w, h, flip: every spec's first parameters (stages add theirs after)
SpecName = Literal["cifar", "imagenet"]
MEAN_STD = {
    "cifar": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
# Version of the renderers (``render_views`` and ``device_render``): bump it whenever a
# change could alter one rendered pixel. It is part of the spec, hence of every cache
# identity, so caches rendered by another version are refused instead of silently
# disagreeing with what students see.
RENDERER_VERSION = 2
RENDERERS = ("cpu", "device")
DECODERS = ("cpu", "nvjpeg")
Renderer = Literal["cpu", "device"]
Decoder = Literal["cpu", "nvjpeg"]


@dataclass(frozen=True)
class AugmentSpec:
    name: SpecName = "cifar"
    seed: int = 0
    size: int = 32  # output side: 32 for cifar, 224 for imagenet
    pad: int = 4  # cifar: zero padding before the random crop
    scale: tuple[float, float] = (0.08, 1.0)  # imagenet: random-resized-crop area range
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # imagenet: aspect ratio range
    eval_resize: int = 256  # imagenet eval: shorter side before the centre crop
    mean: tuple[float, float, float] = MEAN_STD["cifar"][0]  # normalisation, per RGB channel
    std: tuple[float, float, float] = MEAN_STD["cifar"][1]
    renderer_version: int = RENDERER_VERSION
    renderer: Renderer = "cpu"  # where views are cropped and resized: the host, or the training/teacher device
    decoder: Decoder = "cpu"  # who decodes JPEGs: the host's libjpeg-turbo, or nvJPEG on the GPU
    ops: str = "none"  # after the crop: none, trivialaugment or randaugment:N:M (pipeline.data.stages)
    erase: float = 0.0  # then random erasing with this probability
    mix: str = "none"  # then none, mixup:ALPHA or cutmix:ALPHA with a partner from the same data shard

    def __post_init__(self) -> None:
        view_stages.parse_stages(self.ops, self.erase, self.mix)  # a ConfigError naming the field
        if self.renderer not in RENDERERS:
            raise ValueError(f"renderer must be one of {', '.join(RENDERERS)}, got {self.renderer!r}")
        if self.decoder not in DECODERS:
            raise ValueError(f"decoder must be one of {', '.join(DECODERS)}, got {self.decoder!r}")
        if self.decoder == "nvjpeg" and self.renderer != "device":
            raise ValueError(
                "decoder nvjpeg decodes on the GPU, so the views must be rendered there too: set renderer=device"
            )

    @property
    def stages(self) -> view_stages.Stages:
        return view_stages.parse_stages(self.ops, self.erase, self.mix)

    @property
    def mixes(self) -> bool:
        return self.mix != "none"

    @property
    def num_params(self) -> int:
        """Integers per view: the crop box and flip, then the stages' draws."""
        return NUM_PARAMS + self.stages.width

    @classmethod
    def preset(
        cls,
        name: SpecName,
        seed: int = 0,
        renderer: Renderer = "cpu",
        decoder: Decoder = "cpu",
        ops: str = "none",
        erase: float = 0.0,
        mix: str = "none",
    ) -> AugmentSpec:
        if name not in MEAN_STD:
            raise ValueError(f"unknown augmentation spec {name!r} (cifar, imagenet)")
        mean, std = MEAN_STD[name]
        size = 32 if name == "cifar" else 224
        stages = {"ops": ops, "erase": erase, "mix": mix}
        return cls(name, seed, size=size, mean=mean, std=std, renderer=renderer, decoder=decoder, **stages)

    def normalized_by(self, mean: Sequence[float] | None, std: Sequence[float] | None) -> AugmentSpec:
        """This spec with another input normalisation (a model's own; None keeps this one's)."""
        if mean is None and std is None:
            return self
        return dataclasses.replace(
            self,
            mean=tuple(float(v) for v in (mean if mean is not None else self.mean)),
            std=tuple(float(v) for v in (std if std is not None else self.std)),
        )

    @classmethod
    def from_dict(cls, data: dict) -> AugmentSpec:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------- counter-based generator

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _splitmix(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        x = x + _GOLDEN
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def uniforms(seed: int, ids: np.ndarray, view: int, count: int) -> np.ndarray:
    """(n, count) floats in [0, 1), a pure function of (seed, id, view, column)."""
    h = _splitmix(np.full(len(ids), seed, np.uint64))
    h = _splitmix(h ^ np.asarray(ids, np.uint64))
    h = _splitmix(h ^ np.uint64(view))
    cols = _splitmix(h[:, None] ^ np.arange(count, dtype=np.uint64)[None, :])
    return (cols >> np.uint64(11)).astype(np.float64) * 2.0**-53


# ---------------------------------------------------------------- parameters


def view_params(
    spec: AugmentSpec, ids: np.ndarray, view: int, image_hw: np.ndarray, shards: np.ndarray | None = None
) -> np.ndarray:
    """(n, spec.num_params) int64 parameters of view ``view`` of samples ``ids``
    (``image_hw`` (n, 2)): the crop box and flip, then the stages' draws; a mixing spec
    needs ``shards`` (n, 2), each sample's data shard (first id, count)."""
    box = _box_params(spec, ids, view, image_hw)
    if spec.num_params == NUM_PARAMS:
        return box
    drawn = view_stages.draw(spec.stages, spec.seed, np.asarray(ids, np.int64), view, spec.size, uniforms, shards)
    return np.concatenate([box, drawn], axis=1)


def _box_params(spec: AugmentSpec, ids: np.ndarray, view: int, image_hw: np.ndarray) -> np.ndarray:
    """(n, 5) int64 crop box and flip."""
    ids = np.asarray(ids, np.int64)
    image_hw = np.broadcast_to(np.asarray(image_hw, np.int64), (len(ids), 2))
    if spec.name == "cifar":
        u = uniforms(spec.seed, ids, view, 3)
        h, w = image_hw[:, 0], image_hw[:, 1]
        x0 = np.floor(u[:, 0] * (w - spec.size + 2 * spec.pad + 1)).astype(np.int64) - spec.pad
        y0 = np.floor(u[:, 1] * (h - spec.size + 2 * spec.pad + 1)).astype(np.int64) - spec.pad
        side = np.full(len(ids), spec.size, np.int64)
        return np.stack([x0, y0, side, side, (u[:, 2] < 0.5).astype(np.int64)], axis=1)
    u = uniforms(spec.seed, ids, view, 41)
    return np.array(
        [_resized_crop_box(spec, row, int(hw[0]), int(hw[1])) for row, hw in zip(u, image_hw, strict=True)], np.int64
    ).reshape(-1, NUM_PARAMS)


def _resized_crop_box(spec: AugmentSpec, u: np.ndarray, height: int, width: int) -> tuple[int, int, int, int, int]:
    """Random-resized crop as torchvision samples it (10 tries, then a centre crop)."""
    area = height * width
    log_lo, log_hi = math.log(spec.ratio[0]), math.log(spec.ratio[1])
    flip = int(u[40] < 0.5)
    for attempt in range(10):
        a, r, px, py = u[4 * attempt : 4 * attempt + 4]
        target = area * (spec.scale[0] + a * (spec.scale[1] - spec.scale[0]))
        ratio = math.exp(log_lo + r * (log_hi - log_lo))
        w = int(round(math.sqrt(target * ratio)))
        h = int(round(math.sqrt(target / ratio)))
        if 0 < w <= width and 0 < h <= height:
            return int(px * (width - w + 1)), int(py * (height - h + 1)), w, h, flip
    in_ratio = width / height
    if in_ratio < spec.ratio[0]:
        w, h = width, int(round(width / spec.ratio[0]))
    elif in_ratio > spec.ratio[1]:
        h, w = height, int(round(height * spec.ratio[1]))
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h, flip


class ViewMismatchError(CatkdError, ValueError):
    """Stored view parameters differ from what the spec gives now: the spec changed."""


def check_params(
    spec: AugmentSpec,
    ids: np.ndarray,
    view: int,
    image_hw: np.ndarray,
    stored: np.ndarray,
    source: str,
    shards: np.ndarray | None = None,
) -> None:
    expected = view_params(spec, ids, view, image_hw, shards)
    bad = np.nonzero((expected != np.asarray(stored)).any(axis=1))[0]
    if len(bad):
        k = int(bad[0])
        raise ViewMismatchError(
            f"{source}: sample {int(ids[k])} view {view}: stored parameters {stored[k].tolist()} but spec "
            f"{spec.name} (fingerprint {spec.fingerprint()}) gives {expected[k].tolist()}: "
            "the augmentation spec changed"
        )


# ---------------------------------------------------------------- applying views


def crop_flip_batch(images: np.ndarray, params: np.ndarray) -> np.ndarray:
    """Fixed-size crops of a batch of same-size images (the cifar spec): (n, H, W, 3) uint8
    -> (n, h, w, 3); parts of the box outside the image are zero (the padding).

    The batch is padded once; each crop is then one slice copy (faster than one
    fancy-indexing gather over the whole batch, measured).
    """
    n, height, width, _ = images.shape
    out_h, out_w = int(params[0, 3]), int(params[0, 2])
    pad = int(
        max(
            0,
            -params[:, 0].min(),
            -params[:, 1].min(),
            (params[:, 0] + out_w - width).max(),
            (params[:, 1] + out_h - height).max(),
        )
    )
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0))) if pad else images
    out = np.empty((n, out_h, out_w, 3), np.uint8)
    for k, (x0, y0, _, _, flip) in enumerate(params[:, :NUM_PARAMS].tolist()):
        patch = padded[k, y0 + pad : y0 + pad + out_h, x0 + pad : x0 + pad + out_w]
        out[k] = patch[:, ::-1] if flip else patch
    return out


def _resized_crop_into(out: torch.Tensor, image: np.ndarray, param: np.ndarray) -> None:
    """One image (H, W, 3) uint8 -> ``out`` (3, size, size): crop box, antialiased
    bilinear resize, flip. The crop is a view of the image in channels-last memory,
    which is what torch's vectorised uint8 resize kernel reads fastest: no copies."""
    x0, y0, w, h, flip = (int(v) for v in param[:NUM_PARAMS])
    if not image.flags.writeable:  # raw shards are read-only buffers; torch wants writable memory
        image = image.copy()
    crop = torch.from_numpy(image).permute(2, 0, 1)[:, y0 : y0 + h, x0 : x0 + w]
    resized = TF.resize(crop, list(out.shape[-2:]), antialias=True)
    out.copy_(resized.flip(-1) if flip else resized)


def apply_stages(spec: AugmentSpec, views: torch.Tensor, params: np.ndarray | torch.Tensor) -> torch.Tensor:
    """The spec's stages on rendered views (n, 3, size, size) uint8, any device: what both
    renderers do after their crop. Erased boxes take the spec's mean colour."""
    fill = tuple(int(round(255 * m)) for m in spec.mean)
    return view_stages.apply_stages(spec.stages, views, params[:, NUM_PARAMS:], fill)


def _apply(spec: AugmentSpec, images: list[np.ndarray], params: np.ndarray) -> torch.Tensor:
    """Decoded images + their parameters -> (n, 3, size, size) uint8 batch."""
    return apply_stages(spec, _crop(spec, images, params), params)


def _crop(spec: AugmentSpec, images: list[np.ndarray], params: np.ndarray) -> torch.Tensor:
    """The crop, resize and flip of every view (n, 3, size, size) uint8."""
    if spec.name == "cifar" and len({im.shape for im in images}) == 1:
        return torch.from_numpy(crop_flip_batch(np.stack(images), params)).permute(0, 3, 1, 2)
    if spec.name == "cifar":
        return torch.stack(
            [
                torch.from_numpy(crop_flip_batch(im[None], p[None])[0]).permute(2, 0, 1)
                for im, p in zip(images, params, strict=True)
            ]
        )
    out = torch.empty((len(images), 3, spec.size, spec.size), dtype=torch.uint8)
    for k, (im, p) in enumerate(zip(images, params, strict=True)):
        _resized_crop_into(out[k], im, p)
    return out


@dataclass
class MixSource:
    """Where a batch's mixing partners come from: each sample's data shard (first id and
    count, (n, 2)), and ``partners(ids)``, the partners' decoded images and, from a
    cache, their stored parameters (else None)."""

    shards: np.ndarray
    partners: Callable[[np.ndarray], tuple[list[np.ndarray], np.ndarray | None]]


def render_views(
    spec: AugmentSpec,
    images: list[np.ndarray],
    ids: np.ndarray,
    view: int,
    stored_params: np.ndarray | None = None,
    source: str = "",
    mixing: MixSource | None = None,
) -> tuple[np.ndarray, torch.Tensor]:
    """The one view renderer: decoded images (H, W, 3) uint8 of samples ``ids`` ->
    (params (n, P), views (n, 3, size, size) uint8) of view ``view``.

    The cache builder, the training loader, ``cache verify`` and the benchmarks all
    render through here, so teacher and student see the same pixels. With
    ``stored_params`` (from a cache) those are applied: they are authoritative, and
    recomputing them only detects a spec that changed (``ViewMismatchError``). A mixing
    spec needs ``mixing``: each view is mixed with its partner's own view of the same
    index."""
    if spec.mixes and mixing is None:
        raise ValueError(f"spec mix={spec.mix} needs the samples' data shards and partners (MixSource)")
    shards = mixing.shards if mixing is not None else None
    hw = np.array([im.shape[:2] for im in images], np.int64)
    params = replay_params(spec, ids, view, hw, stored_params, source, shards)
    views = _apply(spec, images, params)
    if spec.mixes:
        partner_ids, _ = mix_of(spec, params)
        partner_images, partner_stored = mixing.partners(partner_ids)
        partner_hw = np.array([im.shape[:2] for im in partner_images], np.int64)
        partner_params = replay_params(spec, partner_ids, view, partner_hw, partner_stored, source, shards)
        partner_views = _apply(spec, partner_images, partner_params)
        views = view_stages.mix_views(spec.stages, views, partner_views, params[:, NUM_PARAMS:])
    return params, views


def mix_of(spec: AugmentSpec, params: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A mixing spec's views (n, P) -> (partner ids (n,), lambda (n,): each view's own share)."""
    return view_stages.mix_partners(spec.stages, np.asarray(params)[:, NUM_PARAMS:])


def replay_params(
    spec: AugmentSpec,
    ids: np.ndarray,
    view: int,
    image_hw: np.ndarray,
    stored: np.ndarray | None,
    source: str = "",
    shards: np.ndarray | None = None,
) -> np.ndarray:
    """The parameters to render: the stored ones (authoritative; recomputing them only
    detects a changed spec) or, without a cache, the spec's."""
    if stored is None:
        return view_params(spec, ids, view, image_hw, shards)
    params = np.asarray(stored, np.int64)
    check_params(spec, ids, view, image_hw, params, source, shards)
    return params


def eval_transform(spec: AugmentSpec, images: list[np.ndarray]) -> torch.Tensor:
    """Evaluation views: identity for cifar; resize shorter side to 256, centre crop 224 for imagenet."""
    if spec.name == "cifar":
        return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)
    out = []
    for im in images:
        tensor = torch.from_numpy(np.array(im)).permute(2, 0, 1)
        tensor = TF.resize(tensor, spec.eval_resize, antialias=True)
        out.append(TF.center_crop(tensor, [spec.size, spec.size]))
    return torch.stack(out)


_NORMALIZERS: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def normalize_batch(spec: AugmentSpec, batch_uint8: torch.Tensor) -> torch.Tensor:
    """(n, 3, H, W) uint8 -> float with the spec's mean/std (on any device).

    (x / 255 - mean) / std is one scale and one shift, in place on a float copy; the
    constants are made once per device, not in every call."""
    key = (spec.mean, spec.std, batch_uint8.device)
    if key not in _NORMALIZERS:
        mean = torch.tensor(spec.mean, device=batch_uint8.device).view(1, 3, 1, 1)
        std = torch.tensor(spec.std, device=batch_uint8.device).view(1, 3, 1, 1)
        _NORMALIZERS[key] = (1 / (255 * std), mean / std)
    scale, shift = _NORMALIZERS[key]
    return batch_uint8.float().mul_(scale).sub_(shift)


def renormalize(x: torch.Tensor, spec: AugmentSpec, other: AugmentSpec) -> torch.Tensor:
    """``x`` normalised by ``spec`` -> the same pixels normalised by ``other`` (a live
    teacher whose weights expect another mean and std than the student's)."""
    if (spec.mean, spec.std) == (other.mean, other.std):
        return x
    shape = (1, 3, 1, 1)
    mean, std = (torch.tensor(v, dtype=x.dtype, device=x.device).view(shape) for v in (spec.mean, spec.std))
    to_mean, to_std = (torch.tensor(v, dtype=x.dtype, device=x.device).view(shape) for v in (other.mean, other.std))
    return (x * std + mean - to_mean) / to_std
