"""The real-data study (docs/RESULTS.md): does CAT-KD from a catkd cache beat KD and a
vanilla student, by how much, and do its students' CAMs follow the teacher's?

    shard -> the teacher (a checkpoint given with --teacher-weights, or trained here)
    -> caches with S views -> side-by-side throughput (each mode alone, one epoch)
    -> students in every mode and seed, and the S study -> CAM agreement with the
    teacher -> pictures -> results.json and results.md

    .venv/bin/python bench/study.py ../shared/data/cifar10-jpeg.tar.gz --out outputs/study \
        --teacher-weights ../shared/data/teachers/cifar10_resnet20.pt

Defaults fit about two hours of a 2-core CPU machine: resnet8 students on a
class-balanced 10,000-image training subset, 20 epochs, every test image. Without
--teacher-weights the script first trains its own teacher (--teacher, --teacher-epochs).
Rerunning with the same --out resumes: finished shards, caches and runs are reused.
Everything lands in --out: results.json (docs/results/cifar10.json is one), results.md,
cams.png, curves.png; bench/study_report.py turns results.json into docs/RESULTS.md's
tables.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless
import matplotlib.pyplot as plt
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/study_report.py, run as a script
from study_report import markdown  # noqa: E402

from catkd.models import build_model, read_checkpoint  # noqa: E402
from pipeline.cache import CacheBuildConfig, build_cache  # noqa: E402
from pipeline.cache.verify import cache_info  # noqa: E402
from pipeline.data.shard_format import read_index  # noqa: E402
from pipeline.data.shard_writer import ShardConfig, shard_dataset  # noqa: E402
from pipeline.ray_setup import init_ray  # noqa: E402
from pipeline.storage import filesystem  # noqa: E402
from pipeline.train.config import CACHED_MODES, MODES, TrainConfig  # noqa: E402
from pipeline.train.evaluate import evaluate_checkpoint  # noqa: E402
from pipeline.train.run import train  # noqa: E402
from pipeline.viz import cam_agreement, load_model, load_split, raw_true_class_cams, render_cam_report  # noqa: E402


@dataclass
class StudyConfig:
    archive: str
    out: str = "outputs/study"
    # images kept per split, evenly spaced over classes (CIFAR-10: 1,000 per class in train, all of test); 0 keeps all
    subset: int = 10000
    teacher_weights: str = ""  # a trained teacher checkpoint (catkd format); empty: train one here
    teacher: str = "resnet20"  # its architecture (checked against the checkpoint)
    teacher_epochs: int = 20  # only when the teacher is trained here
    student: str = "resnet8"
    epochs: int = 20  # every student; the main caches hold S = epochs views
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])  # ce, kd and catkd (S = epochs)
    single_seed_modes: int = 1  # online-catkd and cat run the first this many seeds
    view_counts: list[int] = field(default_factory=lambda: [1, 4])  # the S study (catkd, besides S = epochs)
    view_seeds: int = 2  # the S study runs the first this many seeds
    batch_size: int = 64  # per Ray Train worker
    lr: float = 0.05  # for one worker at batch_size; scaled linearly with workers
    # the paper's CAT weight for CIFAR resnet56 -> resnet20, the nearest pair of this family (jobs/configs/paper)
    beta: float = 0.7
    resolution: int = 2  # the paper's r for CIFAR
    kd_temperature: float = 4.0
    teacher_workers: int = 2  # Ray Train workers for a teacher trained here (it runs alone)
    student_workers: int = 1  # Ray Train workers per student run
    concurrent: int = 2  # student runs at a time
    cpus_per_worker: int = 1  # what Ray reserves per student worker, so that `concurrent` runs fit at once
    loader_workers: int = 1
    cache_actors: int = 2
    # the modes the throughput phase times, one Ray Train run each; `ce` is the table's base
    throughput_modes: list[str] = field(default_factory=lambda: list(MODES))
    use_gpu: bool = False
    # Ordinary settings: shards are class-mixed when written (DESIGN section 4), so
    # neither tiny shards nor a split-sized shuffle buffer are needed.
    samples_per_shard: int = 1000
    shuffle_buffer: int = TrainConfig.shuffle_buffer

    def __post_init__(self) -> None:
        unknown = sorted(set(self.throughput_modes) - set(MODES))
        if unknown or "ce" not in self.throughput_modes:
            raise SystemExit(
                f"--throughput-modes: {' '.join(self.throughput_modes)}: choose from {', '.join(MODES)}, with ce"
                " (the base of the throughput table)"
            )

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
    shard_dataset(
        ShardConfig(
            f"imagefolder:{cfg.archive}",
            data,
            subset=cfg.subset or None,
            samples_per_shard=cfg.samples_per_shard,
            encoding="raw",
        )
    )
    index = read_index(data, "train")
    return {
        "seconds": time.perf_counter() - start,
        "train_images": index.num_samples,
        "test_images": read_index(data, "test").num_samples,
        "classes": index.classes,
    }


def run_name(mode: str, views: int, seed: int) -> str:
    return f"{mode}-S{views}-seed{seed}"


def planned_runs(cfg: StudyConfig) -> list[tuple[str, int, int]]:
    """(mode, S, seed) of every student, seed-major so the first seed's comparison is
    complete first: ce, kd and catkd for every seed; online-catkd and cat for the first
    ``single_seed_modes`` seeds; catkd with the other view counts for ``view_seeds``."""
    runs = []
    for rank, seed in enumerate(cfg.seeds):
        runs += [("ce", cfg.epochs, seed), ("kd", cfg.epochs, seed), ("catkd", cfg.epochs, seed)]
        if rank < cfg.single_seed_modes:
            runs += [("online-catkd", cfg.epochs, seed), ("cat", cfg.epochs, seed)]
        if rank < cfg.view_seeds:
            runs += [("catkd", views, seed) for views in cfg.all_view_counts if views != cfg.epochs]
    return runs


def mode_config(
    cfg: StudyConfig, base: TrainConfig, mode: str, views: int, caches: dict[int, str], teacher_weights: str, **changes
) -> TrainConfig:
    """One student. ce reads no views: num_views 0 draws view e at epoch e, the very views
    a cached run with S = epochs replays, so runs of one seed see the same data in the
    same order; online-catkd replays those views with the teacher live."""
    if mode in CACHED_MODES:
        changes |= {"cache": caches[views]}
    if mode == "online-catkd":
        changes |= {"teacher": cfg.teacher, "teacher_weights": teacher_weights, "num_views": views}
    return replace(base, mode=mode, **changes)


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


def spread(values: list[float]) -> float | None:
    """Sample standard deviation; None for a single value (JSON has no NaN)."""
    return statistics.stdev(values) if len(values) > 1 else None


def groups_of(runs: list[dict]) -> list[dict]:
    """One row per (mode, S): final test top-1 over seeds."""
    grouped: dict[tuple[str, int | None], list[dict]] = {}
    for run in runs:
        grouped.setdefault((run["mode"], run["views"]), []).append(run)
    return [
        {
            "mode": mode,
            "views": views,
            "seeds": [r["seed"] for r in members],
            "top1": [r["test_top1"] for r in members],
            "top1_mean": statistics.mean(r["test_top1"] for r in members),
            "top1_std": spread([r["test_top1"] for r in members]),
        }
        for (mode, views), members in grouped.items()
    ]


def paired(runs: list[dict], mode: str, other: str, views: int) -> dict:
    """Per seed, ``mode`` minus ``other`` (same seed: same initialisation, data order and views)."""
    final = {(r["mode"], r["views"], r["seed"]): r["test_top1"] for r in runs}
    other_views = None if other == "ce" else views
    seeds = [s for (m, v, s) in final if m == mode and v == views and (other, other_views, s) in final]
    diffs = {str(s): final[(mode, views, s)] - final[(other, other_views, s)] for s in sorted(seeds)}
    values = list(diffs.values())
    return {
        "per_seed": diffs,
        "mean": statistics.mean(values),
        "std": spread(values),
        "positive": sum(v > 0 for v in values),
        "seeds": len(values),
    }


def seed_groups(runs: list[dict], variant: str, order: Callable[[str, str], tuple]) -> list[dict]:
    """One row per (mode, ``variant``) (a cache's storage form, a recipe): final test top-1
    over seeds, in ``order(mode, value)``. The top-k and recipe studies' groups."""
    grouped: dict[tuple[str, str], list[dict]] = {}
    for run in runs:
        grouped.setdefault((run["mode"], run[variant]), []).append(run)
    return [
        {
            "mode": mode,
            variant: value,
            "seeds": [r["seed"] for r in members],
            "top1": [r["test_top1"] for r in members],
            "top1_mean": statistics.mean(r["test_top1"] for r in members),
            "top1_std": spread([r["test_top1"] for r in members]),
        }
        for (mode, value), members in sorted(grouped.items(), key=lambda item: order(*item[0]))
    ]


def paired_against(
    runs: list[dict], variant: str, base: str, order: Callable[[str, str], tuple], within_mode: bool = True
) -> list[dict]:
    """Per (mode, ``variant`` value other than ``base``) and seed: its final top-1 minus
    the same mode's ``base`` run of that seed (same initial weights and data order: only
    the variant differs). With ``within_mode`` false, ``base`` is one run per seed whatever
    its mode (the methods study: every method against kd)."""
    group = (lambda mode: mode) if within_mode else (lambda mode: None)
    final = {(group(r["mode"]), r[variant], r["seed"]): r["test_top1"] for r in runs}
    rows = []
    for mode, value in sorted({(r["mode"], r[variant]) for r in runs if r[variant] != base}, key=lambda mv: order(*mv)):
        g = group(mode)
        seeds = sorted(seed for m, v, seed in final if (m, v) == (g, value) and (g, base, seed) in final)
        if not seeds:
            continue
        diffs = {str(seed): final[(g, value, seed)] - final[(g, base, seed)] for seed in seeds}
        values = list(diffs.values())
        rows.append(
            {
                "mode": mode,
                variant: value,
                "per_seed": diffs,
                "mean": statistics.mean(values),
                "std": spread(values),
                "positive": sum(v > 0 for v in values),
                "seeds": len(values),
            }
        )
    return rows


def run_row(name: str, mode: str, variant: str, value: str, seed: int, history: list[dict], **extra) -> dict:
    """A finished run's row in results.json: what it was (``variant``: the study's
    varied setting, ``value`` its value), its last epoch's test accuracy, ``extra``
    figures, and every epoch."""
    last = history[-1]
    row = {"name": name, "mode": mode, variant: value, "seed": seed}
    return row | {"test_top1": last["test_top1"], "test_top5": last["test_top5"], **extra, "history": history}


def run_plan(
    plan: list[tuple],
    student: Callable[..., dict],
    summary: dict,
    out: Path,
    concurrent: int,
    variant: str,
    base: str,
    order: Callable[[str, str], tuple],
    tag: str,
    started: float,
    within_mode: bool = True,
) -> None:
    """Every run of ``plan`` (``student(*run)`` gives its row), ``concurrent`` at a time;
    ``summary`` gets each row as it ends, its runs sorted by (seed, ``order``), grouped
    by seed and paired against the ``base`` value of ``variant`` (``paired_against``), and results.json is
    rewritten then (with the seconds since ``started``, a perf_counter reading), so a
    killed study keeps what finished."""
    with ThreadPoolExecutor(max_workers=concurrent) as pool:
        futures = [pool.submit(student, *run) for run in plan]
        for future in as_completed(futures):
            runs = summary["runs"]
            runs.append(future.result())
            runs.sort(key=lambda r: (r["seed"], order(r["mode"], r[variant])))
            summary["groups"] = seed_groups(runs, variant, order)
            summary["paired_differences"] = paired_against(runs, variant, base, order, within_mode)
            summary["seconds"] = time.perf_counter() - started
            (out / "results.json").write_text(json.dumps(summary, indent=1) + "\n")
            print(f"[{tag}] {len(runs)}/{len(plan)} runs done", flush=True)
    summary["complete"] = True
    (out / "results.json").write_text(json.dumps(summary, indent=1) + "\n")


@dataclass
class Setup:
    """What the top-k and recipe studies share before their caches: the folders, the
    sharded data, the students' base config and the teacher."""

    cfg: StudyConfig
    out: Path
    data: str
    runs_root: str
    cache_root: str
    started: float  # perf_counter at the start
    data_info: dict
    base: TrainConfig
    teacher: dict

    def summary(self, command: str, **figures) -> dict:
        """results.json's head: the command, date, settings, machine, data, teacher, then
        the study's own ``figures``; its runs come in as they end."""
        cfg = self.cfg
        return {
            "command": command,
            "date": time.strftime("%Y-%m-%d"),
            "settings": {**asdict(cfg), "student_lr_decay_epochs": milestones(cfg.epochs), "spec": self.base.spec},
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__},
            "data": self.data_info,
            "teacher": self.teacher,
            **figures,
            "runs": [],
            "complete": False,
        }


def set_up(cfg: StudyConfig) -> Setup:
    """Steps 1 and 2 of 4: shard the archive into --out, make the base config, and train
    or load the teacher."""
    out = Path(cfg.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    data, runs_root, cache_root = str(out / "data"), str(out / "runs"), str(out / "caches")
    started = time.perf_counter()
    init_ray()
    _say(f"1/4 shard {cfg.archive} (subset {cfg.subset or 'all'})")
    data_info = shard(cfg, data)
    data_info.pop("seconds")
    base = base_config(cfg, data, runs_root)
    _say("2/4 the teacher: " + (cfg.teacher_weights or f"train {cfg.teacher}"))
    cfg, teacher = prepare_teacher(cfg, base, data)
    return Setup(cfg, out, data, runs_root, cache_root, started, data_info, base, teacher)


def finish(summary: dict, out: Path, tables: dict, picture: str, plot: Callable[[dict, Path], None]) -> None:
    """The study's picture, results.md with its tables, and the closing lines."""
    plot(summary, out / picture)
    table = markdown(summary, tables)
    (out / "results.md").write_text(table)
    print("\n" + table)
    _say(f"finished in {summary['seconds']:.0f} s; results.json, results.md, {picture} in {out}")


def agreement(cfg: StudyConfig, data: str, teacher_weights: str, runs: list[dict]) -> dict:
    """Every student's CAM agreement with the teacher on the whole test split, per run and
    averaged per (mode, S)."""
    batch, inputs, classes = load_split(data, "test")
    torch.set_num_threads(os.cpu_count() or 1)
    teacher_cams, _ = raw_true_class_cams(
        load_model(teacher_weights, len(classes)), inputs, batch["label"]
    )  # once, for every student
    for run in runs:
        student_cams, _ = raw_true_class_cams(load_model(run["weights"], len(classes)), inputs, batch["label"])
        run["cam_agreement"] = cam_agreement(teacher_cams, student_cams, resolution=cfg.resolution)
    per_group: dict[str, dict] = {}
    for run in runs:
        key = run["mode"] if run["views"] in (None, cfg.epochs) else f"{run['mode']}-S{run['views']}"
        per_group.setdefault(key, {"mode": run["mode"], "views": run["views"], "runs": []})["runs"].append(
            run["cam_agreement"]
        )
    for entry in per_group.values():
        members = entry.pop("runs")
        for metric in (f"cosine_pooled_r{cfg.resolution}", "cosine_full", "peak_cell_agreement"):
            entry[metric] = statistics.mean(m[metric] for m in members)
            entry[metric + "_std"] = spread([m[metric] for m in members])
        entry["runs"], entry["cells"], entry["samples"] = len(members), members[0]["cells"], members[0]["samples"]
    return per_group


def plot_curves(runs: list[dict], path: Path) -> None:
    """Test and train top-1 per epoch, one line per run (a colour per mode/S, a style per seed)."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), sharex=True)
    groups = sorted({(r["mode"], r["views"]) for r in runs}, key=str)
    colours = {g: plt.cm.tab10(i % 10) for i, g in enumerate(groups)}
    seeds = sorted({r["seed"] for r in runs})
    for run in runs:
        group = (run["mode"], run["views"])
        style = ["-", "--", ":", "-."][seeds.index(run["seed"]) % 4]
        label = f"{run['mode']}" + ("" if run["views"] is None else f" S={run['views']}")
        first = run["seed"] == min(r["seed"] for r in runs if (r["mode"], r["views"]) == group)
        epochs = [m["epoch"] for m in run["history"]]
        for ax, key in zip(axes, ("test_top1", "train_top1"), strict=True):
            ax.plot(
                epochs,
                [m[key] for m in run["history"]],
                style,
                color=colours[group],
                label=label if first else None,
                lw=1.2,
            )
    for ax, title in zip(axes, ("test top-1 (%)", "train top-1 (%)"), strict=True):
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("students per epoch (line style = seed)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def prepare_teacher(cfg: StudyConfig, base: TrainConfig, data: str) -> tuple[StudyConfig, dict]:
    """The teacher a user brings (its architecture read from the checkpoint), or one
    trained here; either way its test top-1 comes from ``catkd eval``'s path."""
    if cfg.teacher_weights:
        fs, path = filesystem(cfg.teacher_weights)
        raw = fs.cat_file(path)
        arch = read_checkpoint(io.BytesIO(raw))["arch"] or cfg.teacher
        if arch != cfg.teacher:
            print(f"[study] {cfg.teacher_weights} holds a {arch}: using that as the teacher architecture")
        cfg = replace(cfg, teacher=arch)
        info = {
            "source": cfg.teacher_weights,
            "trained_here": False,
            "sha256": hashlib.sha256(raw).hexdigest(),
            "epochs": None,
        }
        weights = cfg.teacher_weights
    else:
        run = train(
            replace(
                base,
                student=cfg.teacher,
                name="teacher",
                epochs=cfg.teacher_epochs,
                lr=cfg.lr * cfg.teacher_workers,
                lr_decay_epochs=milestones(cfg.teacher_epochs),
                num_workers=cfg.teacher_workers,
                cpus_per_worker=0,
            )
        )
        weights = run["exported"]["student_cam.pt"]
        info = {"source": weights, "trained_here": True, "epochs": cfg.teacher_epochs, "history": run["history"]}
    metrics = evaluate_checkpoint(weights, data, arch=cfg.teacher, loader_workers=cfg.loader_workers)
    return cfg, {
        "arch": cfg.teacher,
        "test_top1": metrics["top1"],
        "test_top5": metrics["top5"],
        "weights": weights,
        **info,
    }


def base_config(cfg: StudyConfig, data: str, runs_root: str) -> TrainConfig:
    """What every student of the study shares; a run changes only its mode, cache, seed and name."""
    return TrainConfig(
        mode="ce",
        student=cfg.student,
        data=data,
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        lr=cfg.lr * cfg.student_workers,
        lr_decay_epochs=milestones(cfg.epochs),
        beta=cfg.beta,
        resolution=cfg.resolution,
        kd_temperature=cfg.kd_temperature,
        num_workers=cfg.student_workers,
        use_gpu=cfg.use_gpu,
        loader_workers=cfg.loader_workers,
        cpus_per_worker=cfg.cpus_per_worker,
        storage_path=runs_root,
        shuffle_buffer=cfg.shuffle_buffer,
    )


def study_cache(
    cfg: StudyConfig,
    data: str,
    teacher_weights: str,
    cache_root: str,
    views: int,
    storage: str = "float16",
    stages: dict | None = None,
) -> str:
    """Build (or find) the teacher's cache of ``views`` views in ``storage`` form, with
    the augmentation ``stages`` (CacheBuildConfig fields: ops, erase) when given."""
    return build_cache(
        CacheBuildConfig(
            data=data,
            teacher=cfg.teacher,
            weights=teacher_weights,
            root=cache_root,
            num_views=views,
            resolution=cfg.resolution,
            storage=storage,
            actors=cfg.cache_actors,
            gpus_per_actor=1.0 if cfg.use_gpu else 0.0,
            **(stages or {}),
        )
    )


def run_study(cfg: StudyConfig, command: str = "") -> dict:
    out = Path(cfg.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    data, runs_root, cache_root = str(out / "data"), str(out / "runs"), str(out / "caches")
    started = time.perf_counter()
    seconds: dict[str, float] = {}
    init_ray()

    _say(f"1/7 shard {cfg.archive} (subset {cfg.subset or 'all'})")
    data_info = shard(cfg, data)
    seconds["shard"] = data_info.pop("seconds")

    base = base_config(cfg, data, runs_root)
    _say(
        "2/7 the teacher: "
        + (cfg.teacher_weights or f"train {cfg.teacher} ({cfg.teacher_epochs} epochs, {cfg.teacher_workers} workers)")
    )
    t = time.perf_counter()
    cfg, teacher = prepare_teacher(cfg, base, data)
    teacher_weights = teacher["weights"]
    seconds["teacher"] = time.perf_counter() - t
    print(f"[study] teacher {teacher['arch']}: test top-1 {teacher['test_top1']:.2f}%")

    _say(f"3/7 build caches with S = {cfg.all_view_counts} views")
    t0 = time.perf_counter()
    caches, cache_figures = {}, {}
    # Build times are those of the build that made each cache: a rerun that finds a
    # cache complete reads them back instead of timing a no-op.
    timings_path = out / "cache_build_seconds.json"
    timings = json.loads(timings_path.read_text()) if timings_path.exists() else {}
    for views in cfg.all_view_counts:
        t, wall_start = time.perf_counter(), time.time()
        caches[views] = study_cache(cfg, data, teacher_weights, cache_root, views)
        info = cache_info(caches[views])
        built_now = datetime.fromisoformat(info["created"].replace("Z", "+00:00")).timestamp() >= wall_start - 1
        if built_now:
            timings[info["cache_id"]] = time.perf_counter() - t
            timings_path.write_text(json.dumps(timings, indent=1))
        # build_seconds None: the cache was made by a run that did not time it
        cache_figures[str(views)] = {
            "build_seconds": timings.get(info["cache_id"]),
            "views": views * data_info["train_images"],
            "bytes": info["bytes_on_storage"],
            "bytes_per_view": info["bytes_per_view"],
        }
    seconds["caches"] = time.perf_counter() - t0

    _say("4/7 throughput side by side: each mode alone for one epoch")
    t = time.perf_counter()
    modes = {}
    for mode in cfg.throughput_modes:
        last = train(
            mode_config(
                cfg, replace(base, epochs=1), mode, cfg.epochs, caches, teacher_weights, name=f"throughput/{mode}"
            )
        )["history"][-1]
        modes[mode] = {k: last[k] for k in ("images_per_s", "data_wait_fraction")}
    batch, inputs, classes = load_split(data, "test")
    x = inputs[: cfg.batch_size]
    forward = {
        "teacher": forward_rate(load_model(teacher_weights, len(classes)), x),
        "student": forward_rate(build_model(cfg.student, len(classes)), x),
    }
    throughput = {"modes": modes, "forward_images_per_s": forward, "caches": cache_figures}
    seconds["throughput"] = time.perf_counter() - t

    planned = planned_runs(cfg)
    _say(f"5/7 {len(planned)} student runs, {cfg.concurrent} at a time")
    t = time.perf_counter()
    configs = [
        mode_config(cfg, base, mode, views, caches, teacher_weights, seed=seed, name=run_name(mode, views, seed))
        for mode, views, seed in planned
    ]
    with ThreadPoolExecutor(max_workers=cfg.concurrent) as pool:
        results = list(pool.map(train, configs))
    seconds["students"] = time.perf_counter() - t
    runs = []
    for (mode, views, seed), result in zip(planned, results, strict=True):
        last = result["history"][-1]
        runs.append(
            {
                "name": run_name(mode, views, seed),
                "mode": mode,
                "views": None if mode == "ce" else views,
                "seed": seed,
                "test_top1": last["test_top1"],
                "test_top5": last["test_top5"],
                "train_top1": last["train_top1"],
                "weights": result["exported"]["student_cam.pt"],
                "history": result["history"],
            }
        )

    _say("6/7 CAM agreement with the teacher on every test image")
    t = time.perf_counter()
    cam = agreement(cfg, data, teacher_weights, runs)
    seconds["cam_agreement"] = time.perf_counter() - t

    _say("7/7 CAM picture and learning curves")
    first = {(r["mode"], r["views"]): r for r in reversed(runs)}  # each group's first seed
    checkpoints = {f"teacher {cfg.teacher}": teacher_weights}
    for label, key in (("vanilla", ("ce", None)), ("KD", ("kd", cfg.epochs)), ("CAT-KD", ("catkd", cfg.epochs))):
        checkpoints[f"{label} {cfg.student}"] = first[key]["weights"]
    render_cam_report(data, checkpoints, str(out / "cams.png"), shown=8)
    plot_curves(runs, out / "curves.png")

    seconds["total"] = time.perf_counter() - started
    summary = {
        "command": command,
        "date": time.strftime("%Y-%m-%d"),
        "settings": {
            **asdict(cfg),
            "student_lr_decay_epochs": milestones(cfg.epochs),
            "momentum": base.momentum,
            "weight_decay": base.weight_decay,
            "lr_decay_rate": base.lr_decay_rate,
            "ce_weight": base.ce_weight,
            "kd_weight": base.kd_weight,
            "spec": base.spec,
            "cache_storage": CacheBuildConfig.storage,
            "normalize": base.normalize,
        },
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name(0) if cfg.use_gpu and torch.cuda.is_available() else None,
        },
        "data": data_info,
        "teacher": teacher,
        "runs": runs,
        "groups": groups_of(runs),
        "paired_differences": {
            "catkd_minus_ce": paired(runs, "catkd", "ce", cfg.epochs),
            "catkd_minus_kd": paired(runs, "catkd", "kd", cfg.epochs),
            "kd_minus_ce": paired(runs, "kd", "ce", cfg.epochs),
        },
        "cam_agreement": cam,
        "throughput": throughput,
        "seconds": seconds,
    }
    (out / "results.json").write_text(json.dumps(summary, indent=1) + "\n")
    table = markdown(summary)
    (out / "results.md").write_text(table)
    print("\n" + table)
    _say(f"finished in {seconds['total']:.0f} s; results.json, results.md, cams.png, curves.png in {out}")
    return summary


def parse_args(argv: list[str] | None = None, cls: type[StudyConfig] = StudyConfig, doc: str = __doc__):
    """``cls`` (StudyConfig or a study built on it) from the command line: one flag per field."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    defaults = cls(archive="")
    parser.add_argument("archive", help="ImageFolder-layout archive or folder with train/ and test/ (CIFAR-10 as JPEG)")
    for name, value in asdict(defaults).items():
        if name == "archive":
            continue
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            parser.add_argument(flag, action="store_true")
        elif isinstance(value, list):
            parser.add_argument(flag, type=type(value[0]), nargs="+", default=value)
        else:
            parser.add_argument(flag, type=type(value), default=value)
    return cls(**vars(parser.parse_args(argv)))


if __name__ == "__main__":
    run_study(parse_args(sys.argv[1:]), command=shlex.join(["python", "bench/study.py", *sys.argv[1:]]))
