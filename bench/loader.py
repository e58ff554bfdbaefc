"""Loader throughput: catkd's shard reader vs torchvision ImageFolder, side by side.

Same JPEGs (an ImageFolder-layout archive such as CIFAR-10 as JPEG), same batch size,
same worker count, equivalent transforms (pad 4 + random 32x32 crop + flip + normalise);
prints images/s of each and the ratios. Each loader runs ``--rounds`` times, interleaved,
and the best round counts (the machine is shared and noisy).

    .venv/bin/python bench/loader.py ../shared/data/cifar10-jpeg.tar.gz --workers 2 --batch 256
"""

from __future__ import annotations

import argparse
import os
import tarfile
import tempfile
import time

import torch
import torchvision
from torch.utils.data import DataLoader
from torchvision import transforms

from pipeline.data.loader import ReaderConfig, ShardStream, make_loader
from pipeline.data.shard_writer import ShardConfig, shard_dataset
from pipeline.data.views import MEAN_STD, AugmentSpec


def images_per_second(loader, limit: int) -> float:
    seen, start = 0, time.perf_counter()
    for batch in loader:
        seen += len(batch[0] if isinstance(batch, (list, tuple)) else batch["ids"])
        if seen >= limit:
            break
    return seen / (time.perf_counter() - start)


def imagefolder_loader(root: str, workers: int, batch: int) -> DataLoader:
    mean, std = MEAN_STD["cifar"]
    tf = transforms.Compose(
        [
            transforms.RandomCrop(32, padding=4),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(mean, std),
        ]
    )
    dataset = torchvision.datasets.ImageFolder(os.path.join(root, "train"), transform=tf)
    return DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("archive", help="ImageFolder-layout .tar.gz with a train/ split")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--limit", type=int, default=50_000, help="images per measurement")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        print(f"extracting {args.archive} for ImageFolder ...")
        with tarfile.open(args.archive) as tar:
            tar.extractall(os.path.join(tmp, "folder"), filter="data")
        shards = {}
        for encoding in ("keep", "raw"):
            shards[encoding] = os.path.join(tmp, f"shards-{encoding}")
            shard_dataset(
                ShardConfig(
                    source=f"imagefolder:{args.archive}",
                    out=shards[encoding],
                    splits=["train"],
                    samples_per_shard=5000,
                    encoding=encoding,
                    progress=False,
                )
            )

        def reader(encoding: str, normalize: bool):
            cfg = ReaderConfig(
                data=shards[encoding], batch_size=args.batch, spec=AugmentSpec.preset("cifar"), normalize=normalize
            )
            return make_loader(ShardStream(cfg), args.workers)

        loaders = {
            "torchvision ImageFolder (JPEG)": lambda: imagefolder_loader(
                os.path.join(tmp, "folder"), args.workers, args.batch
            ),
            "catkd reader, JPEG shards": lambda: reader("keep", True),
            "catkd reader, raw-pixel shards": lambda: reader("raw", True),
            "catkd reader, raw shards, uint8 out": lambda: reader("raw", False),
        }
        best = {name: 0.0 for name in loaders}
        for r in range(args.rounds):
            for name, make in loaders.items():
                rate = images_per_second(make(), args.limit)
                best[name] = max(best[name], rate)
                print(f"round {r + 1}: {name:<38} {rate:>9.0f} images/s")
    base = best["torchvision ImageFolder (JPEG)"]
    print(f"\nworkers {args.workers}, batch {args.batch}, best of {args.rounds} rounds of {args.limit} images")
    print(f"{'loader':<40}{'images/s':>10}{'vs ImageFolder':>16}")
    for name, rate in best.items():
        print(f"{name:<40}{rate:>10.0f}{rate / base:>15.2f}x")


if __name__ == "__main__":
    main()
