"""The ``catkd`` command: one subcommand per stage (``catkd --help`` lists them)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from catkd.errors import ConfigError

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
    from pipeline.data.sources import ShapesSource
    from pipeline.settings import flag_values

    if args.verify:
        if len(args.paths) != 1:
            raise ConfigError("--verify takes one argument: the shards folder OUT")
        problems = verify_shards(args.paths[0], getattr(args, "splits", None))
        for problem in problems:
            print(problem, file=sys.stderr)
        verdict = f"FAILED, {len(problems)} problems" if problems else "every shard matches its index"
        print(f"{args.paths[0]}: {verdict}")
        return 1 if problems else 0
    if len(args.paths) != 2:
        raise ConfigError("expected SOURCE OUT (or --verify OUT)")
    source, out = args.paths
    synthetic = flag_values(ShapesSource, args)
    if synthetic and not source.startswith("synthetic:"):
        raise ConfigError(f"--{next(iter(synthetic)).replace('_', '-')}: an option of synthetic:shapes, not {source}")
    shard_dataset(ShardConfig(source=source, out=out, synthetic=synthetic, **flag_values(ShardConfig, args)))
    return 0


def cmd_cache_build(args: argparse.Namespace) -> int:
    from pipeline.cache import CacheBuildConfig, build_cache
    from pipeline.settings import flag_values

    url = build_cache(CacheBuildConfig(**flag_values(CacheBuildConfig, args)))
    print(f"cache_id {url.rstrip('/').rsplit('/', 1)[-1]}\nurl {url}")
    return 0


def cmd_cache_derive(args: argparse.Namespace) -> int:
    from pipeline.cache.derive import DeriveConfig, derive_cache
    from pipeline.settings import flag_values

    url = derive_cache(DeriveConfig(**flag_values(DeriveConfig, args)))
    print(f"cache_id {url.rstrip('/').rsplit('/', 1)[-1]}\nurl {url}")
    return 0


def cmd_cache_info(args: argparse.Namespace) -> int:
    import json

    from pipeline.cache.verify import cache_info

    print(json.dumps(cache_info(args.url), indent=1))
    return 0


def cmd_cache_verify(args: argparse.Namespace) -> int:
    from pipeline.cache.verify import verify_cache

    damaged: list[int] = []
    problems = verify_cache(args.url, sample_views=args.samples, weights=args.weights, progress=True, damaged=damaged)
    for problem in problems:
        print(f"FAIL {problem}", file=sys.stderr)
    print(f"{args.url}: {'OK' if not problems else f'{len(problems)} problem(s) in {len(damaged)} data shard(s)'}")
    if problems and args.repair:
        from pipeline.cache.verify import repair_cache

        command = repair_cache(args.url, damaged)
        print(
            f"[verify] retired data shard(s) {', '.join(map(str, damaged))}: the cache is partial until they are "
            f"rebuilt (trainings refuse it meanwhile); rebuild exactly them with:\n{command}"
        )
        return 1
    if problems:
        print(f"[verify] to rebuild only the damaged shards: catkd cache verify {args.url} --repair")
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
    from pipeline.settings import flag_values
    from pipeline.train.config import load_config
    from pipeline.train.sweep import SweepConfig, load_sweep_config, run_sweep

    config, overrides = args.config, list(args.overrides)
    if config and "=" in config:
        config, overrides = None, [config, *overrides]
    base = load_config(config, overrides)
    run_sweep(base, load_sweep_config(config, flag_values(SweepConfig, args)))
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


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """Every command's parser; with ``command``, the dataclass-derived flags of that one
    only. The settings' dataclasses give the flags of shard, cache build and sweep (their
    defaults live there only: pipeline.settings.add_flags), and importing them loads
    torch, torchvision and Ray Train: ``catkd shard`` would pay 5 s for the cache's flags."""
    from pipeline.settings import add_flags

    def wanted(name: str) -> bool:
        return command in (None, name)

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
    if wanted("shard"):
        from pipeline.data.shard_writer import ShardConfig
        from pipeline.data.sources import ShapesSource

        add_flags(p, ShardConfig, skip=("source", "out", "synthetic"))
        add_flags(p.add_argument_group("synthetic:shapes options"), ShapesSource)
    p.set_defaults(func=cmd_shard)

    p = sub.add_parser("cache", help="teacher target caches: build, derive, info, verify")
    cache = p.add_subparsers(dest="cache_command", required=True, metavar="ACTION")
    b = cache.add_parser("build", help="run the teacher once over every (sample, view); write zarr targets")
    if wanted("cache"):
        from pipeline.cache.config import CacheBuildConfig

        add_flags(b, CacheBuildConfig)
    b.set_defaults(func=cmd_cache_build)
    d = cache.add_parser(
        "derive", help="a new cache from an existing one, without the teacher: top-k, fewer views, coarser r"
    )
    d.add_argument("source", help="the cache derived from (never written to)")
    if wanted("cache"):
        from pipeline.cache.derive import DeriveConfig

        add_flags(d, DeriveConfig, skip=("source",))
    d.set_defaults(func=cmd_cache_derive)
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
    v.add_argument(
        "--repair",
        action="store_true",
        help="retire the damaged data shards found, so that the printed `catkd cache build` rebuilds exactly them",
    )
    v.set_defaults(func=cmd_cache_verify)

    # catkd train and sweep take key=value overrides of TrainConfig: their --help lists its
    # fields (type, default, comment) from the dataclass, like the flags of the others.
    overrides_help = {}
    if command in ("train", "sweep"):
        from pipeline.settings import field_table
        from pipeline.train.config import TrainConfig

        overrides_help = {
            "epilog": field_table(TrainConfig, "config fields, each overridable as key=value"),
            "formatter_class": argparse.RawDescriptionHelpFormatter,
        }
    p = sub.add_parser(
        "train",
        help="train a teacher or a student on Ray Train (ce; kd, dkd, dist, catkd, cat from a cache; online- twins)",
        **overrides_help,
    )
    p.add_argument("config", nargs="?", help="YAML config (jobs/configs/...); optional when overrides say everything")
    p.add_argument("overrides", nargs="*", help="key=value overrides of any config field")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "sweep",
        help="student runs over a search space from one cache, on Ray Tune (ASHA early stopping, resume, "
        "table and picture)",
        **overrides_help,
    )
    p.add_argument(
        "config", nargs="?", help="base YAML config, with an optional sweep: section (name= is the sweep's folder)"
    )
    p.add_argument("overrides", nargs="*", help="key=value overrides of the base config")
    if wanted("sweep"):
        from pipeline.train.sweep import SweepConfig

        add_flags(p, SweepConfig)
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

    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((arg for arg in argv if not arg.startswith("-")), None)  # None: catkd --help
    args = build_parser(command).parse_args(argv)
    func: Command = args.func
    from pipeline import stopping

    kept = STOPPED_KEEPS.get(args.command, "nothing it completed is undone; rerun the same command to go on")
    stopping.install(f"catkd {args.command}: stopped by {{signal}}; {kept}")
    try:
        return func(args)
    except CatkdError as exc:
        # Bad input: one clear line naming the field, file or sample, and exit status 2.
        # Anything else is a bug and keeps its traceback.
        print(f"catkd {args.command}: error: {exc}", file=sys.stderr)
        return 2


# What a stopped command leaves, and how to go on (pipeline.stopping).
STOPPED_KEEPS = {
    "train": "the checkpoints of completed epochs are kept under storage_path/name; rerun the same command to resume "
    "after the last one",
    "cache": "complete data shards are kept; rerun the same command to build only the others",
    "shard": "complete shards are kept; rerun the same command to write only the others",
    "sweep": "finished runs and the checkpoints of unfinished ones are kept; rerun the same command to go on",
}


if __name__ == "__main__":
    sys.exit(main())
