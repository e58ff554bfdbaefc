"""Cache build throughput and storage cost.

1. views/s of ``catkd cache build`` against the teacher's bare forward throughput on the
   same batches (decoding and augmentation excluded from the bare figure): the ratio
   says how much the pipeline around the teacher costs;
2. bytes per view of each storage form, and the relative error each form introduces in
   the CAT loss (against float32 targets, a resnet20 student's CAMs on the same views,
   with and without normalisation).

    .venv/bin/python bench/cache.py ../shared/data/cifar10-jpeg.tar.gz --subset 2000 --views 2
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import torch

from catkd.losses import cat_loss
from catkd.models import build_model, checkpoint_payload
from pipeline.data.views import AugmentSpec, normalize_batch, render_views
from pipeline.cache import CacheBuildConfig, TargetCache, build_cache
from pipeline.cache.verify import cache_info
from pipeline.ray_setup import init_ray
from pipeline.data.shard_writer import ShardConfig, shard_dataset
from pipeline.data.shard_format import decode_image, load_shard, read_index


def prepared_views(data: str, views: int, spec: AugmentSpec) -> list[tuple[int, int, torch.Tensor]]:
    """(shard, view, normalised batch) for every data shard and view."""
    index = read_index(data, "train")
    out = []
    for j, info in enumerate(index.shards):
        samples = load_shard(data, index, info)
        images = [decode_image(s, index.image_shape, info.name) for s in samples]
        ids = np.array([s.id for s in samples])
        for view in range(views):
            out.append((j, view, normalize_batch(spec, render_views(spec, images, ids, view)[1])))
    return out


@torch.inference_mode()
def bare_forward_rate(teacher, batches, batch_size: int) -> float:
    count, start = 0, time.perf_counter()
    for _, _, x in batches:
        for first in range(0, len(x), batch_size):
            teacher(x[first : first + batch_size])
            count += len(x[first : first + batch_size])
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("archive", help="ImageFolder-layout archive with train/ (CIFAR-10 as JPEG)")
    parser.add_argument("--teacher", default="resnet56")
    parser.add_argument("--subset", type=int, default=2000, help="training images used (evenly spaced)")
    parser.add_argument("--views", type=int, default=2)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--cpus", type=int, default=2, help="threads for the bare forward and the build actor")
    args = parser.parse_args()
    torch.set_num_threads(args.cpus)
    init_ray()
    spec = AugmentSpec.preset("cifar")
    with tempfile.TemporaryDirectory() as tmp:
        data = f"{tmp}/shards"
        shard_dataset(ShardConfig(f"imagefolder:{args.archive}", data, splits=["train"], subset=args.subset, samples_per_shard=500, encoding="raw", progress=False))
        num_classes = read_index(data, "train").num_classes
        torch.manual_seed(0)
        teacher = build_model(args.teacher, num_classes, bias=True).eval()
        weights = f"{tmp}/teacher.pth"
        torch.save(checkpoint_payload(teacher, args.teacher), weights)
        batches = prepared_views(data, args.views, spec)
        bare = bare_forward_rate(teacher, batches, args.batch)

        rows, caches = [], {}
        forms = [("float32", False), ("float16", False), ("int8", False), ("features", False), ("float16", True)]
        for storage, bf16 in forms:
            cfg = CacheBuildConfig(data=data, teacher=args.teacher, weights=weights, root=f"{tmp}/caches-{storage}-{bf16}", num_views=args.views,
                                   storage=storage, batch_size=args.batch, cpus_per_actor=args.cpus, bf16=bf16, progress=False)  # fmt: skip
            storage = f"{storage}+bf16" if bf16 else storage
            start = time.perf_counter()
            caches[storage] = TargetCache(build_cache(cfg))  # includes starting the actor and loading the teacher
            rate = args.subset * args.views / (time.perf_counter() - start)
            rows.append((storage, rate, cache_info(caches[storage].url)["bytes_per_view"]))

        student = build_model("resnet20", num_classes).eval()
        errors = {storage: {False: [], True: []} for storage in caches}
        with torch.no_grad():
            for j, view, x in batches[:: max(1, len(batches) // 6)]:
                _, student_cam = student(x)
                exact = torch.from_numpy(caches["float32"].read(j, view)["cam"])
                for storage, cache in caches.items():
                    stored = torch.from_numpy(cache.read(j, view)["cam"])
                    for normalize in (False, True):
                        ref = float(cat_loss(student_cam, exact, 2, normalize))
                        errors[storage][normalize].append(abs(float(cat_loss(student_cam, stored, 2, normalize)) / ref - 1))

    print(f"\nteacher {args.teacher}, {args.subset} CIFAR-10 images x {args.views} views, batch {args.batch}, {args.cpus} CPU threads")
    print(f"bare teacher forward (same batches): {bare:,.0f} views/s")
    print(f"{'storage':<10}{'build views/s':>15}{'vs bare':>9}{'bytes/view':>12}{'CAT loss rel. err':>19}{'(normalised)':>14}")
    for storage, rate, per_view in rows:
        e, en = max(errors[storage][False]), max(errors[storage][True])
        print(f"{storage:<10}{rate:>15,.0f}{rate / bare:>9.2f}{per_view:>12.1f}{e:>19.2e}{en:>14.2e}")


if __name__ == "__main__":
    main()
