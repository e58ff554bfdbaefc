"""The methods study (issue 41; docs/RESULTS.md, "Methods from one cache"): every
distillation method catkd serves from one teacher cache, on the real-data study's
setting, paired by seed against KD.

    shard -> the teacher -> one float16 cache at r = max(--resolutions) (S = epochs views)
    -> students: ce, kd, kd with standardised logits, dkd, dist, and catkd at each of
    --resolutions (the cache serves each divisor of its r exactly), every seed ->
    results.json (rewritten as each run ends), methods.png, results.md

    .venv/bin/python bench/methods_study.py ../shared/data/cifar10-jpeg.tar.gz --out outputs/methods \
        --teacher-weights ../shared/data/teachers/cifar10_resnet20.pt
    .venv/bin/python bench/methods_study.py --report outputs/methods/results.json --doc docs/RESULTS.md

Every setting not named here is bench/study.py's (the same data subset, teacher,
student, schedule, beta, KD temperature and views, so a run here is comparable to one
there). DKD's loss weight warms up over the first twelfth of the epochs (the paper: 20
of 240). Rerunning with the same --out resumes: finished shards, caches and runs are
reused. About two hours on a 2-core CPU machine with the defaults (24 runs).
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
from study_report import _std, regenerate  # noqa: E402

from pipeline.train.run import train  # noqa: E402

BASE = "kd"  # what every other method is paired against, seed by seed
LOGIT_METHODS = {"ce": "ce", "kd": "kd", "kd+LS": "kd", "dkd": "dkd", "dist": "dist"}


@dataclass
class MethodsStudyConfig(study.StudyConfig):
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])  # every method runs every seed
    methods: list[str] = field(default_factory=lambda: list(LOGIT_METHODS))  # the methods besides catkd
    resolutions: list[int] = field(default_factory=lambda: [4, 2, 1])  # catkd's r, all from the r = max cache

    def __post_init__(self) -> None:
        super().__post_init__()
        unknown = sorted(set(self.methods) - set(LOGIT_METHODS))
        if unknown or BASE not in self.methods:
            choices = ", ".join(LOGIT_METHODS)
            raise SystemExit(f"--methods: {' '.join(self.methods)}: choose from {choices}, with {BASE}")
        top = max(self.resolutions)
        if any(r < 1 or top % r for r in self.resolutions):
            raise SystemExit(f"--resolutions: {self.resolutions}: each must divide the largest, {top} (the cache's r)")


def method_label(mode: str, resolution: int | None = None) -> str:
    return f"catkd r={resolution}" if mode == "catkd" else mode


def planned(cfg: MethodsStudyConfig) -> list[tuple[str, str, int]]:
    """(mode, method, seed), seed-major so that the first seed's comparison is complete first."""
    runs = []
    for seed in cfg.seeds:
        runs += [(LOGIT_METHODS[m], m, seed) for m in cfg.methods]
        runs += [("catkd", method_label("catkd", r), seed) for r in sorted(cfg.resolutions, reverse=True)]
    return runs


def run_name(method: str, seed: int) -> str:
    return f"{method.replace('+', '-').replace(' ', '-').replace('=', '')}-seed{seed}"


def student_changes(cfg: MethodsStudyConfig, method: str) -> dict:
    """What a method's run changes in the study's base config, besides mode, cache and seed."""
    if method.startswith("catkd r="):
        return {"resolution": int(method.split("=")[1])}
    if method == "kd+LS":
        return {"logit_std": True}
    if method == "dkd":
        return {"dkd_warmup": max(1, round(cfg.epochs * 20 / 240))}
    return {}


def _order(mode: str, method: str) -> tuple:
    labels = list(LOGIT_METHODS)
    if method in labels:
        return (0, labels.index(method), 0)
    return (1, 0, -int(method.split("=")[1]))  # catkd, largest r first


def groups(runs: list[dict]) -> list[dict]:
    return study.seed_groups(runs, "method", _order)


def paired(runs: list[dict]) -> list[dict]:
    """Per seed, each method's final top-1 minus KD's of that seed (same initial weights,
    data order and views: only the loss differs)."""
    return study.paired_against(runs, "method", BASE, _order, within_mode=False)


def plot(summary: dict, path: Path) -> None:
    """Final top-1 per method (every seed and the mean), and each run's test top-1 per epoch."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8))
    rows = summary["groups"]
    colours = plt.get_cmap("tab10")
    for i, g in enumerate(rows):
        left.bar(i, g["top1_mean"], color=colours(i), alpha=0.6)
        left.scatter([i] * len(g["top1"]), g["top1"], color="black", s=12, zorder=3)
    left.set_xticks(range(len(rows)), [g["method"] for g in rows], rotation=30, ha="right")
    low = min(min(g["top1"]) for g in rows)
    left.set_ylim(max(0, low - 5), None)
    left.set_ylabel("final test top-1 (%)")
    left.set_title(f"one cache, every method (bars: mean of {len(summary['settings']['seeds'])} seeds; dots: seeds)")
    left.grid(axis="y", alpha=0.3)
    index = {g["method"]: i for i, g in enumerate(rows)}
    first_seed = summary["settings"]["seeds"][0]
    for run in summary["runs"]:
        right.plot(
            [m["epoch"] for m in run["history"]],
            [m["test_top1"] for m in run["history"]],
            color=colours(index[run["method"]]),
            lw=1,
            alpha=0.8,
            label=run["method"] if run["seed"] == first_seed else None,
        )
    right.set_xlabel("epoch")
    right.set_title("test top-1 (%) per epoch")
    right.grid(alpha=0.3)
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_methods_study(cfg: MethodsStudyConfig, command: str = "") -> dict:
    cfg = replace(cfg, resolution=max(cfg.resolutions))  # the cache's r; catkd runs ask for theirs
    setup = study.set_up(cfg)
    cfg, out, data, teacher = setup.cfg, setup.out, setup.data, setup.teacher
    study._say(f"3/4 one float16 cache with S = {cfg.epochs} views at r = {cfg.resolution}")
    cache = study.study_cache(cfg, data, teacher["weights"], setup.cache_root, cfg.epochs)

    plan = planned(cfg)
    study._say(f"4/4 {len(plan)} student runs, {cfg.concurrent} at a time")
    summary = setup.summary(command, cache=cache)

    def student(mode: str, method: str, seed: int) -> dict:
        config = study.mode_config(
            cfg,
            setup.base,
            mode,
            cfg.epochs,
            {cfg.epochs: cache},
            teacher["weights"],
            seed=seed,
            name=run_name(method, seed),
            **student_changes(cfg, method),
        )
        history = train(config)["history"]
        return study.run_row(config.name, mode, "method", method, seed, history)

    # paired across methods (each against kd), not within a mode as the other studies pair
    study.run_plan(
        plan, student, summary, out, cfg.concurrent, "method", BASE, _order, "methods", setup.started, within_mode=False
    )
    study.finish(summary, out, TABLES, "methods.png", plot)
    return summary


# --- tables for docs/RESULTS.md (<!-- methods:NAME --> blocks) ---------------------------


def accuracy_table(summary: dict) -> str:
    lines = ["| student | seeds | top-1 mean (%) | std | per seed |", "|---|---:|---:|---:|---|"]
    for g in summary["groups"]:
        per_seed = ", ".join(f"{v:.2f}" for v in g["top1"])
        lines.append(
            f"| `{g['method']}` | {len(g['top1'])} | **{g['top1_mean']:.2f}** | {_std(g['top1_std'])} | {per_seed} |"
        )
    lines += ["", study_report.teacher_line(summary)]
    return "\n".join(lines)


def paired_table(summary: dict) -> str:
    return study_report.paired_table(summary, lambda row: f"`{row['method']}` - `{BASE}`")


TABLES = {"accuracy": accuracy_table, "paired": paired_table}


def main(argv: list[str]) -> int:
    if "--report" in argv:  # tables only, from a finished run's JSON
        i = argv.index("--report")
        return regenerate(argv[:i] + argv[i + 1 :], TABLES, "methods", __doc__.splitlines()[0])
    cfg = study.parse_args(argv, MethodsStudyConfig, __doc__)
    run_methods_study(cfg, command=shlex.join(["python", "bench/methods_study.py", *argv]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
