"""Generated ImageNet-like data for benchmarks: nothing downloaded.

ImageNet-1k training images are JPEGs of about 400x350 pixels on average (most are
500x375, 375x500 or 500x333; a tail reaches past 1,000 pixels) and about 110 KB each.
What makes a loader slow is exactly that: pixel count and entropy-coded bytes per
image, so this generator matches both. Content: a smooth per-class colour field, a few
random shapes and fine grain noise, saved at JPEG quality 90; each image is a pure
function of (seed, class, index), so a folder can be made again identically.
"""

from __future__ import annotations

import io
import os
from concurrent.futures import ProcessPoolExecutor

import numpy as np
from PIL import Image, ImageDraw

# (long side, short side / long side, probability): the common ImageNet shapes, then a tail.
_SHAPES = [
    (500, 0.75, 0.55),
    (500, 0.666, 0.15),
    (500, 1.0, 0.04),
    (400, 0.75, 0.1),
    (333, 0.75, 0.1),
    (800, 0.75, 0.04),
    (1024, 0.68, 0.02),
]
_GRAIN_SIDE = 1100  # one grain tile per process; each image takes a window of it at a random offset


def image_size(rng: np.random.Generator) -> tuple[int, int]:
    """(height, width) drawn from ImageNet-like shapes; a quarter are portrait."""
    k = rng.choice(len(_SHAPES), p=[s[2] for s in _SHAPES])
    long_side, ratio = _SHAPES[k][0], _SHAPES[k][1]
    short_side = int(round(long_side * ratio))
    return (long_side, short_side) if rng.random() < 0.25 else (short_side, long_side)


_grain: np.ndarray | None = None


def _grain_tile() -> np.ndarray:
    global _grain
    if _grain is None:
        _grain = np.random.default_rng(12345).normal(0, 26, (_GRAIN_SIDE, _GRAIN_SIDE, 3)).astype(np.float32)
    return _grain


def make_image(seed: int, label: int, index: int) -> bytes:
    """One JPEG (bytes), a pure function of its arguments."""
    rng = np.random.default_rng([seed, label, index])
    h, w = image_size(rng)
    base = np.random.default_rng([seed, label]).integers(40, 216, 3).astype(np.float32)
    # A separable smooth field: sin over x times cos over y, tinted per image.
    fx = np.sin(np.arange(w, dtype=np.float32) / rng.uniform(20, 90) + rng.uniform(0, 6))
    fy = np.cos(np.arange(h, dtype=np.float32) / rng.uniform(20, 90)) * 50
    tint = rng.uniform(-1, 1, 3).astype(np.float32)
    pixels = base + (fy[:, None, None] * fx[None, :, None]) * tint
    img = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 8))):
        x0, y0 = int(rng.integers(0, w - 20)), int(rng.integers(0, h - 20))
        box = [x0, y0, x0 + int(rng.integers(20, w // 2)), y0 + int(rng.integers(20, h // 2))]
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
    gy, gx = int(rng.integers(0, _GRAIN_SIDE - h + 1)), int(rng.integers(0, _GRAIN_SIDE - w + 1))
    pixels = np.clip(np.asarray(img, np.float32) + _grain_tile()[gy : gy + h, gx : gx + w], 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _write_class(args: tuple[str, int, int, int, str]) -> int:
    root, seed, label, count, split = args
    folder = os.path.join(root, split, f"n{label:08d}")
    os.makedirs(folder, exist_ok=True)
    total = 0
    for k in range(count):
        path = os.path.join(folder, f"{split}_{label:04d}_{k:05d}.JPEG")
        if not os.path.exists(path):
            data = make_image(seed + (split != "train"), label, k)
            with open(path + ".tmp", "wb") as f:
                f.write(data)
            os.replace(path + ".tmp", path)
        total += os.path.getsize(path)
    return total


def make_folder(
    root: str, images: int = 20_000, classes: int = 100, val_images: int = 0, seed: int = 0, workers: int | None = None
) -> dict[str, float]:
    """``root/train/<class>/*.JPEG`` (and ``root/val/...`` when ``val_images``), made in
    parallel; files already there are kept. Returns counts and mean bytes and pixels."""
    jobs = [(root, seed, c, images // classes, "train") for c in range(classes)]
    jobs += [(root, seed, c, val_images // classes, "val") for c in range(classes) if val_images]
    with ProcessPoolExecutor(workers or os.cpu_count()) as pool:
        total_bytes = sum(pool.map(_write_class, jobs))
    sizes = [
        image_size(np.random.default_rng([seed, c, k]))
        for c in range(min(classes, 10))
        for k in range(images // classes)
    ]
    count = (images // classes + val_images // classes) * classes
    return {
        "images": count,
        "classes": classes,
        "mean_kb": total_bytes / count / 1e3,
        "mean_pixels": float(np.mean([h * w for h, w in sizes])),
    }
