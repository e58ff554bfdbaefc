"""Training throughput, side by side: the student alone (``ce``, the limit), CAT-KD from a
cache, and online CAT-KD with a live teacher, through the real ``catkd train`` path
(Ray Train, one worker, the shard reader), on CIFAR-sized input.

    .venv/bin/python bench/train.py ../shared/data/cifar10-jpeg.tar.gz --subset 4000 --epochs 2

Prints images/s and the fraction of step time spent waiting for data (last epoch), and
the ratios to the student alone.
"""

from __future__ import annotations

import argparse
import tempfile

import torch

from catkd.models import build_model, checkpoint_payload
from pipeline.cache import CacheBuildConfig, build_cache
from pipeline.ray_setup import init_ray
from pipeline.data.shard_writer import ShardConfig, shard_dataset
from pipeline.data.shard_format import read_index
from pipeline.train.config import TrainConfig
from pipeline.train.run import train

PAIRS = [("resnet56", "resnet20"), ("resnet32x4", "resnet8x4")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("archive", help="ImageFolder-layout archive with train/ and test/ (CIFAR-10 as JPEG)")
    parser.add_argument("--subset", type=int, default=4000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--loader-workers", type=int, default=1)
    parser.add_argument("--pairs", nargs="+", default=[f"{t}:{s}" for t, s in PAIRS], help="teacher:student pairs")
    args = parser.parse_args()
    init_ray()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = f"{tmp}/shards"
        shard_dataset(ShardConfig(f"imagefolder:{args.archive}", data, subset=args.subset, samples_per_shard=500, encoding="raw", progress=False))
        num_classes = read_index(data, "train").num_classes
        for teacher_arch, student in (pair.split(":") for pair in args.pairs):
            weights = f"{tmp}/{teacher_arch}.pth"
            torch.save(checkpoint_payload(build_model(teacher_arch, num_classes, bias=True), teacher_arch), weights)
            cache = build_cache(CacheBuildConfig(data=data, teacher=teacher_arch, weights=weights, root=f"{tmp}/caches", num_views=args.epochs, progress=False))
            common = dict(data=data, student=student, epochs=args.epochs, batch_size=args.batch, lr_decay_epochs=[args.epochs],
                          num_workers=1, loader_workers=args.loader_workers, storage_path=f"{tmp}/runs")  # fmt: skip
            runs = {
                "ce (student alone)": TrainConfig(mode="ce", name=f"{student}-ce", **common),
                # normalize=true: the randomly initialised teachers' CAMs are large, and the
                # benchmark measures speed, not accuracy.
                "catkd from cache": TrainConfig(mode="catkd", cache=cache, normalize=True, name=f"{student}-catkd", **common),
                "online-catkd": TrainConfig(mode="online-catkd", teacher=teacher_arch, teacher_weights=weights, num_views=args.epochs,
                                            normalize=True, name=f"{student}-online", **common),  # fmt: skip
            }
            for label, cfg in runs.items():
                last = train(cfg)["history"][-1]
                rows.append((f"{teacher_arch}->{student}", label, last["images_per_s"], last["data_wait_fraction"]))
    print(f"\n{args.subset} CIFAR-10 images, batch {args.batch}, 1 Ray Train worker, {args.loader_workers} loader worker(s); last of {args.epochs} epochs")
    print(f"{'pair':<24}{'mode':<22}{'images/s':>10}{'vs ce':>8}{'data wait':>11}")
    for pair, label, rate, wait in rows:
        base = next(r[2] for r in rows if r[0] == pair and r[1].startswith("ce"))
        print(f"{pair:<24}{label:<22}{rate:>10.0f}{rate / base:>8.2f}{100 * wait:>10.1f}%")


if __name__ == "__main__":
    main()
