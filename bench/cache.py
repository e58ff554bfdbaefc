"""Cache build throughput and storage cost.

``storage`` (on an ImageFolder archive such as CIFAR-10 as JPEG):
1. views/s of ``catkd cache build`` against the teacher's bare forward throughput on the
   same batches (decoding and augmentation excluded from the bare figure);
2. bytes per view of each storage form, and the relative error each form introduces in
   the CAT loss (against float32 targets, a resnet20 student's CAMs on the same views,
   with and without normalisation).

``speed`` (on generated data, nothing needed):
3. the feed alone: views/s that CPU feed tasks render at the imagenet spec on
   ImageNet-like JPEGs with 1 and with 2 CPUs (each sample decoded once for its S views);
4. a build long enough that start-up is under 10% of it (CIFAR-size shapes, cifar spec,
   20,000 views) against the bare teacher forward over the same views, both on one
   thread for the teacher and in the same memory format (channels-last by default);
5. with ``--ablations``, the two CPU settings the build applies, each against its
   absence, alternating: channels-last against contiguous tensors (the bench's teacher,
   and tv_resnet34 at the imagenet spec), and glibc malloc keeping freed memory
   (``pipeline.malloc``) against its defaults (two fresh processes).

    .venv/bin/python bench/cache.py storage ../shared/data/cifar10-jpeg.tar.gz --subset 2000 --views 2
    .venv/bin/python bench/cache.py speed --ablations
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time

import numpy as np
import torch

from catkd.losses import cat_loss
from catkd.models import build_model, checkpoint_payload
from pipeline.cache import CacheBuildConfig, TargetCache, build_cache
from pipeline.cache.builder import BuildTiming
from pipeline.cache.feed import render_chunks
from pipeline.cache.teacher import TeacherRunner, TeacherSettings
from pipeline.cache.verify import cache_info
from pipeline.data.shard_format import decode_image, load_shard, read_index
from pipeline.data.shard_writer import ShardConfig, shard_dataset
from pipeline.data.views import AugmentSpec, normalize_batch, render_views
from pipeline.malloc import keep_freed_memory
from pipeline.ray_setup import init_ray


def prepared_views(
    data: str, views: int, spec: AugmentSpec, channels_last: bool
) -> list[tuple[int, int, torch.Tensor]]:
    """(shard, view, normalised batch) for every data shard and view, in the memory
    format the build's teacher uses: on CPU, channels-last convolutions are 1.2-1.3x
    faster, so a bare figure in another format is no fair reference."""
    index = read_index(data, "train")
    out = []
    layout = torch.channels_last if channels_last else torch.contiguous_format
    for j, info in enumerate(index.shards):
        samples = load_shard(data, index, info)
        images = [decode_image(s, index.image_shape, info.name) for s in samples]
        ids = np.array([s.id for s in samples])
        for view in range(views):
            out.append(
                (
                    j,
                    view,
                    normalize_batch(spec, render_views(spec, images, ids, view)[1]).contiguous(memory_format=layout),
                )
            )
    return out


def bare_teacher(teacher: torch.nn.Module, spec: AugmentSpec, channels_last: bool) -> torch.nn.Module:
    """The teacher as the build's runner holds it on CPU (memory format, eval mode), from
    ``pipeline.cache.teacher.TeacherRunner`` itself so that the two cannot drift apart."""
    return TeacherRunner(teacher, spec, TeacherSettings(channels_last=channels_last), torch.device("cpu")).model


@torch.inference_mode()
def bare_forward_rate(teacher, batches, batch_size: int) -> float:
    count, start = 0, time.perf_counter()
    for _, _, x in batches:
        for first in range(0, len(x), batch_size):
            teacher(x[first : first + batch_size])
            count += len(x[first : first + batch_size])
    return count / (time.perf_counter() - start)


def feed_rate(data: str, spec: AugmentSpec, views: int, cpus: int) -> float:
    """Views/s of ``cpus`` feed tasks rendering every shard of ``data`` (no teacher)."""
    import ray

    index = read_index(data, "train")
    index_ref = ray.put(index)

    @ray.remote(num_cpus=1)
    def drain(j: int) -> int:  # one task renders one shard, as the builder's feed tasks do
        return sum(
            len(c.ids) * views for c in render_chunks(data, ray.get(index_ref), j, spec, views, max(1, 512 // views))
        )

    start = time.perf_counter()
    pending, total = list(range(len(index.shards))), 0
    running = [drain.remote(pending.pop(0)) for _ in range(min(cpus, len(pending)))]
    while running:
        ready, running = ray.wait(running, num_returns=1)
        total += ray.get(ready[0])
        if pending:
            running.append(drain.remote(pending.pop(0)))
    return total / (time.perf_counter() - start)


def speed(args: argparse.Namespace) -> None:
    import os
    import sys

    import ray

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from bench.imagenet_like import make_folder

    init_ray()
    keep_freed_memory()  # the bare forward in this process runs as the build's teacher does
    with tempfile.TemporaryDirectory() as tmp:
        make_folder(f"{tmp}/folder", args.feed_images, 10)
        data = f"{tmp}/imagenet-like"
        shard_dataset(
            ShardConfig(f"imagefolder:{tmp}/folder", data, samples_per_shard=args.feed_images // 8, progress=False)
        )
        spec = AugmentSpec.preset("imagenet")
        rates = {cpus: feed_rate(data, spec, args.views, cpus) for cpus in (1, 2)}
        rates = {cpus: max(rates[cpus], feed_rate(data, spec, args.views, cpus)) for cpus in (1, 2)}  # best of two
        print(
            f"feed at the imagenet spec, {args.feed_images} ImageNet-like JPEGs x {args.views} views: "
            f"1 CPU {rates[1]:,.0f} views/s, 2 CPUs {rates[2]:,.0f} views/s ({rates[2] / rates[1]:.2f}x)"
        )

        shapes = f"{tmp}/shapes"
        samples = args.build_views // args.views
        shard_dataset(
            ShardConfig(
                "synthetic:shapes",
                shapes,
                splits=["train"],
                samples_per_shard=1000,
                synthetic={"train_samples": samples},
                progress=False,
            )
        )
        torch.manual_seed(0)
        teacher = build_model(args.teacher, 10, bias=True).eval()
        weights = f"{tmp}/teacher.pth"
        torch.save(checkpoint_payload(teacher, args.teacher), weights)
        cifar = AugmentSpec.preset("cifar")
        torch.set_num_threads(1)  # the build's actor has one CPU, so one thread
        if args.ablations:
            for arch, classes, preset, views in (
                (args.teacher, 10, "cifar", 2048),
                ("tv_resnet34", 1000, "imagenet", 32),
            ):
                rates = layout_rates(arch, classes, AugmentSpec.preset(preset), views, min(args.batch, views))
                print(
                    f"teacher runner on one thread, {arch} at the {preset} spec: "
                    f"contiguous {rates[False]:,.1f} views/s, "
                    f"channels_last {rates[True]:,.1f} views/s ({rates[True] / rates[False]:.2f}x)"
                )
        cfg = CacheBuildConfig(
            data=shapes,
            teacher=args.teacher,
            weights=weights,
            root=f"{tmp}/cache",
            num_views=args.views,
            batch_size=args.batch,
            cpus_per_actor=1,
            channels_last=args.channels_last,
            progress=False,
        )
        batches = prepared_views(shapes, args.views, cifar, cfg.channels_last)
        teacher = bare_teacher(teacher, cifar, cfg.channels_last)
        if args.ablations:
            rates = malloc_rates(teacher, [x for _, _, x in batches[:4]], args.batch)
            print(
                f"bare forward in a fresh 1-CPU process, {args.teacher}: glibc defaults {rates[False]:,.0f} views/s, "
                f"freed memory kept {rates[True]:,.0f} views/s ({rates[True] / rates[False]:.2f}x)"
            )
        # The same forward in a 1-CPU Ray actor beside a running Ray, as the build's teacher runs.
        in_actor_process = _bare_forward_actor(teacher, [x for _, _, x in batches], args.batch, keep=True)
        in_actor = ray.get(in_actor_process.rate.remote())
        ray.kill(in_actor_process)
        # Bare forward before and after the build: this machine's speed drifts, the mean is the fair reference.
        before = bare_forward_rate(teacher, batches, args.batch)
        timing = BuildTiming()
        build_cache(cfg, timing)
        bare = (before + bare_forward_rate(teacher, batches, args.batch)) / 2
        wall = timing.ended_at - timing.started_at
        layout = "channels_last" if cfg.channels_last else "contiguous"
        print(
            f"build of {timing.views:,} views ({args.teacher}, cifar spec, batch {args.batch}, {layout}, 1 teacher "
            "CPU, the feed on the other):\n"
            f"  end to end {timing.views / wall:,.0f} views/s; "
            f"bare teacher forward over the same views on one thread {bare:,.0f} views/s "
            f"(this process, mean of before and after), {in_actor:,.0f} in a 1-CPU Ray actor\n"
            f"  build / bare: {timing.views / wall / bare:.2f}; "
            f"start-up until the teacher was ready {timing.startup_s:.1f} s "
            f"({timing.startup_s / wall:.0%} of the build); teacher busy {timing.busy_fraction:.0%} of its time, "
            f"at {timing.busy_views_per_s / bare:.2f} of the bare rate while busy"
        )


def layout_rates(
    arch: str, num_classes: int, spec: AugmentSpec, views: int, batch: int, rounds: int = 4
) -> dict[bool, float]:
    """Views/s of the build's runner with contiguous (False) and channels-last (True)
    tensors on this process's threads, alternating rounds so that drift hits both."""
    torch.manual_seed(0)
    model = build_model(arch, num_classes, bias=True).eval()
    runners = {
        cl: TeacherRunner(
            copy.deepcopy(model), spec, TeacherSettings(batch_size=batch, channels_last=cl), torch.device("cpu")
        )
        for cl in (False, True)
    }
    x = torch.randint(0, 256, (views, 3, spec.size, spec.size), dtype=torch.uint8)
    seconds = {cl: 0.0 for cl in runners}
    for _cl, runner in runners.items():  # warm-up: first-call allocations and kernel choice
        runner.targets(x[:batch])
    for _ in range(rounds):
        for cl, runner in runners.items():
            start = time.perf_counter()
            runner.targets(x)
            seconds[cl] += time.perf_counter() - start
    return {cl: rounds * views / s for cl, s in seconds.items()}


class _BareForward:
    """A 1-CPU process that holds the teacher and measures its bare forward on one thread,
    with or without ``keep_freed_memory`` (a process-wide setting, hence one process
    for each; the build's teacher actor keeps it)."""

    def __init__(self, teacher, batches: list, batch_size: int, keep: bool) -> None:
        torch.set_num_threads(1)
        if keep:
            keep_freed_memory()
        self.teacher, self.batches, self.batch_size = teacher, [(0, 0, x) for x in batches], batch_size
        bare_forward_rate(teacher, self.batches[:1], batch_size)  # warm-up

    def rate(self) -> float:
        return bare_forward_rate(self.teacher, self.batches, self.batch_size)


def _bare_forward_actor(teacher, batches: list, batch_size: int, keep: bool):
    import ray

    return ray.remote(num_cpus=1)(_BareForward).remote(teacher, batches, batch_size, keep)


def malloc_rates(teacher, batches: list, batch_size: int, rounds: int = 3) -> dict[bool, float]:
    """Views/s of the bare forward with glibc's defaults (False) and with freed memory
    kept (True), in two fresh actors taking turns (never both at once)."""
    import ray

    actors = {keep: _bare_forward_actor(teacher, batches, batch_size, keep) for keep in (False, True)}
    rates: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(rounds):
        for keep, actor in actors.items():
            rates[keep].append(ray.get(actor.rate.remote()))
    for actor in actors.values():
        ray.kill(actor)
    return {keep: float(np.mean(r)) for keep, r in rates.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    fast = sub.add_parser("speed", help="feed rate with 1 and 2 CPUs; a long build against the bare forward")
    fast.add_argument("--feed-images", type=int, default=800)
    fast.add_argument("--build-views", type=int, default=20_000)
    fast.add_argument("--views", type=int, default=4)
    fast.add_argument("--teacher", default="resnet56")
    fast.add_argument("--batch", type=int, default=256)
    fast.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the build's (and the bare forward's) memory format",
    )
    fast.add_argument(
        "--ablations",
        action="store_true",
        help="also: each CPU setting of the build against its absence (channels-last, malloc)",
    )
    fast.set_defaults(func=speed)
    forms = sub.add_parser("storage", help="bytes per view and CAT-loss error of each storage form")
    forms.set_defaults(func=storage)
    forms.add_argument("archive", help="ImageFolder-layout archive with train/ (CIFAR-10 as JPEG)")
    forms.add_argument("--teacher", default="resnet56")
    forms.add_argument("--subset", type=int, default=2000, help="training images used (evenly spaced)")
    forms.add_argument("--views", type=int, default=2)
    forms.add_argument("--batch", type=int, default=256)
    forms.add_argument("--cpus", type=int, default=2, help="threads for the bare forward and the build actor")
    args = parser.parse_args()
    args.func(args)


def storage(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.cpus)
    keep_freed_memory()  # as the build's teacher does
    init_ray()
    spec = AugmentSpec.preset("cifar")
    with tempfile.TemporaryDirectory() as tmp:
        data = f"{tmp}/shards"
        shard_dataset(
            ShardConfig(
                f"imagefolder:{args.archive}",
                data,
                splits=["train"],
                subset=args.subset,
                samples_per_shard=500,
                encoding="raw",
                progress=False,
            )
        )
        num_classes = read_index(data, "train").num_classes
        torch.manual_seed(0)
        teacher = build_model(args.teacher, num_classes, bias=True).eval()
        weights = f"{tmp}/teacher.pth"
        torch.save(checkpoint_payload(teacher, args.teacher), weights)
        channels_last = CacheBuildConfig.channels_last  # the builds below keep the default
        batches = prepared_views(data, args.views, spec, channels_last)
        bare = bare_forward_rate(bare_teacher(teacher, spec, channels_last), batches, args.batch)

        rows, caches = [], {}
        forms = [("float32", "fp32"), ("float16", "fp32"), ("int8", "fp32"), ("features", "fp32"), ("float16", "bf16")]
        for storage, precision in forms:
            cfg = CacheBuildConfig(
                data=data,
                teacher=args.teacher,
                weights=weights,
                root=f"{tmp}/caches-{storage}-{precision}",
                num_views=args.views,
                storage=storage,
                batch_size=args.batch,
                cpus_per_actor=args.cpus,
                precision=precision,
                progress=False,
            )
            storage = f"{storage}+bf16" if precision == "bf16" else storage
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
                        errors[storage][normalize].append(
                            abs(float(cat_loss(student_cam, stored, 2, normalize)) / ref - 1)
                        )

    print(
        f"\nteacher {args.teacher}, {args.subset} CIFAR-10 images x {args.views} views, batch {args.batch}, "
        f"{args.cpus} CPU threads"
    )
    print(f"bare teacher forward (same batches): {bare:,.0f} views/s")
    print(
        f"{'storage':<10}{'build views/s':>15}{'vs bare':>9}{'bytes/view':>12}"
        f"{'CAT loss rel. err':>19}{'(normalised)':>14}"
    )
    for storage, rate, per_view in rows:
        e, en = max(errors[storage][False]), max(errors[storage][True])
        print(f"{storage:<10}{rate:>15,.0f}{rate / bare:>9.2f}{per_view:>12.1f}{e:>19.2e}{en:>14.2e}")


if __name__ == "__main__":
    main()
