"""The real-data study (docs/RESULTS.md): CAT-KD from a cache against a live teacher and
the usual baselines, on an ImageFolder-layout archive (CIFAR-10 as JPEG).

    shard -> train the teacher (ce) -> build caches with S views -> side-by-side
    throughput (each mode alone, one epoch) -> students in every mode and seed, and the
    S study -> CAM picture, learning curves, tables

    .venv/bin/python bench/study.py ../shared/data/cifar10-jpeg.tar.gz --out outputs/study

Defaults fit about 1.5 hours of a 2-core CPU machine (5,000 training images, 10 student
epochs); ``--subset 0 --teacher-epochs 240 --epochs 240 --use-gpu`` is the full-size
version. Rerunning with the same ``--out`` resumes: finished shards, caches and runs are
reused. Everything lands in ``--out``: results.json, results.md, cams.png, curves.png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless
import matplotlib.pyplot as plt
import torch

from catkd.models import build_model, load_checkpoint
from pipeline.data.views import AugmentSpec, normalize_batch
from pipeline.cache import CacheBuildConfig, build_cache
from pipeline.cache.verify import cache_info
from pipeline.ray_setup import init_ray
from pipeline.data.loader import ReaderConfig, ShardStream
from pipeline.data.shard_writer import ShardConfig, shard_dataset
from pipeline.data.shard_format import read_index
from pipeline.train.config import MODES, TrainConfig
from pipeline.train.run import train
from pipeline.viz import render_cam_report

CACHED_MODES = ("kd", "catkd", "cat")


@dataclass
class StudyConfig:
    archive: str
    out: str = "outputs/study"
    subset: int = 5000  # images kept per split, evenly spaced over classes; 0 keeps all
    teacher: str = "resnet56"
    student: str = "resnet20"
    teacher_epochs: int = 15
    epochs: int = 10  # every student; the main caches hold S = epochs views
    view_counts: list[int] = field(default_factory=lambda: [1, 4])  # the S study (besides S = epochs)
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    batch_size: int = 64  # per Ray Train worker
    lr: float = 0.05  # for one worker at batch_size; scaled linearly with workers
    beta: float = 0.7  # the paper's CAT weight for resnet56 -> resnet20 (jobs/configs/paper)
    teacher_workers: int = 2  # Ray Train workers for the teacher (it runs alone)
    student_workers: int = 1  # Ray Train workers per student run
    concurrent: int = 2  # student runs at a time (each 1 CPU per worker on CPU)
    loader_workers: int = 1
    cache_actors: int = 2
    use_gpu: bool = False
    # Ordinary settings: shards are class-mixed when written (DESIGN section 4), so
    # neither tiny shards nor a split-sized shuffle buffer are needed.
    samples_per_shard: int = 1000
    shuffle_buffer: int = TrainConfig.shuffle_buffer

    @property
    def all_view_counts(self) -> list[int]:
        return sorted(set(self.view_counts) | {self.epochs})


def milestones(epochs: int) -> list[int]:
    """The paper's schedule (decay at 150, 180, 210 of 240 epochs), scaled to ``epochs``."""
    return sorted({min(epochs, max(1, round(epochs * f))) for f in (150 / 240, 180 / 240, 210 / 240)})


def _say(message: str) -> None:
    print(f"\n[study] {message}", flush=True)


def shard(cfg: StudyConfig, data: str) -> dict:
    start = time.perf_counter()
    shard_dataset(ShardConfig(f"imagefolder:{cfg.archive}", data, subset=cfg.subset or None, samples_per_shard=cfg.samples_per_shard, encoding="raw"))
    index = read_index(data, "train")
    return {"seconds": time.perf_counter() - start, "train_images": index.num_samples, "test_images": read_index(data, "test").num_samples,
            "classes": index.classes}  # fmt: skip


def student_runs(cfg: StudyConfig, base: TrainConfig, caches: dict[int, str], teacher_weights: str) -> list[TrainConfig]:
    """Every student: the five modes for each seed (cached modes read the S = epochs cache;
    online-catkd replays the same views live), then the S study; seed-major, so the first
    seed's results are complete first."""
    runs = []
    for seed in cfg.seeds:
        for mode in MODES:
            runs.append(mode_config(cfg, base, mode, caches[cfg.epochs], teacher_weights, seed=seed, name=f"{mode}-S{cfg.epochs}-seed{seed}"))
        for views in cfg.all_view_counts:
            if views != cfg.epochs:
                runs.append(mode_config(cfg, base, "catkd", caches[views], teacher_weights, seed=seed, name=f"catkd-S{views}-seed{seed}"))
    return runs


def mode_config(cfg: StudyConfig, base: TrainConfig, mode: str, cache: str, teacher_weights: str, **changes) -> TrainConfig:
    if mode in CACHED_MODES:
        changes |= {"cache": cache}
    if mode == "online-catkd":
        changes |= {"teacher": cfg.teacher, "teacher_weights": teacher_weights, "num_views": cfg.epochs}
    return replace(base, mode=mode, **changes)


def first_test_batch(data: str, batch_size: int) -> torch.Tensor:
    stream = ShardStream(ReaderConfig(data=data, split="test", batch_size=batch_size, train=False, spec=AugmentSpec.preset("cifar"), normalize=False))
    return normalize_batch(stream.cfg.spec, next(iter(stream))["image"])


@torch.inference_mode()
def forward_rate(model: torch.nn.Module, x: torch.Tensor, rounds: int = 20) -> float:
    """Bare forward images/s at one thread (what one CPU Ray Train worker has): for the
    teacher, the cost online-catkd adds to every step."""
    model.eval()
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model(x)  # warm-up
        start = time.perf_counter()
        for _ in range(rounds):
            model(x)
        return rounds * len(x) / (time.perf_counter() - start)
    finally:
        torch.set_num_threads(previous)


def summarize(histories: dict[str, list[dict]]) -> list[dict]:
    """One row per (mode, S): final test top-1 over seeds (mean, sample std, values)."""
    groups: dict[tuple[str, int], list[float]] = {}
    for name, history in histories.items():
        mode, views, _ = name.rsplit("-", 2)
        groups.setdefault((mode, int(views[1:])), []).append(history[-1]["test_top1"])
    rows = []
    for (mode, views), values in groups.items():
        spread = statistics.stdev(values) if len(values) > 1 else float("nan")
        rows.append({"mode": mode, "views": None if mode == "ce" else views,  # ce reads no teacher views
                     "top1_mean": statistics.mean(values), "top1_std": spread, "top1": values})  # fmt: skip
    return rows


def plot_curves(histories: dict[str, list[dict]], path: Path) -> None:
    """Test top-1 per epoch, one line per run (one colour per mode/S, one style per seed)."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    groups = sorted({name.rsplit("-", 1)[0] for name in histories})
    colours = {g: plt.cm.tab10(i % 10) for i, g in enumerate(groups)}
    for name, history in sorted(histories.items()):
        group, seed = name.rsplit("-", 1)
        style = ["-", "--", ":", "-."][int(seed.removeprefix("seed")) % 4]
        ax.plot([m["epoch"] for m in history], [m["test_top1"] for m in history], style, color=colours[group],
                label=group if style == "-" else None)  # fmt: skip
    ax.set_xlabel("epoch")
    ax.set_ylabel("test top-1 (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("students: test top-1 per epoch (line style = seed)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(summary: dict) -> str:
    cfg = summary["config"]
    lines = [
        f"{summary['data']['train_images']} training / {summary['data']['test_images']} test images; teacher {cfg['teacher']} "
        f"({cfg['teacher_epochs']} epochs), students {cfg['student']} ({cfg['epochs']} epochs, batch {cfg['batch_size']}, "
        f"lr {cfg['lr']}, decay at {summary['student_milestones']}), seeds {cfg['seeds']}, beta {cfg['beta']}",
        "",
        f"teacher top-1: {summary['teacher']['top1']:.2f}%",
        "",
        "| mode | S | top-1 mean (%) | std | per seed |",
        "|---|---:|---:|---:|---|",
    ]
    for row in summary["students"]:
        views = "" if row["views"] is None else row["views"]
        lines.append(f"| {row['mode']} | {views} | {row['top1_mean']:.2f} | {row['top1_std']:.2f} | {', '.join(f'{v:.2f}' for v in row['top1'])} |")
    diff = summary["cached_minus_online"]
    lines += ["", f"cached - online CAT-KD (S = {cfg['epochs']}): per seed {', '.join(f'{d:+.2f}' for d in diff['per_seed'])}; "
              f"mean {diff['mean']:+.2f} points", ""]  # fmt: skip
    lines += ["| mode (alone, one epoch) | images/s | vs ce | data wait |", "|---|---:|---:|---:|"]
    base = summary["throughput"]["ce"]["images_per_s"]
    for mode, t in summary["throughput"].items():
        lines.append(f"| {mode} | {t['images_per_s']:.0f} | {t['images_per_s'] / base:.2f} | {100 * t['data_wait_fraction']:.1f}% |")
    f = summary["forward_images_per_s"]
    lines += ["", f"bare forward, batch {cfg['batch_size']}, one thread: teacher {cfg['teacher']} {f['teacher']:.0f} images/s, "
              f"student {cfg['student']} {f['student']:.0f} images/s", "",
              "| cache | views | build s | views/s | bytes/view | total MB |", "|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for views, c in summary["caches"].items():
        lines.append(f"| S={views} | {c['views']} | {c['build_seconds']:.0f} | {c['views'] / c['build_seconds']:.0f} | {c['bytes_per_view']:.0f} | {c['bytes'] / 1e6:.2f} |")
    seconds = summary["seconds"]
    lines += ["", "wall time (s): " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items())]
    return "\n".join(lines) + "\n"


def run_study(cfg: StudyConfig) -> dict:
    out = Path(cfg.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    data, runs, cache_root = str(out / "data"), str(out / "runs"), str(out / "caches")
    started = time.perf_counter()
    seconds: dict[str, float] = {}
    init_ray()

    _say(f"1/6 shard {cfg.archive} (subset {cfg.subset or 'all'})")
    data_info = shard(cfg, data)
    seconds["shard"] = data_info.pop("seconds")

    base = TrainConfig(mode="ce", student=cfg.student, data=data, epochs=cfg.epochs, batch_size=cfg.batch_size,
                       lr=cfg.lr * cfg.student_workers, lr_decay_epochs=milestones(cfg.epochs), beta=cfg.beta,
                       num_workers=cfg.student_workers, use_gpu=cfg.use_gpu, loader_workers=cfg.loader_workers,
                       storage_path=runs, shuffle_buffer=cfg.shuffle_buffer)  # fmt: skip
    _say(f"2/6 train the teacher {cfg.teacher} ({cfg.teacher_epochs} epochs, {cfg.teacher_workers} workers)")
    t = time.perf_counter()
    teacher_run = train(replace(base, student=cfg.teacher, name="teacher", epochs=cfg.teacher_epochs, lr=cfg.lr * cfg.teacher_workers,
                                lr_decay_epochs=milestones(cfg.teacher_epochs), num_workers=cfg.teacher_workers))  # fmt: skip
    seconds["teacher"] = time.perf_counter() - t
    teacher_weights = teacher_run["exported"]["student_cam.pt"]

    _say(f"3/6 build caches with S = {cfg.all_view_counts} views")
    t0 = time.perf_counter()
    caches, cache_figures = {}, {}
    for views in cfg.all_view_counts:
        t = time.perf_counter()
        caches[views] = build_cache(CacheBuildConfig(data=data, teacher=cfg.teacher, weights=teacher_weights, root=cache_root, num_views=views,
                                                     actors=cfg.cache_actors, gpus_per_actor=1.0 if cfg.use_gpu else 0.0))  # fmt: skip
        info = cache_info(caches[views])
        cache_figures[views] = {"url": caches[views], "build_seconds": time.perf_counter() - t, "views": views * data_info["train_images"],
                                "bytes": info["bytes_on_storage"], "bytes_per_view": info["bytes_per_view"]}  # fmt: skip
    seconds["caches"] = time.perf_counter() - t0

    _say("4/6 throughput side by side: each mode alone for one epoch")
    t = time.perf_counter()
    throughput = {}
    for mode in MODES:
        last = train(mode_config(cfg, replace(base, epochs=1), mode, caches[cfg.epochs], teacher_weights, name=f"throughput/{mode}"))["history"][-1]
        throughput[mode] = {k: last[k] for k in ("images_per_s", "data_wait_fraction")}
    x, num_classes = first_test_batch(data, cfg.batch_size), len(data_info["classes"])
    forward = {"teacher": forward_rate(load_checkpoint(teacher_weights, cfg.teacher, num_classes), x),
               "student": forward_rate(build_model(cfg.student, num_classes), x)}  # fmt: skip
    seconds["throughput"] = time.perf_counter() - t

    planned = student_runs(cfg, base, caches, teacher_weights)
    _say(f"5/6 {len(planned)} student runs, {cfg.concurrent} at a time")
    t = time.perf_counter()
    with ThreadPoolExecutor(max_workers=cfg.concurrent) as pool:
        results = dict(zip([r.name for r in planned], pool.map(train, planned)))
    seconds["students"] = time.perf_counter() - t
    histories = {name: r["history"] for name, r in results.items()}

    _say("6/6 CAM picture and learning curves")
    first = cfg.seeds[0]
    checkpoints = {
        f"teacher {cfg.teacher}": teacher_weights,
        f"vanilla {cfg.student}": results[f"ce-S{cfg.epochs}-seed{first}"]["exported"]["student_cam.pt"],
        f"CAT-KD {cfg.student}": results[f"catkd-S{cfg.epochs}-seed{first}"]["exported"]["student_cam.pt"],
    }
    render_cam_report(data, checkpoints, str(out / "cams.png"), shown=8)
    plot_curves(histories, out / "curves.png")

    final = {name: history[-1]["test_top1"] for name, history in histories.items()}
    per_seed = [final[f"catkd-S{cfg.epochs}-seed{s}"] - final[f"online-catkd-S{cfg.epochs}-seed{s}"] for s in cfg.seeds]
    seconds["total"] = time.perf_counter() - started
    summary = {
        "config": asdict(cfg),
        "student_milestones": milestones(cfg.epochs),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "gpu": torch.cuda.get_device_name(0) if cfg.use_gpu and torch.cuda.is_available() else None},  # fmt: skip
        "data": data_info,
        "teacher": {"top1": teacher_run["history"][-1]["test_top1"], "history": teacher_run["history"], "weights": teacher_weights},
        "students": summarize(histories),
        "cached_minus_online": {"per_seed": per_seed, "mean": statistics.mean(per_seed)},
        "throughput": throughput,
        "forward_images_per_s": forward,
        "caches": cache_figures,
        "histories": histories,
        "seconds": seconds,
    }
    (out / "results.json").write_text(json.dumps(summary, indent=1))
    table = markdown(summary)
    (out / "results.md").write_text(table)
    print("\n" + table)
    _say(f"finished in {seconds['total']:.0f} s; results.json, results.md, cams.png, curves.png in {out}")
    return summary


def parse_args(argv: list[str] | None = None) -> StudyConfig:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    defaults = StudyConfig(archive="")
    parser.add_argument("archive", help="ImageFolder-layout archive or folder with train/ and test/ (CIFAR-10 as JPEG)")
    for name, value in asdict(defaults).items():
        if name == "archive":
            continue
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            parser.add_argument(flag, action="store_true")
        elif isinstance(value, list):
            parser.add_argument(flag, type=int, nargs="+", default=value)
        else:
            parser.add_argument(flag, type=type(value), default=value)
    return StudyConfig(**vars(parser.parse_args(argv)))


if __name__ == "__main__":
    run_study(parse_args(sys.argv[1:]))
