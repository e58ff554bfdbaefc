"""The host's work per image on each view path, and how far the renderers disagree.

On generated ImageNet-like JPEGs sharded at short side 256 (``bench/imagenet_like.py``;
nothing downloaded), in one process, one thread, alternating rounds:

1. host time per image for S views (the imagenet spec), on three paths:
   - ``cpu``: what the cache feed and the loader did until now, and still do without
     CUDA: decode, then crop, resize and flip every view on the host;
   - ``device``: decode on the host, pack; the views are rendered on the device;
   - ``device+nvjpeg``: read the frame header and pack the JPEG bytes; nvJPEG decodes
     on the device (``host_images.pack``);
   and the bytes per image each path sends to the device (or through the object store);
2. the device renderer's result against the CPU renderer's on the same views (run
   here on CPU tensors: the same arithmetic a GPU does in float32), as the largest
   pixel difference and the fraction of pixels that differ; and its own CPU cost.

    .venv/bin/python bench/render.py --work outputs/render
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.imagenet_like import make_folder  # noqa: E402
from pipeline.data import host_images  # noqa: E402
from pipeline.data.device_render import render_on_device  # noqa: E402
from pipeline.data.shard_format import decode_image, load_shard, read_index  # noqa: E402
from pipeline.data.shard_writer import ShardConfig, shard_dataset  # noqa: E402
from pipeline.data.views import AugmentSpec, render_views, view_params  # noqa: E402


def make_shards(work: str, images: int) -> str:
    folder, data = os.path.join(work, "folder"), os.path.join(work, "shards-256")
    if not os.path.exists(os.path.join(data, "train.index.json")):
        make_folder(folder, images, 20)
        with ProcessPoolExecutor(os.cpu_count()) as pool:  # no Ray needed for this bench
            shard_dataset(
                ShardConfig(f"imagefolder:{folder}", data, samples_per_shard=250, max_short_side=256, progress=False),
                pool=pool,
            )
    return data


def host_paths(samples, shape, spec: AugmentSpec, views: int) -> dict:
    """One pass of each path over ``samples``: seconds and bytes handed on."""
    ids = np.array([s.id for s in samples], np.int64)
    out = {}
    start = time.perf_counter()
    decoded = [decode_image(s, shape, "bench") for s in samples]
    rendered = [render_views(spec, decoded, ids, v)[1] for v in range(views)]
    out["cpu"] = (time.perf_counter() - start, sum(r.numel() for r in rendered))
    for name, decoder in (("device", "cpu"), ("device+nvjpeg", "nvjpeg")):
        start = time.perf_counter()
        packed = host_images.pack(samples, shape, "bench", decoder)
        hw = host_images.image_sizes(packed)
        np.stack([view_params(spec, ids, v, hw) for v in range(views)], axis=1)
        out[name] = (time.perf_counter() - start, int(packed["host_data"].nbytes))
    return out


def renderer_difference(samples, shape, views: int) -> dict:
    """Device renderer (on CPU tensors) against the CPU renderer, on the same views."""
    spec = AugmentSpec.preset("imagenet", seed=0)
    decoded = [decode_image(s, shape, "bench") for s in samples]
    ids = np.array([s.id for s in samples], np.int64)
    params, cpu = zip(*(render_views(spec, decoded, ids, v) for v in range(views)), strict=True)
    cpu = torch.stack(cpu, 1)
    start = time.perf_counter()
    device = render_on_device(
        spec,
        [torch.from_numpy(np.ascontiguousarray(d)).permute(2, 0, 1) for d in decoded],
        torch.from_numpy(np.stack(params, 1)),
    )
    seconds = time.perf_counter() - start
    diff = (device.int() - cpu.int()).abs()
    return {
        "views": int(cpu.shape[0] * cpu.shape[1]),
        "max_pixel_difference": int(diff.max()),
        "fraction_of_pixels_differing": float((diff > 0).double().mean()),
        "device_renderer_on_cpu_ms_per_view": 1e3 * seconds / (cpu.shape[0] * cpu.shape[1]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="outputs/render")
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--views", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", help="write the figures here as JSON")
    args = parser.parse_args()
    torch.set_num_threads(1)  # a loader worker or feed task has one core
    data = make_shards(args.work, args.images)
    index = read_index(data, "train")
    samples = [s for info in index.shards for s in load_shard(data, index, info)]
    spec = AugmentSpec.preset("imagenet", seed=0)
    print(
        f"{len(samples)} ImageNet-like JPEGs at short side 256, S = {args.views} views, one thread, {args.rounds} "
        "alternating rounds",
        flush=True,
    )
    rounds = [host_paths(samples, index.image_shape, spec, args.views) for _ in range(args.rounds)]
    figures: dict = {"images": len(samples), "views": args.views, "paths": {}}
    base = min(r["cpu"][0] for r in rounds)
    for name in rounds[0]:
        best = min(r[name][0] for r in rounds)
        per_image_ms, mb = 1e3 * best / len(samples), rounds[0][name][1] / len(samples) / 1e3
        figures["paths"][name] = {
            "host_ms_per_image": per_image_ms,
            "kb_per_image_to_device": mb,
            "vs_cpu_path": base / best,
        }
        print(
            f"  {name:<14} host {per_image_ms:6.2f} ms/image  ({base / best:5.1f}x the cpu path's rate)  {mb:7.1f} "
            "KB/image handed on",
            flush=True,
        )
    diff = renderer_difference(samples[:200], index.image_shape, args.views)
    figures["renderer_difference"] = diff
    print(
        f"device renderer vs cpu renderer on {diff['views']} views: "
        f"largest pixel difference {diff['max_pixel_difference']}, "
        f"{100 * diff['fraction_of_pixels_differing']:.5f}% of pixels differ; "
        f"device renderer on this CPU {diff['device_renderer_on_cpu_ms_per_view']:.2f} ms/view"
    )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(figures, f, indent=1)


if __name__ == "__main__":
    main()
