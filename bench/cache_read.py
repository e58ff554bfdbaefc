"""Reading cached targets per sample, full against top-k storage, and the size
arithmetic of each form at ImageNet scale.

``read``: writes real zarr groups in each storage form with the cache's own layout code
(``pipeline.cache.layout``: the same arrays, chunks and codecs a build writes), from
synthetic teacher outputs, then times what a training loader does per data shard and
epoch (``read_view`` of one view in the stored form) plus what the training device
does with it (``decode_stored``), alternating the forms round by round on the same
machine; it prints microseconds per sample, the ratio to the full float16 form, and
the stored and raw bytes per view.

``sizes``: bytes per view and whole-cache size of each form for ImageNet-1k and -21k,
from ``layout.raw_bytes_per_view`` (docs/cache.md's tables are this output).

    .venv/bin/python bench/cache_read.py read
    .venv/bin/python bench/cache_read.py sizes
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.cache.layout import decode_stored, encode_targets, raw_bytes_per_view, read_view, write_group
from pipeline.storage import zarr_store

# name -> (classes, training images)
IMAGENET = {"ImageNet-1k": (1000, 1_281_167), "ImageNet-21k": (21841, 14_197_122)}


def _teacher_outputs(n: int, views: int, classes: int, r: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Pooled CAMs whose magnitude follows the logits (a class with a high logit has
    strong maps), as a real teacher's do; values are random otherwise."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(scale=2.0, size=(n, views, classes)).astype(np.float32)
    cam = (logits[..., None, None] + rng.normal(scale=0.5, size=(n, views, classes, r, r))).astype(np.float32)
    return cam, logits


def _write(root: Path, form: str, shards: int, n: int, views: int, classes: int, r: int) -> list[str]:
    paths = []
    for j in range(shards):
        cam, logits = _teacher_outputs(n, views, classes, r, seed=j)
        arrays = encode_targets(form, cam, logits, None)
        arrays |= {
            "params": np.zeros((n, views, 5), np.int32),
            "ids": np.arange(j * n, (j + 1) * n, dtype=np.int64),
        }
        path = root / form.replace(":", "-") / f"shard-{j:06d}.zarr"
        write_group(str(path), arrays)
        paths.append(str(path))
    return paths


def _du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _read_once(paths: list[str], form: str, view: int, classes: int) -> float:
    start = time.perf_counter()
    for path in paths:
        stored = read_view(zarr_store(path, read_only=True), form, view, None, decode=False)
        tensors = {name: torch.from_numpy(a) for name, a in stored.items() if name not in ("ids", "params")}
        decode_stored(tensors, None, classes)
    return time.perf_counter() - start


def read(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)  # a loader worker's share
    settings = [(10, 2, ["float16", "int8", "topk:1", "topk:2", "topk:5"]), (1000, 4, ["float16", "int8"])]
    settings[1][2].extend(f"topk:{k}" for k in (10, 50, 100))
    print(
        f"{args.shards} data shards x {args.samples} samples, S = {args.views}; one view read and decoded per shard, "
        f"best of {args.rounds} alternating rounds, one thread, {os.cpu_count()} CPUs"
    )
    with tempfile.TemporaryDirectory() as tmp:
        for classes, r, forms in settings:
            root = Path(tmp) / f"c{classes}-r{r}"
            paths = {form: _write(root, form, args.shards, args.samples, args.views, classes, r) for form in forms}
            best = dict.fromkeys(forms, float("inf"))
            for round_ in range(args.rounds):
                for form in forms if round_ % 2 == 0 else reversed(forms):
                    best[form] = min(best[form], _read_once(paths[form], form, round_ % args.views, classes))
            samples = args.shards * args.samples
            print(f"\nC = {classes}, r = {r}")
            print("| form | us per sample | vs float16 | stored B per view | raw B per view |")
            print("|---|---:|---:|---:|---:|")
            for form in forms:
                stored = _du(root / form.replace(":", "-")) / (samples * args.views)
                print(
                    f"| `{form}` | {1e6 * best[form] / samples:.2f} | {best[form] / best['float16']:.2f} | "
                    f"{stored:,.0f} | {raw_bytes_per_view(form, classes, r):,} |"
                )


def imagenet_sizes(views: int) -> list[dict]:
    """Bytes per view and whole-cache bytes of each form at ImageNet scale, S = ``views``
    (this command's table and bench/topk_study.py's)."""
    rows = []
    for name, (classes, images) in IMAGENET.items():
        for r in (2, 4):
            for form in ("float16", "int8", "topk:10", "topk:50", "topk:100"):
                per_view = raw_bytes_per_view(form, classes, r)
                rows.append(
                    {
                        "dataset": name,
                        "classes": classes,
                        "images": images,
                        "r": r,
                        "storage": form,
                        "bytes_per_view": per_view,
                        "cache_bytes": per_view * images * views,
                    }
                )
    return rows


def sizes(args: argparse.Namespace) -> None:
    print(f"S = {args.views} views; " + ", ".join(f"{n}: {images:,} images" for n, (_, images) in IMAGENET.items()))
    print("| classes | r | form | bytes per view | whole cache |")
    print("|---:|---:|---|---:|---:|")
    for row in imagenet_sizes(args.views):
        print(
            f"| {row['classes']:,} | {row['r']} | `{row['storage']}` | {row['bytes_per_view']:,} | "
            f"{row['cache_bytes'] / 1e9:,.1f} GB |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    r = sub.add_parser("read", help="per-sample read + decode time of each form")
    r.add_argument("--shards", type=int, default=4)
    r.add_argument("--samples", type=int, default=1000, help="samples per data shard (catkd shard's default)")
    r.add_argument("--views", type=int, default=2)
    r.add_argument("--rounds", type=int, default=6)
    r.set_defaults(func=read)
    s = sub.add_parser("sizes", help="bytes per view and cache size at ImageNet scale")
    s.add_argument("--views", type=int, default=8)
    s.set_defaults(func=sizes)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
