"""The top-k storage study (docs/RESULTS.md, "Top-k caches"): what keeping only the K
highest classes per view costs CAT-KD and KD in accuracy, on the real-data study's
setting, paired by seed against the full float16 cache.

    shard -> the teacher -> a full cache and topk:K caches (S = epochs views) -> students:
    catkd from each, kd from the full cache and from the --kd-ks caches, every seed ->
    results.json (rewritten as each run ends), topk.png, results.md

    .venv/bin/python bench/topk_study.py ../shared/data/cifar10-jpeg.tar.gz --out outputs/topk \
        --teacher-weights ../shared/data/teachers/cifar10_resnet20.pt
    .venv/bin/python bench/topk_study.py --report outputs/topk/results.json --doc docs/RESULTS.md

Every setting not named here is bench/study.py's (the same data subset, teacher,
student, schedule, beta, r and views, so a run here is comparable to one there).
Rerunning with the same --out resumes: finished shards, caches and runs are reused.
"""

from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless
import matplotlib.pyplot as plt

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/study.py, run as a script
import study  # noqa: E402
import study_report  # noqa: E402
from cache_read import imagenet_sizes  # noqa: E402
from study_report import _std, regenerate  # noqa: E402

from pipeline.cache.verify import cache_info  # noqa: E402
from pipeline.train.run import train  # noqa: E402

FULL = "float16"


@dataclass
class TopkStudyConfig(study.StudyConfig):
    seeds: list[int] = field(default_factory=lambda: [0, 1])  # every student runs every seed
    ks: list[int] = field(default_factory=lambda: [1, 2, 5])  # catkd from topk:K for each K
    kd_ks: list[int] = field(default_factory=lambda: [2])  # kd from topk:K for each K (and from the full cache)
    imagenet_views: int = 8  # S of the ImageNet size arithmetic


def storage_label(storage: str) -> str:
    return "full (float16)" if storage == FULL else storage


def planned(cfg: TopkStudyConfig) -> list[tuple[str, str, int]]:
    """(mode, storage, seed), seed-major so that the first seed's comparison is complete first."""
    runs = []
    for seed in cfg.seeds:
        runs += [("catkd", FULL, seed)] + [("catkd", f"topk:{k}", seed) for k in cfg.ks]
        runs += [("kd", FULL, seed)] + [("kd", f"topk:{k}", seed) for k in cfg.kd_ks]
    return runs


def run_name(mode: str, storage: str, seed: int) -> str:
    return f"{mode}-{storage.replace(':', '')}-seed{seed}"


def groups(runs: list[dict]) -> list[dict]:
    return study.seed_groups(runs, "storage", _order)


def _order(mode: str, storage: str) -> tuple:
    return (mode != "catkd", storage != FULL, int(storage.split(":")[1]) if ":" in storage else 0)


def paired(runs: list[dict]) -> list[dict]:
    """Per seed, each top-k run minus the same mode's full-cache run (same initial
    weights, data order and views: only the stored targets differ)."""
    return study.paired_against(runs, "storage", FULL, _order)


def plot(summary: dict, path: Path) -> None:
    """Final top-1 against the classes kept per view (every seed and the mean), and each
    run's test top-1 per epoch."""
    classes = len(summary["data"]["classes"])
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    colours = {"catkd": "tab:red", "kd": "tab:blue"}
    for mode in ("catkd", "kd"):
        rows = [g for g in summary["groups"] if g["mode"] == mode]
        kept = [classes if g["storage"] == FULL else int(g["storage"].split(":")[1]) for g in rows]
        order = sorted(range(len(rows)), key=lambda i: kept[i])
        left.plot(
            [kept[i] for i in order], [rows[i]["top1_mean"] for i in order], "-o", color=colours[mode], label=mode
        )
        for i in order:
            left.scatter([kept[i]] * len(rows[i]["top1"]), rows[i]["top1"], color=colours[mode], alpha=0.35, s=14)
    left.set_xscale("log")
    left.set_xticks(sorted({1, 2, 5, classes} | set(summary["settings"]["ks"])))
    left.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    left.set_xlabel(f"classes kept per view (K; {classes} = the full cache)")
    left.set_ylabel("final test top-1 (%)")
    left.set_title("accuracy against K (dots: seeds)")
    left.grid(alpha=0.3)
    left.legend()
    styles = {FULL: "-", **{f"topk:{k}": s for k, s in zip(summary["settings"]["ks"], ["--", ":", "-."], strict=False)}}
    for run in summary["runs"]:
        right.plot(
            [m["epoch"] for m in run["history"]],
            [m["test_top1"] for m in run["history"]],
            styles.get(run["storage"], "-."),
            color=colours[run["mode"]],
            lw=1,
            alpha=0.8,
            label=f"{run['mode']} {storage_label(run['storage'])}"
            if run["seed"] == summary["settings"]["seeds"][0]
            else None,
        )
    right.set_xlabel("epoch")
    right.set_title("test top-1 (%) per epoch")
    right.grid(alpha=0.3)
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_topk_study(cfg: TopkStudyConfig, command: str = "") -> dict:
    setup = study.set_up(cfg)
    cfg, out, data, teacher = setup.cfg, setup.out, setup.data, setup.teacher
    storages = [FULL] + [f"topk:{k}" for k in sorted(set(cfg.ks) | set(cfg.kd_ks))]
    study._say(f"3/4 caches with S = {cfg.epochs} views: {', '.join(storages)}")
    caches, cache_figures = {}, {}
    for storage in storages:
        caches[storage] = study.study_cache(cfg, data, teacher["weights"], setup.cache_root, cfg.epochs, storage)
        info = cache_info(caches[storage])
        cache_figures[storage] = {k: info[k] for k in ("bytes_on_storage", "bytes_per_view", "raw_bytes_per_view")}

    plan = planned(cfg)
    study._say(f"4/4 {len(plan)} student runs, {cfg.concurrent} at a time")
    summary = setup.summary(command, caches=cache_figures, imagenet_sizes=imagenet_sizes(cfg.imagenet_views))

    def student(mode: str, storage: str, seed: int) -> dict:
        config = replace(setup.base, mode=mode, cache=caches[storage], seed=seed, name=run_name(mode, storage, seed))
        history = train(config)["history"]
        return study.run_row(
            config.name, mode, "storage", storage, seed, history, train_cat_epoch1=history[0].get("train_cat")
        )

    study.run_plan(plan, student, summary, out, cfg.concurrent, "storage", FULL, _order, "topk", setup.started)
    study.finish(summary, out, TABLES, "topk.png", plot)
    return summary


# --- tables for docs/RESULTS.md (<!-- topk:NAME --> blocks) ------------------------------


def accuracy_table(summary: dict) -> str:
    lines = [
        "| student | cache | stored bytes per view | seeds | top-1 mean (%) | std | per seed |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for g in summary["groups"]:
        per_seed = ", ".join(f"{v:.2f}" for v in g["top1"])
        stored = summary["caches"][g["storage"]]["bytes_per_view"]
        lines.append(
            f"| `{g['mode']}` | {storage_label(g['storage'])} | {stored:,.0f} | {len(g['top1'])} | "
            f"**{g['top1_mean']:.2f}** | {_std(g['top1_std'])} | {per_seed} |"
        )
    lines += ["", study_report.teacher_line(summary)]
    return "\n".join(lines)


def paired_table(summary: dict) -> str:
    return study_report.paired_table(summary, lambda row: f"`{row['mode']}` {row['storage']} - `{row['mode']}` full")


def sizes_table(summary: dict) -> str:
    views = summary["settings"]["imagenet_views"]
    lines = [
        f"| dataset | r | storage | bytes per view | whole cache at S = {views} |",
        "|---|---:|---|---:|---:|",
    ]
    for row in summary["imagenet_sizes"]:
        lines.append(
            f"| {row['dataset']} ({row['classes']:,} classes, {row['images']:,} images) | {row['r']} | "
            f"`{row['storage']}` | {row['bytes_per_view']:,} | {row['cache_bytes'] / 1e9:,.1f} GB |"
        )
    return "\n".join(lines)


TABLES = {"accuracy": accuracy_table, "paired": paired_table, "sizes": sizes_table}


def main(argv: list[str]) -> int:
    if "--report" in argv:  # tables only, from a finished run's JSON
        i = argv.index("--report")
        return regenerate(argv[:i] + argv[i + 1 :], TABLES, "topk", __doc__.splitlines()[0])
    cfg = study.parse_args(argv, TopkStudyConfig, __doc__)
    run_topk_study(cfg, command=shlex.join(["python", "bench/topk_study.py", *argv]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
