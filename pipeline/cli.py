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


def cmd_viz(args: argparse.Namespace) -> int:
    from pipeline.viz import render_cam_report

    checkpoints = dict(item.split("=", 1) if "=" in item else (item.rsplit("/", 1)[-1], item) for item in args.models)
    rates = render_cam_report(args.data, checkpoints, args.out, split=args.split, shown=args.count, spec=args.spec)
    print(f"wrote {args.out}")
    for label, rate in rates.items():
        print(f"{label}: CAM peak inside the object box for {100 * rate:.1f}% of {args.split} images")
    return 0


def cmd_shard(args: argparse.Namespace) -> int:
    from pipeline.data.shard_writer import ShardConfig, shard_dataset, verify_shards

    if args.verify:
        if len(args.paths) != 1:
            raise SystemExit("catkd shard --verify takes one argument: the shards folder OUT")
        problems = verify_shards(args.paths[0], args.split or None)
        for problem in problems:
            print(problem, file=sys.stderr)
        print(
            f"{args.paths[0]}: "
            f"{'FAILED, ' + str(len(problems)) + ' problems' if problems else 'every shard matches its index'}"
        )
        return 1 if problems else 0
    if len(args.paths) != 2:
        raise SystemExit("catkd shard takes SOURCE OUT (or --verify OUT)")
    source, out = args.paths
    synthetic = {
        "image_size": args.image_size,
        "train_samples": args.train_samples,
        "test_samples": args.test_samples,
        "seed": args.seed,
    }
    cfg = ShardConfig(
        source=source,
        out=out,
        splits=args.split or None,
        samples_per_shard=args.samples_per_shard,
        encoding=args.encoding,
        subset=args.subset,
        order_seed=args.order_seed,
        max_short_side=args.max_short_side,
        jpeg_quality=args.jpeg_quality,
        synthetic=synthetic if source.startswith("synthetic:") else {},
    )
    shard_dataset(cfg)
    return 0


def cmd_cache_build(args: argparse.Namespace) -> int:
    from pipeline.cache import CacheBuildConfig, build_cache

    cfg = CacheBuildConfig(
        data=args.data,
        teacher=args.teacher,
        weights=args.weights,
        root=args.root,
        split=args.split,
        num_views=args.views,
        resolution=args.resolution,
        spec=args.spec,
        spec_seed=args.spec_seed,
        storage=args.storage,
        binarize=args.binarize,
        actors=args.actors,
        gpus_per_actor=args.gpus_per_actor,
        cpus_per_actor=args.cpus_per_actor,
        batch_size=args.batch_size,
        precision=args.precision,
        channels_last=args.channels_last,
        feed_tasks=args.feed_tasks,
        renderer=args.renderer,
        decoder=args.decoder,
    )
    url = build_cache(cfg)
    print(f"cache_id {url.rstrip('/').rsplit('/', 1)[-1]}\nurl {url}")
    return 0


def cmd_cache_info(args: argparse.Namespace) -> int:
    import json

    from pipeline.cache.verify import cache_info

    print(json.dumps(cache_info(args.url), indent=1))
    return 0


def cmd_cache_verify(args: argparse.Namespace) -> int:
    from pipeline.cache.verify import verify_cache

    problems = verify_cache(args.url, sample_views=args.samples, weights=args.weights, progress=True)
    for problem in problems:
        print(f"FAIL {problem}", file=sys.stderr)
    print(f"{args.url}: {'OK' if not problems else f'{len(problems)} problem(s)'}")
    return 1 if problems else 0


def cmd_train(args: argparse.Namespace) -> int:
    from pipeline.train.config import load_config
    from pipeline.train.run import train

    config, overrides = args.config, list(args.overrides)
    if config and "=" in config:  # no YAML file, only overrides
        config, overrides = None, [config, *overrides]
    cfg = load_config(config, overrides)
    result = train(cfg)
    last = result["history"][-1]
    print(
        f"[train] done: {cfg.name}: test top-1 {last['test_top1']:.2f}% after {last['epoch']} epochs; run folder "
        f"{result['run']}"
    )
    for name, path in result["exported"].items():
        print(f"[train] exported {name}: {path}")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from pipeline.train.config import load_config
    from pipeline.train.sweep import SweepGrid, run_sweep

    config, overrides = args.config, list(args.overrides)
    if config and "=" in config:
        config, overrides = None, [config, *overrides]
    grid = SweepGrid(students=args.students, betas=args.betas, resolutions=args.resolutions, seeds=args.seeds)
    run_sweep(load_config(config, overrides), grid, max_concurrent=args.concurrent)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from pipeline.train.evaluate import evaluate_checkpoint

    metrics = evaluate_checkpoint(
        args.checkpoint, args.data, split=args.split, arch=args.arch, spec=args.spec, device=args.device
    )
    print(
        f"{args.checkpoint}: {metrics['arch']} on {args.data} [{args.split}], {metrics['samples']} samples, "
        f"{metrics['device']}: top-1 {metrics['top1']:.2f}%  top-5 {metrics['top5']:.2f}%"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="catkd", description="CAT-KD at cluster scale: cached teacher CAMs, distilled students."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("models", help="list the model zoo with parameter counts and CAM sizes")
    p.add_argument("--family", choices=["cifar", "imagenet"], help="only this family")
    p.add_argument("--num-classes", type=int, help="class count (default 100 for CIFAR, 1000 for ImageNet)")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser(
        "shard",
        help="dataset -> class-mixed WebDataset shards + index (Ray tasks)",
        usage="catkd shard SOURCE OUT [options] | catkd shard --verify OUT",
    )
    p.add_argument(
        "paths",
        nargs="+",
        metavar="SOURCE OUT",
        help="SOURCE: imagefolder:URL (a folder or a .tar/.tar.gz, local or fsspec), cifar10:PATH, cifar100:PATH or "
        "synthetic:shapes; OUT: output URL (path, file://, s3://, ...)",
    )
    p.add_argument("--verify", action="store_true", help="re-hash every shard in OUT against its index (no SOURCE)")
    p.add_argument("--order-seed", type=int, default=0, help="seed of the permutation that mixes classes across shards")
    p.add_argument(
        "--max-short-side",
        type=int,
        help="store images with the shorter side at most N (re-encoded as JPEG); 256-320 for ImageNet",
    )
    p.add_argument("--jpeg-quality", type=int, default=90, help="JPEG quality of images resized by --max-short-side")
    p.add_argument("--split", action="append", help="split to shard (repeatable; default: all)")
    p.add_argument("--samples-per-shard", type=int, default=1000)
    p.add_argument(
        "--encoding", choices=["keep", "raw"], default="keep", help="keep the source encoding or store raw RGB pixels"
    )
    p.add_argument(
        "--subset", type=int, help="keep N samples per split, evenly spaced over the sorted source (class-balanced)"
    )
    p.add_argument("--image-size", type=int, default=32, help="synthetic:shapes image side")
    p.add_argument("--train-samples", type=int, default=5000, help="synthetic:shapes training samples")
    p.add_argument("--test-samples", type=int, default=1000, help="synthetic:shapes test samples")
    p.add_argument("--seed", type=int, default=0, help="synthetic:shapes seed")
    p.set_defaults(func=cmd_shard)

    p = sub.add_parser("cache", help="teacher target caches: build, info, verify")
    cache = p.add_subparsers(dest="cache_command", required=True, metavar="ACTION")
    b = cache.add_parser("build", help="run the teacher once over every (sample, view); write zarr targets")
    b.add_argument("--data", required=True, help="shards URL (from catkd shard)")
    b.add_argument("--split", default="train")
    b.add_argument("--teacher", required=True, help="teacher architecture (catkd models)")
    b.add_argument(
        "--weights", required=True, help="teacher checkpoint URL (ours, torchvision, or the reference code base's)"
    )
    b.add_argument("--root", required=True, help="cache root URL; the cache goes to ROOT/<cache_id>")
    b.add_argument("--views", type=int, default=4, help="augmentation views per sample (S)")
    b.add_argument("--resolution", type=int, default=2, help="CAM pooling resolution r")
    b.add_argument("--spec", choices=["cifar", "imagenet"], default="cifar")
    b.add_argument("--spec-seed", type=int, default=0)
    b.add_argument("--storage", choices=["float16", "float32", "int8", "features"], default="float16")
    b.add_argument("--binarize", action="store_true", help="store binarised CAMs (the paper's variant)")
    b.add_argument("--actors", type=int, default=1)
    b.add_argument("--gpus-per-actor", type=float, default=0.0)
    b.add_argument("--cpus-per-actor", type=int, default=1)
    b.add_argument(
        "--batch-size", type=int, default=256, help="views per teacher forward pass (as large as the GPU allows)"
    )
    b.add_argument(
        "--precision",
        choices=["fp32", "tf32", "bf16"],
        default="fp32",
        help="teacher compute: fp32, tf32 (GPU matrix units) or bf16 autocast; part of the cache identity",
    )
    b.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=True,
        help=(
            "channels-last memory format for the teacher (default; 1.2-1.3x faster convolutions on CPU, the usual "
            "choice on GPUs)"
        ),
    )
    b.add_argument(
        "--feed-tasks",
        type=int,
        help="data shards rendered at once by CPU tasks (default: the CPUs the actors leave free)",
    )
    b.add_argument(
        "--renderer",
        choices=["auto", "cpu", "device"],
        default="auto",
        help=(
            "where views are cropped and resized: the host CPUs, or the teacher's GPU (auto: the GPU when actors have "
            "one); part of the identity"
        ),
    )
    b.add_argument(
        "--decoder",
        choices=["auto", "cpu", "nvjpeg"],
        default="auto",
        help=(
            "JPEG decoding: the host's libjpeg-turbo, or nvJPEG on the teacher's GPU (auto: nvjpeg with the device "
            "renderer); part of the identity"
        ),
    )
    b.set_defaults(func=cmd_cache_build)
    i = cache.add_parser("info", help="identity, shapes, dtypes, codecs, bytes per view")
    i.add_argument("url")
    i.set_defaults(func=cmd_cache_info)
    v = cache.add_parser("verify", help="completeness, checksums, finite values, recomputed samples")
    v.add_argument("url")
    v.add_argument(
        "--samples",
        type=int,
        default=2,
        help="random (sample, view) pairs of each data shard to recompute with the teacher",
    )
    v.add_argument("--weights", help="teacher checkpoint URL (default: the one recorded at build time)")
    v.set_defaults(func=cmd_cache_verify)

    p = sub.add_parser("train", help="train a teacher or a student on Ray Train (ce, kd, catkd, cat, online-catkd)")
    p.add_argument("config", nargs="?", help="YAML config (jobs/configs/...); optional when overrides say everything")
    p.add_argument("overrides", nargs="*", help="key=value overrides of any config field")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sweep", help="a grid of student runs reading one cache concurrently, with a results table")
    p.add_argument("config", nargs="?", help="base YAML config (the run name becomes the sweep's folder)")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the base config")
    p.add_argument("--students", nargs="+", default=["resnet8"])
    p.add_argument("--betas", nargs="+", type=float, default=[1.0])
    p.add_argument("--resolutions", nargs="+", type=int, default=[2])
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--concurrent", type=int, default=2, help="runs at the same time")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("eval", help="top-1/top-5 of a checkpoint on a split")
    p.add_argument(
        "checkpoint", help="model checkpoint URL (student_cam.pt, or any form load_checkpoint reads with --arch)"
    )
    p.add_argument("--data", required=True, help="shards URL")
    p.add_argument("--split", default="test")
    p.add_argument("--arch", help="architecture, when the checkpoint does not name it")
    p.add_argument("--spec", choices=["cifar", "imagenet"], default="cifar")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("viz", help="PNG grid of test images with each model's CAM for the true class")
    p.add_argument("models", nargs="+", help="LABEL=CHECKPOINT_URL (or just a URL) per model, teacher first")
    p.add_argument("--data", required=True, help="shards URL")
    p.add_argument("--split", default="test")
    p.add_argument("--out", default="cams.png", help="PNG path or URL")
    p.add_argument("--count", type=int, default=8, help="images shown")
    p.add_argument("--spec", choices=["cifar", "imagenet"], default="cifar")
    p.set_defaults(func=cmd_viz)

    p = sub.add_parser("demo", help="teacher, vanilla and CAT-KD students on the embedded synthetic data")
    p.add_argument("--out", default="outputs/demo", help="folder for results, checkpoints and pictures")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from catkd.errors import CatkdError

    args = build_parser().parse_args(argv)
    func: Command = args.func
    try:
        return func(args)
    except CatkdError as exc:
        # Bad input: one clear line naming the field, file or sample, and exit status 2.
        # Anything else is a bug and keeps its traceback.
        print(f"catkd {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
