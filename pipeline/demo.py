"""``catkd demo`` (the README's main command): the whole pipeline on the embedded
synthetic dataset, on a local Ray (or ``RAY_ADDRESS``):

    shard -> train a teacher -> build its cache -> distill a CAT-KD student from the
    cache and a vanilla student -> evaluate -> table + CAM picture

Everything lands in one folder, named at the end.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from pipeline.cache import CacheBuildConfig, build_cache
from pipeline.cache.verify import cache_info
from pipeline.data.shard_writer import ShardConfig, shard_dataset
from pipeline.train.config import TrainConfig
from pipeline.train.run import train
from pipeline.viz import render_cam_report


@dataclass
class DemoConfig:
    out: str = "outputs/demo"
    train_samples: int = 2000
    test_samples: int = 500
    teacher: str = "resnet20"
    student: str = "resnet8"
    teacher_epochs: int = 8
    student_epochs: int = 6
    beta: float = 0.5
    num_workers: int = 2  # Ray Train workers
    seed: int = 0


def _stage(title: str) -> float:
    print(f"\n[demo] === {title} ===", flush=True)
    return time.perf_counter()


def run_demo(cfg: DemoConfig) -> dict:
    out = Path(cfg.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    data, runs = str(out / "data"), str(out / "runs")
    started = time.perf_counter()

    _stage("1/5 shard synthetic:shapes")
    shard_dataset(
        ShardConfig(
            "synthetic:shapes",
            data,
            samples_per_shard=250,
            synthetic={"train_samples": cfg.train_samples, "test_samples": cfg.test_samples, "seed": cfg.seed},
        )
    )

    common = dict(
        data=data,
        epochs=cfg.student_epochs,
        batch_size=64,
        lr=0.05,
        lr_decay_epochs=[cfg.student_epochs - 2],
        num_workers=cfg.num_workers,
        loader_workers=1,
        storage_path=runs,
        seed=cfg.seed,
    )
    t = _stage(f"2/5 train the teacher ({cfg.teacher}, cross-entropy)")
    teacher_run = train(
        TrainConfig(
            **(
                common
                | dict(
                    mode="ce",
                    student=cfg.teacher,
                    name="teacher",
                    epochs=cfg.teacher_epochs,
                    lr_decay_epochs=[cfg.teacher_epochs - 2],
                )
            )
        )
    )
    teacher_weights = teacher_run["exported"]["student_cam.pt"]
    teacher_seconds = time.perf_counter() - t

    t = _stage(f"3/5 build the teacher's CAM cache ({cfg.student_epochs} views per sample)")
    cache = build_cache(
        CacheBuildConfig(
            data=data,
            teacher=cfg.teacher,
            weights=teacher_weights,
            root=str(out / "caches"),
            num_views=cfg.student_epochs,
            resolution=2,
            batch_size=250,
        )
    )
    cache_seconds = time.perf_counter() - t
    info = cache_info(cache)

    _stage(f"4/5 distill students ({cfg.student}): vanilla and CAT-KD from the cache")
    vanilla = train(TrainConfig(**(common | dict(mode="ce", student=cfg.student, name="vanilla"))))
    catkd = train(
        TrainConfig(**(common | dict(mode="catkd", student=cfg.student, cache=cache, beta=cfg.beta, name="catkd")))
    )

    _stage("5/5 evaluate and draw CAMs")
    models = {
        "teacher": teacher_weights,
        "vanilla student": vanilla["exported"]["student_cam.pt"],
        "CAT-KD student": catkd["exported"]["student_cam.pt"],
    }
    peak_rates = render_cam_report(data, models, str(out / "cams.png"))
    results = {}
    for label, run in (("teacher", teacher_run), ("vanilla student", vanilla), ("CAT-KD student", catkd)):
        last = run["history"][-1]
        results[label] = {
            "arch": cfg.teacher if label == "teacher" else cfg.student,
            "top1": last["test_top1"],
            "images_per_s": last["images_per_s"],
            "cam_peak_in_box": peak_rates[label],
            "checkpoint": models[label],
        }
    summary = {
        "config": asdict(cfg),
        "results": results,
        "cache": {
            "url": cache,
            "bytes": info["bytes_on_storage"],
            "bytes_per_view": info["bytes_per_view"],
            "build_seconds": cache_seconds,
        },
        "teacher_train_seconds": teacher_seconds,
        "total_seconds": time.perf_counter() - started,
    }
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    print_table(summary)
    print(f"\n[demo] finished in {summary['total_seconds']:.0f} s; everything is in {out}")
    print(
        "[demo]   results.json, cams.png, data/ (shards), caches/ (teacher targets), "
        "runs/ (checkpoints, metrics, TensorBoard)"
    )
    return summary


def print_table(summary: dict) -> None:
    cache = summary["cache"]
    print(f"\n{'model':<17}{'arch':<10}{'top-1 %':>9}{'train img/s':>13}{'CAM peak in box':>17}")
    for label, r in summary["results"].items():
        print(
            f"{label:<17}{r['arch']:<10}{r['top1']:>9.1f}{r['images_per_s']:>13.0f}{100 * r['cam_peak_in_box']:>16.1f}%"
        )
    print(
        f"teacher cache: {cache['bytes'] / 1e6:.2f} MB ({cache['bytes_per_view']:.0f} bytes per view), built in "
        f"{cache['build_seconds']:.0f} s"
    )
