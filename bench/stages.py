"""What the augmentation stages cost the host per view, next to the crop alone.

Renders the same random images through ``views.render_views`` (the CPU renderer the
cache feed and the loader use) with each stage setting, one thread, alternating rounds,
and prints the best round's time per view and its ratio to the crop alone, for the
cifar spec (32 x 32 images) and the imagenet spec (256 x 341 images, 224 views). Then,
side by side, the ops stage alone applied as ``stages.apply_stages`` does (on the host,
one call per distinct op and magnitude for views up to 64 x 64, one view at a time
above) and one view at a time (the way it was applied before).

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

from pipeline.data import stages as view_stages  # noqa: E402
from pipeline.data.views import NUM_PARAMS, AugmentSpec, MixSource, render_views  # noqa: E402

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


def one_by_one(stages: view_stages.Stages, views: torch.Tensor, params: np.ndarray) -> torch.Tensor:
    """The ops as they were applied before grouping: every op slot of every view alone."""
    out = views.clone()
    height, width = views.shape[-2:]
    for k in range(len(out)):
        for o in range(stages.num_ops):
            op_index, magnitude_bin, negative = (int(v) for v in params[k, 3 * o : 3 * o + 3])
            op = view_stages.OPS[op_index]
            magnitude = view_stages.magnitude_of(stages, op, magnitude_bin, height, width)
            out[k] = view_stages.apply_op(
                out[k], op, -magnitude if negative and op in view_stages.SIGNED else magnitude
            )
    return out


def grouped_vs_one_by_one(name: str, images: list[np.ndarray], ids: np.ndarray, rounds: int) -> dict:
    """The ops stage alone on the same rendered crops: grouped (apply_stages) against one
    view at a time, seconds per view of the best of ``rounds`` alternating rounds."""
    out = {}
    for ops in ("trivialaugment", "randaugment:2:9"):
        spec = AugmentSpec.preset(name, ops=ops)
        params, _ = render_views(spec, images, ids, 0)
        crops = render_views(AugmentSpec.preset(name), images, ids, 0, stored_params=params[:, :NUM_PARAMS])[1]
        stage_params = params[:, NUM_PARAMS:]
        best = {"grouped": float("inf"), "one_by_one": float("inf")}
        for _ in range(rounds):
            start = time.perf_counter()
            view_stages.apply_stages(spec.stages, crops, stage_params, (0, 0, 0))
            best["grouped"] = min(best["grouped"], (time.perf_counter() - start) / len(ids))
            start = time.perf_counter()
            one_by_one(spec.stages, crops, stage_params)
            best["one_by_one"] = min(best["one_by_one"], (time.perf_counter() - start) / len(ids))
        out[ops] = {
            "grouped_us_per_view": 1e6 * best["grouped"],
            "one_by_one_us_per_view": 1e6 * best["one_by_one"],
            "speedup": best["one_by_one"] / best["grouped"],
        }
        print(
            f"  ops {ops:<26} apply_stages {1e6 * best['grouped']:8.1f} us/view, one view at a time "
            f"{1e6 * best['one_by_one']:8.1f} us/view: {best['one_by_one'] / best['grouped']:.2f}x"
        )
    return out


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
        figures[name]["ops_grouped_vs_one_by_one"] = grouped_vs_one_by_one(name, images, ids, args.rounds)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(figures, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
