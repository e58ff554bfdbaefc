"""The ``catkd`` command: one subcommand per stage (``catkd --help`` lists them)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

Command = Callable[[argparse.Namespace], int]


def cmd_models(args: argparse.Namespace) -> int:
    import torch

    from catkd.models import build_model, list_models, model_entry

    print(f"{'name':<17}{'family':<10}{'classes':>8}{'parameters':>13}  {'input':>7}  CAM")
    for name in list_models(args.family):
        entry = model_entry(name)
        num_classes = args.num_classes or (100 if entry.family == "cifar" else 1000)
        model = build_model(name, num_classes).eval()
        params = sum(p.numel() for p in model.parameters())
        size = entry.input_size
        with torch.no_grad():
            _, cam = model(torch.zeros(1, 3, size, size))
        h, w = cam.shape[-2:]
        print(f"{name:<17}{entry.family:<10}{num_classes:>8}{params:>13,}  {size:>3}x{size:<3}  {h}x{w}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from pipeline.demo import DemoConfig, run_demo

    run_demo(DemoConfig(out=args.out, seed=args.seed))
    return 0


def cmd_shard(args: argparse.Namespace) -> int:
    from pipeline.shard_job import ShardConfig, shard_dataset

    synthetic = {"image_size": args.image_size, "train_samples": args.train_samples, "test_samples": args.test_samples, "seed": args.seed}
    cfg = ShardConfig(
        source=args.source,
        out=args.out,
        splits=args.split or None,
        samples_per_shard=args.samples_per_shard,
        encoding=args.encoding,
        synthetic=synthetic if args.source.startswith("synthetic:") else {},
    )
    shard_dataset(cfg)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="catkd", description="CAT-KD at cluster scale: cached teacher CAMs, distilled students.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("models", help="list the model zoo with parameter counts and CAM sizes")
    p.add_argument("--family", choices=["cifar", "imagenet"], help="only this family")
    p.add_argument("--num-classes", type=int, help="class count (default 100 for CIFAR, 1000 for ImageNet)")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("shard", help="dataset -> WebDataset shards + index (Ray tasks)")
    p.add_argument("source", help="imagefolder:PATH (dir or .tar/.tar.gz), cifar10:PATH, cifar100:PATH or synthetic:shapes")
    p.add_argument("out", help="output URL (path, file://, s3://, ...)")
    p.add_argument("--split", action="append", help="split to shard (repeatable; default: all)")
    p.add_argument("--samples-per-shard", type=int, default=1000)
    p.add_argument("--encoding", choices=["keep", "raw"], default="keep", help="keep the source encoding or store raw RGB pixels")
    p.add_argument("--image-size", type=int, default=32, help="synthetic:shapes image side")
    p.add_argument("--train-samples", type=int, default=5000, help="synthetic:shapes training samples")
    p.add_argument("--test-samples", type=int, default=1000, help="synthetic:shapes test samples")
    p.add_argument("--seed", type=int, default=0, help="synthetic:shapes seed")
    p.set_defaults(func=cmd_shard)

    p = sub.add_parser("demo", help="teacher, vanilla and CAT-KD students on the embedded synthetic data")
    p.add_argument("--out", default="outputs/demo", help="folder for results, checkpoints and pictures")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from pipeline.shards import ShardError
    from pipeline.sources import SourceError

    args = build_parser().parse_args(argv)
    func: Command = args.func
    try:
        return func(args)
    except (ShardError, SourceError) as exc:
        # Bad input: one clear line naming the file and sample, and a non-zero exit.
        print(f"catkd {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
