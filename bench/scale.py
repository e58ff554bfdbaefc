"""The data plane at ImageNet scale, measured on generated ImageNet-like data.

Makes an ImageNet-like folder itself (``bench/imagenet_like.py``: ~20,000 JPEGs in 100
classes with ImageNet's sizes and bytes; nothing downloaded), then reports:

1. shard rate (images/s, and per core) of ``catkd shard`` on it, as written and with
   ``--max-short-side 256``;
2. the driver's peak memory on an archive against one 1/50 its size (the driver must
   not grow with the dataset);
3. classes per shard, and per batch of 64 after the shuffle buffer (8 ranks);
4. loader rates at the ``imagenet`` spec (random-resized crop 224 + flip): catkd's
   loader on both shard sets against torchvision ``ImageFolder`` + ``DataLoader`` with
   ``RandomResizedCrop(224)`` + flip + normalise on the same JPEGs, 1 and 2 workers,
   interleaved rounds, best round counts; per worker (= per core) figures too;
5. reading shard tars: the hand-written header walk against webdataset's iterator.

    .venv/bin/python bench/scale.py --work outputs/scale
    .venv/bin/python bench/scale.py --work outputs/scale --memory-archive ../shared/data/cifar10-jpeg.tar.gz
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.imagenet_like import make_folder  # noqa: E402
from pipeline.data.loader import ReaderConfig, ShardStream, make_loader  # noqa: E402
from pipeline.data.order import epoch_plan  # noqa: E402
from pipeline.data.shard_format import decode_shard, load_shard, read_index  # noqa: E402
from pipeline.data.views import AugmentSpec  # noqa: E402


def catkd_shard(*args: str) -> tuple[float, float, str]:
    """Run ``catkd shard`` in its own process: (seconds, driver peak MB, output)."""
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "shard", *args], capture_output=True, text=True, cwd=ROOT
    )
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"catkd shard {' '.join(args)} failed:\n{result.stderr[-3000:]}")
    peak = float(re.search(r"driver peak memory (\d+) MB", result.stdout).group(1))
    return seconds, peak, result.stdout


def shard_rates(folder: str, work: str, count: int) -> dict[str, dict[str, float]]:
    out = {}
    for name, extra in (("original", []), ("short side 256", ["--max-short-side", "256"])):
        dest = os.path.join(work, "shards-" + ("orig" if not extra else "256"))
        shutil.rmtree(dest, ignore_errors=True)
        seconds, peak, _ = catkd_shard(
            f"imagefolder:{folder}", dest, "--splits", "train", "--samples-per-shard", "1000", *extra
        )
        index = read_index(dest, "train")
        size = sum(s.bytes for s in index.shards)
        out[name] = {
            "seconds": seconds,
            "images_per_s": count / seconds,
            "images_per_s_per_core": count / seconds / os.cpu_count(),
            "mean_kb_stored": size / count / 1e3,
            "driver_peak_mb": peak,
            "path": dest,
        }
        print(
            f"shard ({name}): {count} images in {seconds:.1f} s = {count / seconds:.0f} images/s "
            f"({count / seconds / os.cpu_count():.0f} per core, {os.cpu_count()} cores); {size / count / 1e3:.0f} "
            "KB/image stored"
        )
    return out


def small_archive(archive: str, dest: str, every: int) -> None:
    """Every ``every``-th image member of ``archive``, streamed into a .tar.gz."""
    with tarfile.open(archive, "r|*") as src, tarfile.open(dest, "w:gz") as dst:
        k = 0
        for member in src:
            if member.isdir():
                dst.addfile(member)
            elif member.isfile():
                if k % every == 0:
                    dst.addfile(member, src.extractfile(member))
                k += 1


def driver_memory(archive: str, work: str) -> dict[str, float]:
    small = os.path.join(work, "small-archive.tar.gz")
    small_archive(archive, small, 50)
    peaks = {}
    for name, path in (("full", archive), ("1/50", small)):
        dest = os.path.join(work, f"memory-{name.replace('/', '_')}")
        shutil.rmtree(dest, ignore_errors=True)
        seconds, peaks[name], _ = catkd_shard(f"imagefolder:{path}", dest, "--samples-per-shard", "1000")
        shutil.rmtree(dest, ignore_errors=True)
        print(
            f"driver peak memory sharding {name} archive ({os.path.getsize(path) / 1e6:.1f} MB): {peaks[name]:.0f} MB "
            f"({seconds:.0f} s)"
        )
    print(f"difference: {peaks['full'] - peaks['1/50']:.0f} MB (goal: under 50 MB)")
    return {
        "archive": archive,
        "full_mb": peaks["full"],
        "fiftieth_mb": peaks["1/50"],
        "difference_mb": peaks["full"] - peaks["1/50"],
    }


def class_mixing(shards: str, world: int = 8, batch: int = 64) -> dict[str, float]:
    """Distinct classes per shard, and per batch of one rank's loader worker after the
    shuffle buffer (labels only: the same stream code, without decoding images)."""
    index = read_index(shards, "train")
    per_shard = [len({s.label for s in load_shard(shards, index, info)}) for info in index.shards]
    stream = ShardStream(
        ReaderConfig(data=shards, batch_size=batch, spec=AugmentSpec.preset("imagenet")), rank=0, world_size=world
    )
    plan = epoch_plan([s.count for s in index.shards], world, 1, batch, 0, 0)[0][0]
    labels = [s.label for s in stream._shuffled(plan.shards, 0)]
    per_batch = [len(set(labels[k : k + batch])) for k in range(0, len(labels) - batch + 1, batch)]
    result = {
        "classes": index.num_classes,
        "per_shard_min": min(per_shard),
        "per_shard_mean": float(np.mean(per_shard)),
        "per_batch_mean": float(np.mean(per_batch)),
        "per_batch_min": min(per_batch),
        "ranks": world,
        "batch": batch,
    }
    print(
        f"classes per shard: min {result['per_shard_min']}, "
        f"mean {result['per_shard_mean']:.1f} of {index.num_classes}; "
        f"per batch of {batch} (rank 0 of {world}, default shuffle buffer): "
        f"mean {result['per_batch_mean']:.1f}, min {result['per_batch_min']}"
    )
    return result


def imagefolder_loader(folder: str, workers: int, batch: int):
    import torchvision
    from torchvision.transforms import v2 as T

    spec = AugmentSpec.preset("imagenet")
    # As torchvision's classification reference builds it (presets.ClassificationPresetTrain).
    tf = T.Compose(
        [
            T.RandomResizedCrop(224, antialias=True),
            T.RandomHorizontalFlip(),
            T.PILToTensor(),
            T.ToDtype(torch.float32, scale=True),
            T.Normalize(spec.mean, spec.std),
        ]
    )
    dataset = torchvision.datasets.ImageFolder(os.path.join(folder, "train"), transform=tf)
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True, persistent_workers=False
    )


def catkd_loader(shards: str, workers: int, batch: int):
    cfg = ReaderConfig(
        data=shards, batch_size=batch, spec=AugmentSpec.preset("imagenet"), normalize=False
    )  # as training reads it
    return make_loader(ShardStream(cfg), workers)


def steady_rate(loader, limit: int) -> float:
    """images/s after the first batch (worker start-up excluded), over ``limit`` images."""
    seen, start = 0, None
    for batch in loader:
        n = len(batch[0] if isinstance(batch, (list, tuple)) else batch["ids"])
        if start is None:
            start = time.perf_counter()
        else:
            seen += n
        if seen >= limit:
            break
    return seen / (time.perf_counter() - start)


def loader_rates(
    folder: str, shards: dict[str, str], workers_list: list[int], limit: int, rounds: int, batch: int
) -> dict[str, dict[str, float]]:
    makers = {"torchvision ImageFolder": lambda w: imagefolder_loader(folder, w, batch)}
    makers |= {
        f"catkd loader, {name} shards": (lambda w, p=path: catkd_loader(p, w, batch)) for name, path in shards.items()
    }
    best = {f"{name} | {w}": 0.0 for w in workers_list for name in makers}
    for r in range(rounds):
        for w in workers_list:
            for name, make in makers.items():
                rate = steady_rate(make(w), limit)
                best[f"{name} | {w}"] = max(best[f"{name} | {w}"], rate)
                print(f"round {r + 1}, {w} worker(s): {name:<40} {rate:7.0f} images/s")
    table = {}
    for w in workers_list:
        base = best[f"torchvision ImageFolder | {w}"]
        for name in makers:
            rate = best[f"{name} | {w}"]
            table[f"{name} | {w}"] = {
                "workers": w,
                "images_per_s": rate,
                "per_worker": rate / w,
                "vs_imagefolder": rate / base,
            }
    return table


def tar_reading(shards: str, count: int = 5) -> dict[str, float]:
    """Samples/s grouping a shard's members into samples: catkd's header walk vs webdataset."""
    from webdataset.tariterators import group_by_keys, tar_file_expander

    index = read_index(shards, "train")
    blobs = [open(os.path.join(shards, info.name), "rb").read() for info in index.shards[:count]]
    samples = sum(info.count for info in index.shards[:count])
    rates = {}
    for name, read in (
        ("catkd header walk", lambda b: sum(1 for _ in decode_shard(b, "bench"))),
        (
            "webdataset tar_file_expander",
            lambda b: sum(1 for _ in group_by_keys(tar_file_expander([{"url": "bench", "stream": io.BytesIO(b)}]))),
        ),
    ):
        start = time.perf_counter()
        for _ in range(3):
            assert sum(read(b) for b in blobs) == samples
        rates[name] = 3 * samples / (time.perf_counter() - start)
        print(f"tar reading, {name}: {rates[name]:,.0f} samples/s")
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="outputs/scale", help="folder for the generated data, shards and results")
    parser.add_argument("--images", type=int, default=20_000)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument(
        "--memory-archive", help="archive for the driver-memory check (default: a tar of the generated folder)"
    )
    parser.add_argument("--loader-images", type=int, default=3000, help="images per loader measurement")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    os.makedirs(args.work, exist_ok=True)
    torch.set_num_threads(1)
    folder = os.path.join(args.work, "imagenet-like")
    start = time.perf_counter()
    made = make_folder(folder, args.images, args.classes)
    print(
        f"data: {made['images']} JPEGs in {made['classes']} classes, "
        f"mean {made['mean_kb']:.0f} KB and {made['mean_pixels'] / 1e3:.0f}k pixels "
        f"({time.perf_counter() - start:.0f} s to make or find)"
    )
    results: dict = {"data": made, "cores": os.cpu_count(), "cpu": _cpu_name()}
    results["shard"] = shard_rates(folder, args.work, made["images"])
    archive = args.memory_archive
    if archive is None:
        archive = os.path.join(args.work, "imagenet-like.tar")
        if not os.path.exists(archive):
            with tarfile.open(archive + ".partial", "w") as tar:
                tar.add(os.path.join(folder, "train"), arcname="train")
            os.replace(archive + ".partial", archive)
    results["driver_memory"] = driver_memory(archive, args.work)
    results["class_mixing"] = class_mixing(results["shard"]["original"]["path"])
    shards = {name: r["path"] for name, r in results["shard"].items()}
    results["loader"] = loader_rates(folder, shards, args.workers, args.loader_images, args.rounds, args.batch)
    results["tar_reading"] = tar_reading(shards["original"])
    print(
        f"\nloaders at the imagenet spec, batch {args.batch}, best of {args.rounds} rounds of {args.loader_images} "
        "images"
    )
    print(f"{'loader':<44}{'workers':>8}{'images/s':>10}{'per worker':>12}{'vs ImageFolder':>16}")
    for name, row in results["loader"].items():
        print(
            f"{name.split(' | ')[0]:<44}{row['workers']:>8}{row['images_per_s']:>10.0f}"
            f"{row['per_worker']:>12.0f}{row['vs_imagefolder']:>15.2f}x"
        )
    with open(os.path.join(args.work, "scale.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(f"wrote {os.path.join(args.work, 'scale.json')}")


def _cpu_name() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown"


if __name__ == "__main__":
    main()
