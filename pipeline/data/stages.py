"""Strong augmentation as recorded view parameters (DESIGN section 5): the stages a spec
may add after its crop and flip, each drawn by the views' counter-based generator from
(spec seed, sample id, view) and stored as integers next to the crop box, so that a
student replaying a cached view sees exactly the image the teacher saw.

- ``ops``: ``trivialaugment`` (TrivialAugmentWide: one op of 14 and one of 31 magnitude
  bins per view, Müller & Hutter 2021) or ``randaugment:N:M`` (N ops, each of the same
  14, at magnitude bin M of 31, Cubuk et al. 2020), with torchvision's magnitude tables
  and its way of applying each op (nearest interpolation, black fill). Stored per op:
  (op index, magnitude bin, sign).
- ``erase``: random erasing with probability P (Zhong et al. 2020), torchvision's box
  sampling (area 2-33% of the view, aspect 0.3-3.3, ten tries), filled with the spec's
  mean colour, which normalises to zero as torchvision's ``value=0`` after ``Normalize``
  does. Stored: (applied, x0, y0, w, h).
- ``mix``: ``mixup:ALPHA`` (Zhang et al. 2018) or ``cutmix:ALPHA`` (Yun et al. 2019) with a
  partner drawn from the same data shard (which the cache build and the training loader
  already hold), lambda ~ Beta(ALPHA, ALPHA) drawn from the same generator, and for
  CutMix timm's box (side sqrt(1 - lambda), centre uniform, clipped; lambda corrected to
  the box's area). Stored: (partner id, lambda x 2^16) and for CutMix (x0, y0, w, h). The
  partner's view is its own view of the same index (its crop, ops and erasing); mixing
  uses integer arithmetic, so every device gives the same pixels.

Stages act on the rendered uint8 view, on whatever device it is on: the CPU renderer
and the device renderer apply the same function after their crop.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from catkd.errors import ConfigError

OPS = (
    "Identity",
    "ShearX",
    "ShearY",
    "TranslateX",
    "TranslateY",
    "Rotate",
    "Brightness",
    "Color",
    "Contrast",
    "Sharpness",
    "Posterize",
    "Solarize",
    "AutoContrast",
    "Equalize",
)
SIGNED = {"ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color", "Contrast", "Sharpness"}
BINS = 31  # magnitude bins, torchvision's default for both policies
MAX_RANDAUGMENT_OPS = 4
MIX_KINDS = ("mixup", "cutmix")
MAX_MIX_ALPHA = 10.0
LAMBDA_ONE = 1 << 16  # lambda is stored in units of 2^-16
ERASE_SCALE = (0.02, 0.33)  # torchvision RandomErasing's defaults
ERASE_RATIO = (0.3, 3.3)
_STAGE_STREAM = 0x5EED_57A6  # the stages' draws: a stream of their own beside the crop's


@dataclass(frozen=True)
class Stages:
    """A spec's stages, parsed: the op policy, its op count per view and fixed magnitude
    bin (RandAugment), and the erasing probability."""

    policy: str = "none"  # none, trivialaugment, randaugment
    num_ops: int = 0
    magnitude: int = 0  # randaugment's bin
    erase: float = 0.0
    mix: str = "none"  # none, mixup, cutmix
    mix_alpha: float = 0.0

    @property
    def mix_offset(self) -> int:
        """Where the mixing parameters start among the stages' own."""
        return 3 * self.num_ops + (5 if self.erase > 0 else 0)

    @property
    def width(self) -> int:
        """Integer parameters these stages add to a view's crop box and flip."""
        return self.mix_offset + {"none": 0, "mixup": 2, "cutmix": 6}[self.mix]


def parse_mix(mix: str) -> tuple[str, float]:
    """``none``, ``mixup:ALPHA`` or ``cutmix:ALPHA`` (0 < ALPHA <= 10) -> (kind, alpha)."""
    if mix == "none":
        return "none", 0.0
    kind, sep, alpha = mix.partition(":")
    try:
        value = float(alpha) if sep else None
    except ValueError:
        value = None
    if kind not in MIX_KINDS or value is None:
        raise ConfigError(f"mix: expected none, mixup:ALPHA or cutmix:ALPHA (e.g. cutmix:1.0), got {mix!r}")
    if not 0 < value <= MAX_MIX_ALPHA:
        raise ConfigError(f"mix: ALPHA of Beta(ALPHA, ALPHA) must be in (0, {MAX_MIX_ALPHA:g}], got {alpha}")
    return kind, value


def parse_stages(ops: str, erase: float, mix: str = "none") -> Stages:
    """``ops`` none, trivialaugment or randaugment:N:M; ``erase`` P in [0, 1]; ``mix``
    none, mixup:ALPHA or cutmix:ALPHA; anything else is a ConfigError naming the field."""
    if not 0.0 <= erase <= 1.0:
        raise ConfigError(f"erase: the erasing probability must be in [0, 1], got {erase}")
    kind, alpha = parse_mix(mix)
    return dataclasses.replace(_parse_ops(ops, erase), mix=kind, mix_alpha=alpha)


def _parse_ops(ops: str, erase: float) -> Stages:
    if ops == "none":
        return Stages(erase=erase)
    if ops == "trivialaugment":
        return Stages("trivialaugment", 1, 0, erase)
    kind, *numbers = ops.split(":")
    if kind == "randaugment" and len(numbers) == 2 and all(n.strip().isdigit() for n in numbers):
        count, magnitude = (int(n) for n in numbers)
        if not 1 <= count <= MAX_RANDAUGMENT_OPS:
            raise ConfigError(f"ops: randaugment:N:M takes N in 1..{MAX_RANDAUGMENT_OPS} ops per view, got N={count}")
        if not 0 <= magnitude < BINS:
            raise ConfigError(f"ops: randaugment:N:M takes a magnitude bin M in 0..{BINS - 1}, got M={magnitude}")
        return Stages("randaugment", count, magnitude, erase)
    raise ConfigError(f"ops: expected none, trivialaugment or randaugment:N:M (e.g. randaugment:2:9), got {ops!r}")


# ---------------------------------------------------------------- drawing


def draw(
    stages: Stages, seed: int, ids: np.ndarray, view: int, size: int, uniforms, shards: np.ndarray | None = None
) -> np.ndarray:
    """(n, stages.width) int64 stage parameters of view ``view`` of samples ``ids``, for
    views of ``size`` x ``size``; ``uniforms`` is the views' generator; ``shards`` (n, 2)
    the first id and sample count of each sample's data shard (mixing draws its partner
    there)."""
    n = len(ids)
    columns = []
    if stages.num_ops:
        u = uniforms(seed ^ _STAGE_STREAM, ids, view, 3 * stages.num_ops)
        for k in range(stages.num_ops):
            op = np.minimum((u[:, 3 * k] * len(OPS)).astype(np.int64), len(OPS) - 1)
            if stages.policy == "trivialaugment":
                magnitude_bin = np.minimum((u[:, 3 * k + 1] * BINS).astype(np.int64), BINS - 1)
            else:
                magnitude_bin = np.full(n, stages.magnitude, np.int64)
            negative = (u[:, 3 * k + 2] < 0.5).astype(np.int64)
            columns += [op, magnitude_bin, negative]
    if stages.erase > 0:
        columns += list(_erase_boxes(stages.erase, uniforms(seed ^ (_STAGE_STREAM + 1), ids, view, 41), size).T)
    if stages.mix != "none":
        if shards is None:
            raise ValueError("mixing draws a partner from each sample's data shard: pass shards")
        u = uniforms(seed ^ (_STAGE_STREAM + 2), ids, view, 1 + 2 * _GAMMA_COLUMNS + 2)
        columns += list(_mix_params(stages, np.asarray(ids, np.int64), np.asarray(shards, np.int64), u, size).T)
    return np.stack(columns, axis=1) if columns else np.zeros((n, 0), np.int64)


_GAMMA_TRIES = 8  # Marsaglia-Tsang accepts over 95% of tries: eight leave ~1e-11 to the fallback
_GAMMA_COLUMNS = 3 * _GAMMA_TRIES + 1


def _gamma(shape: float, u: np.ndarray) -> np.ndarray:
    """(n,) Gamma(shape) draws from uniforms (n, _GAMMA_COLUMNS): Marsaglia and Tsang's
    method on shape + 1 (normals by Box-Muller), times U^(1/shape). Pure float64 numpy
    arithmetic on the counter-based uniforms: the same on every machine."""
    d = shape + 1.0 - 1.0 / 3.0
    c = 1.0 / math.sqrt(9.0 * d)
    out = np.full(len(u), d)
    pending = np.ones(len(u), bool)
    for k in range(_GAMMA_TRIES):
        u1, u2, u3 = u[:, 3 * k], u[:, 3 * k + 1], u[:, 3 * k + 2]
        x = np.sqrt(-2.0 * np.log1p(-u1)) * np.cos(2.0 * math.pi * u2)
        v = (1.0 + c * x) ** 3
        safe = np.where(v > 0, v, 1.0)
        ok = pending & (v > 0) & (np.log1p(-u3) < 0.5 * x * x + d - d * safe + d * np.log(safe))
        out = np.where(ok, d * safe, out)
        pending &= ~ok
    return out * (1.0 - u[:, 3 * _GAMMA_TRIES]) ** (1.0 / shape)


def _mix_params(stages: Stages, ids: np.ndarray, shards: np.ndarray, u: np.ndarray, size: int) -> np.ndarray:
    """(n, 2 or 6): the partner (another sample of the same data shard), lambda in units
    of 2^-16, and for CutMix the pasted box (x0, y0, w, h) with lambda corrected to it."""
    first, count = shards[:, 0], shards[:, 1]
    step = np.floor(u[:, 0] * np.maximum(count - 1, 1)).astype(np.int64)
    partner = np.where(count > 1, first + (ids - first + 1 + step) % np.maximum(count, 1), ids)
    g = _GAMMA_COLUMNS
    x, y = _gamma(stages.mix_alpha, u[:, 1 : 1 + g]), _gamma(stages.mix_alpha, u[:, 1 + g : 1 + 2 * g])
    lam = x / np.maximum(x + y, 1e-300)
    if stages.mix == "mixup":
        return np.stack([partner, np.round(lam * LAMBDA_ONE).astype(np.int64)], axis=1)
    cut = np.sqrt(1.0 - lam)
    cut_w = (size * cut).astype(np.int64)
    centre_x = np.floor(u[:, 1 + 2 * g] * size).astype(np.int64)
    centre_y = np.floor(u[:, 2 + 2 * g] * size).astype(np.int64)
    x0, x1 = np.clip(centre_x - cut_w // 2, 0, size), np.clip(centre_x + cut_w // 2, 0, size)
    y0, y1 = np.clip(centre_y - cut_w // 2, 0, size), np.clip(centre_y + cut_w // 2, 0, size)
    lam = 1.0 - (x1 - x0) * (y1 - y0) / (size * size)  # the share of the sample's own pixels
    lam_q = np.round(lam * LAMBDA_ONE).astype(np.int64)
    return np.stack([partner, lam_q, x0, y0, x1 - x0, y1 - y0], axis=1)


def _erase_boxes(probability: float, u: np.ndarray, size: int) -> np.ndarray:
    """(n, 5) (applied, x0, y0, w, h): torchvision RandomErasing's sampling of a box in a
    size x size view, vectorised: the first of ten tries that fits, else none."""
    n, area = len(u), size * size
    out = np.zeros((n, 5), np.int64)
    pending = u[:, 40] < probability
    log_lo, log_hi = math.log(ERASE_RATIO[0]), math.log(ERASE_RATIO[1])
    for attempt in range(10):
        a, r, py, px = (u[:, 4 * attempt + c] for c in range(4))
        target = area * (ERASE_SCALE[0] + a * (ERASE_SCALE[1] - ERASE_SCALE[0]))
        aspect = np.exp(log_lo + r * (log_hi - log_lo))
        h = np.round(np.sqrt(target * aspect)).astype(np.int64)
        w = np.round(np.sqrt(target / aspect)).astype(np.int64)
        fits = pending & (h < size) & (w < size)
        y0 = np.floor(py * (size - h + 1)).astype(np.int64)
        x0 = np.floor(px * (size - w + 1)).astype(np.int64)
        out[fits] = np.stack([np.ones(n, np.int64), x0, y0, w, h], axis=1)[fits]
        pending &= ~fits
    return out


# ---------------------------------------------------------------- applying


def magnitude_of(stages: Stages, op: str, magnitude_bin: int, height: int, width: int) -> float:
    """torchvision's magnitude for ``op`` at ``magnitude_bin`` under the stages' policy."""
    wide = stages.policy == "trivialaugment"
    if op in ("Identity", "AutoContrast", "Equalize"):
        return 0.0
    # The tables as torchvision computes them (float32 torch), so that every bin agrees.
    if op == "Posterize":  # bits kept: 8 down to 2 (wide) or 4
        return float((8 - (torch.arange(BINS) / ((BINS - 1) / (6 if wide else 4)))).round().int()[magnitude_bin])
    if op == "Solarize":  # threshold as a fraction of the top value, 1 down to 0
        return float(torch.linspace(1.0, 0.0, BINS)[magnitude_bin])
    if op in ("ShearX", "ShearY"):
        top = 0.99 if wide else 0.3
    elif op == "TranslateX":
        top = 32.0 if wide else 150.0 / 331.0 * width
    elif op == "TranslateY":
        top = 32.0 if wide else 150.0 / 331.0 * height
    elif op == "Rotate":
        top = 135.0 if wide else 30.0
    else:  # Brightness, Color, Contrast, Sharpness
        top = 0.99 if wide else 0.9
    return float(torch.linspace(0.0, top, BINS)[magnitude_bin])


def apply_op(image: torch.Tensor, op: str, magnitude: float) -> torch.Tensor:
    """One op on a (3, H, W) uint8 view, as torchvision's auto-augment policies apply it."""
    nearest = InterpolationMode.NEAREST
    if op == "Identity":
        return image
    if op in ("ShearX", "ShearY"):
        angle = math.degrees(math.atan(magnitude))
        shear = [angle, 0.0] if op == "ShearX" else [0.0, angle]
        return TF.affine(
            image, angle=0.0, translate=[0, 0], scale=1.0, shear=shear, interpolation=nearest, fill=None, center=[0, 0]
        )
    if op in ("TranslateX", "TranslateY"):
        shift = [int(magnitude), 0] if op == "TranslateX" else [0, int(magnitude)]
        return TF.affine(
            image, angle=0.0, translate=shift, scale=1.0, shear=[0.0, 0.0], interpolation=nearest, fill=None
        )
    if op == "Rotate":
        return TF.rotate(image, angle=magnitude, interpolation=nearest, fill=None)
    if op == "Brightness":
        return TF.adjust_brightness(image, brightness_factor=1.0 + magnitude)
    if op == "Color":
        return TF.adjust_saturation(image, saturation_factor=1.0 + magnitude)
    if op == "Contrast":
        return TF.adjust_contrast(image, contrast_factor=1.0 + magnitude)
    if op == "Sharpness":
        return TF.adjust_sharpness(image, sharpness_factor=1.0 + magnitude)
    if op == "Posterize":
        return TF.posterize(image, bits=int(magnitude))
    if op == "Solarize":
        return TF.solarize(image, threshold=255.0 * magnitude)
    if op == "AutoContrast":
        return TF.autocontrast(image)
    return TF.equalize(image)


# Ops are applied per group of views that drew the same op and magnitude on a device
# (one launch per group instead of per view) and on the host for views up to this size
# (where the call costs more than the pixels). Larger host views go one at a time:
# there torchvision's batched Sharpness and Contrast cost twice as much per view and
# groups are small anyway (bench/stages.py, ops grouped against one view at a time).
GROUP_MAX_HOST_PIXELS = 64 * 64
_NO_MAGNITUDE = [OPS.index(op) for op in ("Identity", "AutoContrast", "Equalize")]
_UNSIGNED = [k for k, op in enumerate(OPS) if op not in SIGNED]


def _canonical_slots(slot: np.ndarray) -> np.ndarray:
    """(n, 3) (op index, magnitude bin, sign) with the fields an op ignores zeroed, so
    that views applying the same op alike fall in one group."""
    slot = slot.copy()
    slot[np.isin(slot[:, 0], _NO_MAGNITUDE), 1] = 0
    slot[np.isin(slot[:, 0], _UNSIGNED), 2] = 0
    return slot


def _apply_slot(stages: Stages, key: list[int], views: torch.Tensor) -> torch.Tensor:
    """One op slot (op index, magnitude bin, negative) on a view or a batch of views."""
    op_index, magnitude_bin, negative = key
    op = OPS[op_index]
    if op == "Identity":
        return views
    magnitude = magnitude_of(stages, op, magnitude_bin, views.shape[-2], views.shape[-1])
    return apply_op(views, op, -magnitude if negative else magnitude)


def apply_stages(
    stages: Stages, views: torch.Tensor, params: np.ndarray | torch.Tensor, fill: tuple[int, int, int]
) -> torch.Tensor:
    """(n, 3, H, W) uint8 views (any device) and their stage parameters (n, width) ->
    the views with the per-sample stages applied, in order: ops, then erasing (``fill``
    colour). Mixing needs the partners' views: ``mix_views``."""
    if stages.mix_offset == 0:
        return views
    params = np.asarray(torch.as_tensor(params).cpu(), np.int64)
    height, width = views.shape[-2:]
    out = views.clone()
    grouped = views.device.type != "cpu" or height * width <= GROUP_MAX_HOST_PIXELS
    for o in range(stages.num_ops):
        slot = _canonical_slots(params[:, 3 * o : 3 * o + 3])
        if not grouped:
            for k, key in enumerate(slot.tolist()):
                out[k] = _apply_slot(stages, key, out[k])
            continue
        # One call per distinct (op, magnitude) of slot o: torchvision's ops treat each
        # image of a batch alone, so a group gives what its views would one by one (tested).
        keys, group_of = np.unique(slot, axis=0, return_inverse=True)
        for g, key in enumerate(keys.tolist()):
            rows = torch.from_numpy(np.nonzero(group_of.reshape(-1) == g)[0]).to(out.device)
            out[rows] = _apply_slot(stages, key, out[rows])
    if stages.erase > 0:
        erase = params[:, 3 * stages.num_ops : 3 * stages.num_ops + 5]
        colour = torch.tensor(fill, dtype=torch.uint8, device=views.device)
        out = _paste(out, colour, erase[:, 1:] * erase[:, :1])  # not applied: an empty box
    return out


def _paste(views: torch.Tensor, source: torch.Tensor, boxes: np.ndarray, masked: bool | None = None) -> torch.Tensor:
    """``source`` ((n, 3, H, W) views, or a (3,) colour) inside each view's box (n, 4)
    (x0, y0, w, h), the rest of ``views`` kept. On a device, one masked select over the
    batch (a launch per view would cost more than the pixels); on the host, a slice copy
    per box, which touches only the box's pixels (the mask touches all of them: twice
    the time at ImageNet size, bench/stages.py). ``masked`` forces one way (tests)."""
    if source.dim() == 1:  # a colour: broadcast over every box
        source = source.view(1, 3, 1, 1)
    if masked if masked is not None else views.device.type != "cpu":
        x0, y0, w, h = torch.as_tensor(boxes, dtype=torch.int64).to(views.device).T[:, :, None, None, None]
        xs = torch.arange(views.shape[-1], device=views.device).view(1, 1, 1, -1)
        ys = torch.arange(views.shape[-2], device=views.device).view(1, 1, -1, 1)
        return torch.where((xs >= x0) & (xs < x0 + w) & (ys >= y0) & (ys < y0 + h), source, views)
    out = views.clone()
    per_view = source.shape[0] == len(views) and source.shape[-2:] == views.shape[-2:]
    for k, (x0, y0, w, h) in enumerate(np.asarray(boxes).tolist()):
        if w and h:
            box = (slice(None), slice(y0, y0 + h), slice(x0, x0 + w))
            out[(k, *box)] = source[(k, *box)] if per_view else source[0]
    return out


def mix_views(stages: Stages, views: torch.Tensor, partner_views: torch.Tensor, params) -> torch.Tensor:
    """(n, 3, H, W) uint8 views, their partners' views and the stage parameters (n, width)
    -> the mixed views: MixUp as (lambda a + (1 - lambda) b) in integer arithmetic,
    rounded half up; CutMix as the partner's box pasted into the view."""
    mix = torch.as_tensor(np.asarray(torch.as_tensor(params).cpu(), np.int64)[:, stages.mix_offset :])
    if stages.mix == "mixup":
        # Integer arithmetic carried in float32, which holds it exactly (every product and
        # sum is an integer below 2^24: 2^16 x 255 + 2^15), and is fast on every device.
        lam = mix[:, 1].to(device=views.device, dtype=torch.float32).view(-1, 1, 1, 1)
        mixed = views.float().mul_(lam).add_(partner_views.float().mul_(LAMBDA_ONE - lam)).add_(LAMBDA_ONE // 2)
        return mixed.div_(LAMBDA_ONE).floor_().to(torch.uint8)
    return _paste(views, partner_views, mix[:, 2:6].numpy())


def mix_partners(stages: Stages, params) -> tuple[np.ndarray, np.ndarray]:
    """(partner ids (n,), lambda (n,) float: the share of the sample's own label)."""
    mix = np.asarray(torch.as_tensor(params).cpu(), np.int64)[:, stages.mix_offset :]
    return mix[:, 0], mix[:, 1] / LAMBDA_ONE
