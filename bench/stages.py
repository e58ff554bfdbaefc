"""What the augmentation stages cost the host per view, next to the crop alone.

Renders the same random images through ``views.render_views`` (the CPU renderer the
cache feed and the loader use) with each stage setting, one thread, alternating rounds,
and prints the best round's time per view and its ratio to the crop alone, for the
cifar spec (32 x 32 images) and the imagenet spec (256 x 341 images, 224 views).

    .venv/bin/python bench/stages.py [--images 512] [--rounds 3] [--out stages.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.data.views import AugmentSpec, MixSource, render_views  # noqa: E402

SETTINGS = [
    ("none", 0.0, "none"),
    ("trivialaugment", 0.0, "none"),
    ("randaugment:2:9", 0.0, "none"),
    ("none", 0.25, "none"),
    ("trivialaugment", 0.25, "none"),
    ("none", 0.0, "mixup:0.2"),
    ("none", 0.0, "cutmix:1.0"),
]
SHAPES = {"cifar": (32, 32), "imagenet": (256, 341)}


def seconds_per_view(spec: AugmentSpec, images: list[np.ndarray], ids: np.ndarray, view: int) -> float:
    """The images are one data shard: a mixing spec draws its partners among them (and
    renders each partner's own view, as the loader and the cache build do)."""
    mixing = MixSource(np.tile([0, len(ids)], (len(ids), 1)), lambda pids: ([images[int(p)] for p in pids], None))
    start = time.perf_counter()
    render_views(spec, images, ids, view, mixing=mixing if spec.mixes else None)
    return (time.perf_counter() - start) / len(images)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", help="write the figures here as JSON")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # a loader worker or feed task has one core
    rng = np.random.default_rng(0)
    figures: dict = {}
    for name, (height, width) in SHAPES.items():
        count = args.images if name == "cifar" else max(16, args.images // 8)
        images = [rng.integers(0, 256, (height, width, 3), dtype=np.uint8) for _ in range(count)]
        ids = np.arange(count)
        best = {setting: float("inf") for setting in SETTINGS}
        for round_ in range(args.rounds):
            for ops, erase, mix in SETTINGS:  # alternating: every setting once per round
                spec = AugmentSpec.preset(name, ops=ops, erase=erase, mix=mix)
                best[(ops, erase, mix)] = min(best[(ops, erase, mix)], seconds_per_view(spec, images, ids, round_))
        base = best[("none", 0.0, "none")]
        print(f"{name}: {count} images of {height} x {width}, one thread, best of {args.rounds} rounds")
        figures[name] = {}
        for (ops, erase, mix), seconds in best.items():
            label = (
                " + ".join(
                    [part for part in (ops, f"erase {erase:g}" if erase else "", mix) if part and part != "none"]
                )
                or "crop alone"
            )
            figures[name][label] = {"us_per_view": 1e6 * seconds, "vs_crop_alone": seconds / base}
            print(f"  {label:<30} {1e6 * seconds:8.1f} us/view  {seconds / base:5.2f}x the crop alone")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(figures, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
