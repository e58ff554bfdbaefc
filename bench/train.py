"""Training throughput through the real ``catkd train`` path (Ray Train, the shard reader,
CIFAR-sized input): the student alone (``ce``, the limit) and CAT-KD from a cache, with
1 and 2 Ray Train workers; with ``--before REV``, the same measurement on the code of
another revision, side by side in one run (issue 13's before/after).

    .venv/bin/python bench/train.py ../shared/data/cifar10-jpeg.tar.gz --before 5c77106 --compile

Each side runs in its own process (the other revision from a git worktree, its own Ray),
alternating ``--rounds`` times so that the machine's drift hits both sides alike; each
side shards the subset and builds its cache with its own code. Prints images/s and the
fraction of step time spent waiting for data (last epoch, best of the rounds), and the
ratios after / before.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def measure(
    archive: str,
    subset: int,
    epochs: int,
    batch: int,
    loader_workers: int,
    workers: list[int],
    pair: str,
    work: str,
    compile_student: bool = False,
) -> list[dict]:
    """Shard, build a cache and train each configuration with the code on sys.path (only
    APIs that both sides have are used)."""
    import torch

    from catkd.models import build_model, checkpoint_payload
    from pipeline.cache import CacheBuildConfig, build_cache
    from pipeline.data.shard_format import read_index
    from pipeline.data.shard_writer import ShardConfig, shard_dataset
    from pipeline.train.config import TrainConfig
    from pipeline.train.run import train

    teacher, student = pair.split(":")
    data = f"{work}/shards"
    shard_dataset(
        ShardConfig(
            f"imagefolder:{archive}", data, subset=subset, samples_per_shard=500, encoding="raw", progress=False
        )
    )
    num_classes = read_index(data, "train").num_classes
    weights = f"{work}/{teacher}.pth"
    torch.manual_seed(0)
    torch.save(checkpoint_payload(build_model(teacher, num_classes, bias=True), teacher), weights)
    cache = build_cache(
        CacheBuildConfig(
            data=data, teacher=teacher, weights=weights, root=f"{work}/caches", num_views=epochs, progress=False
        )
    )

    def common(num_workers: int) -> dict:
        return dict(
            data=data,
            student=student,
            epochs=epochs,
            batch_size=batch,
            lr_decay_epochs=[epochs],
            num_workers=num_workers,
            loader_workers=loader_workers,
            storage_path=f"{work}/runs",
        )

    def row(mode: str, num_workers: int, last: dict) -> dict:
        return {
            "mode": mode,
            "workers": num_workers,
            "images_per_s": last["images_per_s"],
            "data_wait_fraction": last["data_wait_fraction"],
        }

    rows = []
    for n in workers:
        # normalize=true: a randomly initialised teacher's CAMs are large; this measures speed.
        for mode, extra in (("ce", {}), ("catkd", {"cache": cache, "normalize": True})):
            last = train(TrainConfig(mode=mode, name=f"{mode}-{n}w", **common(n), **extra))["history"][-1]
            rows.append(row(mode, n, last))
    # item 7 of issue 13: does torch.compile help on CPU? (the older side may lack the field)
    if compile_student and "compile" in TrainConfig.__dataclass_fields__:
        last = train(TrainConfig(mode="ce", name="ce-compiled", compile=True, **common(1)))["history"][-1]
        rows.append(row("ce+compile", 1, last))
    return rows


def run_side(code: Path, args: argparse.Namespace, out: Path) -> list[dict]:
    """One side's measurement in a process whose imports resolve to ``code``."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"PYTHONPATH": str(code)}
    command = [
        sys.executable,
        __file__,
        args.archive,
        "--measure-into",
        str(out),
        "--subset",
        str(args.subset),
        "--epochs",
        str(args.epochs),
        "--batch",
        str(args.batch),
        "--loader-workers",
        str(args.loader_workers),
        "--pair",
        args.pair,
        "--workers",
        *map(str, args.workers),
        *(["--compile"] if args.compile else []),
    ]
    subprocess.run(command, cwd=code, env=env, check=True)
    return json.loads(out.read_text())


def best(rounds: list[list[dict]]) -> dict[tuple[str, int], dict]:
    table: dict[tuple[str, int], dict] = {}
    for rows in rounds:
        for row in rows:
            key = (row["mode"], row["workers"])
            if key not in table or row["images_per_s"] > table[key]["images_per_s"]:
                table[key] = row
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("archive", help="ImageFolder-layout archive with train/ and test/ (CIFAR-10 as JPEG)")
    parser.add_argument("--subset", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--loader-workers", type=int, default=1)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="Ray Train worker counts")
    parser.add_argument("--pair", default="resnet56:resnet20", help="teacher:student")
    parser.add_argument("--before", help="a git revision to compare with (checked out in a worktree)")
    parser.add_argument("--rounds", type=int, default=2, help="alternations of before and after")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="also the student alone with compile=true (1 worker; where the code has it)",
    )
    parser.add_argument("--measure-into", help=argparse.SUPPRESS)  # internal: one side, rows to this JSON file
    args = parser.parse_args()
    archive = str(Path(args.archive).resolve())
    args.archive = archive

    if args.measure_into:
        with tempfile.TemporaryDirectory() as work:
            rows = measure(
                archive,
                args.subset,
                args.epochs,
                args.batch,
                args.loader_workers,
                args.workers,
                args.pair,
                work,
                args.compile,
            )
        Path(args.measure_into).write_text(json.dumps(rows))
        return

    sides = {"after": ROOT}
    with tempfile.TemporaryDirectory() as tmp:
        if args.before:
            worktree = Path(tmp) / "before"
            subprocess.run(
                ["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(worktree), args.before], check=True
            )
            sides = {"before": worktree, "after": ROOT}
        try:
            results: dict[str, list[list[dict]]] = {side: [] for side in sides}
            for r in range(args.rounds):
                for side, code in sides.items():
                    print(f"[bench] round {r + 1}/{args.rounds}: {side} ({code})", flush=True)
                    results[side].append(run_side(code, args, Path(tmp) / f"{side}-{r}.json"))
        finally:
            if args.before:
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(worktree)], check=False)
    tables = {side: best(rounds) for side, rounds in results.items()}
    print(
        f"\n{args.subset} CIFAR-10 images, {args.pair}, batch {args.batch} per worker, "
        f"{args.loader_workers} loader worker(s) per worker, "
        f"last of {args.epochs} epochs, best of {args.rounds} round(s); {os.cpu_count()} CPUs"
    )
    header = f"{'mode':<12}{'workers':>4}" + "".join(f"{side + ' img/s':>14}{'wait':>7}" for side in sides)
    print(header + (f"{'after/before':>14}" if "before" in sides else ""))
    for key in tables["after"]:
        line = f"{key[0]:<12}{key[1]:>4}"
        for side in sides:
            row = tables[side].get(key)
            line += (
                f"{row['images_per_s']:>14.0f}{100 * row['data_wait_fraction']:>6.1f}%" if row else f"{'-':>14}{'':>7}"
            )
        if "before" in sides and key in tables["before"]:
            line += f"{tables['after'][key]['images_per_s'] / tables['before'][key]['images_per_s']:>14.2f}"
        print(line)
    compiled, plain = tables["after"].get(("ce+compile", 1)), tables["after"].get(("ce", 1))
    if compiled and plain:
        print(
            f"torch.compile, student alone, 1 worker: {compiled['images_per_s'] / plain['images_per_s']:.2f}x the "
            "eager rate (last epoch)"
        )


if __name__ == "__main__":
    main()
