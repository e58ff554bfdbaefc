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

Stages act on the rendered uint8 view, on whatever device it is on: the CPU renderer
and the device renderer apply the same function after their crop.
"""

from __future__ import annotations

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

    @property
    def width(self) -> int:
        """Integer parameters these stages add to a view's crop box and flip."""
        return 3 * self.num_ops + (5 if self.erase > 0 else 0)


def parse_stages(ops: str, erase: float) -> Stages:
    """``ops`` none, trivialaugment or randaugment:N:M; ``erase`` P in [0, 1]; anything
    else is a ConfigError naming the field."""
    if not 0.0 <= erase <= 1.0:
        raise ConfigError(f"erase: the erasing probability must be in [0, 1], got {erase}")
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


def draw(stages: Stages, seed: int, ids: np.ndarray, view: int, size: int, uniforms) -> np.ndarray:
    """(n, stages.width) int64 stage parameters of view ``view`` of samples ``ids``, for
    views of ``size`` x ``size``; ``uniforms`` is the views' generator."""
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
    return np.stack(columns, axis=1) if columns else np.zeros((n, 0), np.int64)


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


def apply_stages(
    stages: Stages, views: torch.Tensor, params: np.ndarray | torch.Tensor, fill: tuple[int, int, int]
) -> torch.Tensor:
    """(n, 3, H, W) uint8 views (any device) and their stage parameters (n, width) ->
    the views with every stage applied, in order: ops, then erasing (``fill`` colour)."""
    if stages.width == 0:
        return views
    params = np.asarray(torch.as_tensor(params).cpu(), np.int64)
    height, width = views.shape[-2:]
    out = views.clone()
    for k in range(len(out)):
        for o in range(stages.num_ops):
            op_index, magnitude_bin, negative = (int(v) for v in params[k, 3 * o : 3 * o + 3])
            op = OPS[op_index]
            magnitude = magnitude_of(stages, op, magnitude_bin, height, width)
            if negative and op in SIGNED:
                magnitude = -magnitude
            out[k] = apply_op(out[k], op, magnitude)
    if stages.erase > 0:
        colour = torch.tensor(fill, dtype=torch.uint8, device=views.device)[:, None, None]
        for k in np.nonzero(params[:, 3 * stages.num_ops])[0].tolist():
            _, x0, y0, w, h = (int(v) for v in params[k, 3 * stages.num_ops :])
            out[k, :, y0 : y0 + h, x0 : x0 + w] = colour
    return out
