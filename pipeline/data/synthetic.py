"""``synthetic:shapes``: the project's own dataset, so the demo and tests need nothing
from outside.

Each image holds one coloured shape (the class: shape x colour) at a random position
and scale on a cluttered, noisy background of dull-coloured distractor strokes, so the
class is decided by a small region and a CAM has something real to localise. Sample
``i`` depends only on (seed, i), never on how many samples are made or in what order,
so shards can be generated in parallel. Each sample's object box is returned too.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SHAPES = ("circle", "square", "triangle", "cross", "ring")
COLOURS = {"red": (215, 45, 40), "blue": (45, 85, 225)}
CLASSES = tuple(f"{c}_{s}" for c in COLOURS for s in SHAPES)


@dataclass(frozen=True)
class ShapesSample:
    image: np.ndarray  # (size, size, 3) uint8
    label: int
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels, x1/y1 exclusive


def _shape_mask(kind: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    """Pixels of a shape of radius r centred at dx = dy = 0."""
    ax, ay = np.abs(dx), np.abs(dy)
    if kind == "circle":
        return dx**2 + dy**2 <= r**2
    if kind == "square":
        return np.maximum(ax, ay) <= 0.8 * r
    if kind == "triangle":  # apex up: width grows linearly from the top
        return (dy >= -r) & (dy <= 0.8 * r) & (ax <= (dy + r) * 0.55)
    if kind == "cross":
        arm = r / 3
        return ((ax <= arm) & (ay <= r)) | ((ay <= arm) & (ax <= r))
    if kind == "ring":
        d2 = dx**2 + dy**2
        return (d2 <= r**2) & (d2 >= (0.55 * r) ** 2)
    raise ValueError(f"unknown shape {kind!r}")


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    base = rng.uniform(60, 170, size=3)
    img = np.empty((size, size, 3), np.float32)
    img[:] = base
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    # Distractors: low-saturation bars and blobs, so colour alone never names the class.
    for _ in range(rng.integers(3, 7)):
        grey = rng.uniform(30, 220)
        tint = grey + rng.uniform(-25, 25, size=3)
        x0, y0 = rng.uniform(0, size, 2)
        if rng.random() < 0.5:
            w, h = rng.uniform(1, size / 3, 2)
            region = (np.abs(xx - x0) <= w / 2) & (np.abs(yy - y0) <= h / 6 + 0.5)
        else:
            rad = rng.uniform(1, size / 6)
            region = (xx - x0) ** 2 + (yy - y0) ** 2 <= rad**2
        img[region] = tint
    img += rng.normal(0, 18, size=img.shape)
    return img


def make_sample(seed: int, index: int, size: int = 32) -> ShapesSample:
    rng = np.random.default_rng([seed, index])
    label = int(rng.integers(len(CLASSES)))
    colour_name, shape = CLASSES[label].split("_")
    img = _background(rng, size)
    r = rng.uniform(0.14, 0.3) * size
    cx, cy = rng.uniform(r, size - r, 2)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    mask = _shape_mask(shape, xx - cx, yy - cy, r)
    colour = np.asarray(COLOURS[colour_name], np.float32) + rng.uniform(-20, 20, size=3)
    img[mask] = colour + rng.normal(0, 10, size=(int(mask.sum()), 3))
    ys, xs = np.nonzero(mask)
    box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
    return ShapesSample(np.clip(img, 0, 255).astype(np.uint8), label, box)


def make_arrays(seed: int, start: int, count: int, size: int = 32) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Samples start..start+count-1 as (images (n,H,W,3) uint8, labels (n,), boxes (n,4))."""
    samples = [make_sample(seed, i, size) for i in range(start, start + count)]
    images = np.stack([s.image for s in samples])
    labels = np.array([s.label for s in samples], np.int64)
    boxes = np.array([s.box for s in samples], np.int64)
    return images, labels, boxes
