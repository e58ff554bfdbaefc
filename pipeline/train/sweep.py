"""``catkd sweep``: many student runs from one cache, at the same time, on one cluster.

A grid over students, beta, r and seeds; each point is an ordinary ``catkd train`` run
(its own Ray Train worker group, checkpoints and resume), started from a driver thread
so that up to ``grid.concurrent`` runs read the same cache at once. A finished sweep
prints one table; rerunning it resumes or skips finished runs (same names).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from pipeline.ray_setup import init_ray
from pipeline.settings import check_fields
from pipeline.storage import filesystem, join, write_atomic
from pipeline.train.config import TrainConfig
from pipeline.train.run import train


@dataclass
class SweepGrid:
    # The grid flags of `catkd sweep` are these fields (pipeline.settings.add_flags).
    students: list[str] = field(default_factory=lambda: ["resnet8"])  # student architectures
    betas: list[float] = field(default_factory=lambda: [1.0])  # CAT loss weights
    resolutions: list[int] = field(default_factory=lambda: [2])  # CAM pooling resolutions r
    seeds: list[int] = field(default_factory=lambda: [0])  # run seeds
    concurrent: int = 2  # runs at the same time

    def __post_init__(self) -> None:
        check_fields(self, at_least={"concurrent": 1})

    def points(self, base: TrainConfig) -> list[TrainConfig]:
        runs = []
        for student, beta, r, seed in itertools.product(self.students, self.betas, self.resolutions, self.seeds):
            name = f"{base.name}/{student}-beta{beta:g}-r{r}-seed{seed}"
            runs.append(dataclasses.replace(base, student=student, beta=beta, resolution=r, seed=seed, name=name))
        return runs


def run_sweep(base: TrainConfig, grid: SweepGrid) -> list[dict]:
    init_ray()
    points = grid.points(base)
    print(f"[sweep] {len(points)} runs, up to {grid.concurrent} at a time, reading {base.cache or 'no cache'}")

    def one(cfg: TrainConfig) -> dict:
        last = train(cfg)["history"][-1]
        return {
            "name": cfg.name,
            "student": cfg.student,
            "beta": cfg.beta,
            "resolution": cfg.resolution,
            "seed": cfg.seed,
            "test_top1": last["test_top1"],
            "test_top5": last["test_top5"],
            "images_per_s": last["images_per_s"],
        }

    with ThreadPoolExecutor(max_workers=grid.concurrent) as pool:
        results = list(pool.map(one, points))
    fs, root = filesystem(base.storage_path)
    write_atomic(fs, join(root, base.name, "sweep.json"), json.dumps(results, indent=1).encode())
    print_table(results)
    return results


def print_table(results: list[dict]) -> None:
    print(f"\n{'run':<44}{'top-1 %':>9}{'top-5 %':>9}{'img/s':>8}")
    for r in sorted(results, key=lambda r: -r["test_top1"]):
        print(f"{r['name']:<44}{r['test_top1']:>9.2f}{r['test_top5']:>9.2f}{r['images_per_s']:>8.0f}")
