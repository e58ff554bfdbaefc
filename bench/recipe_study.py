"""The recipe study (docs/RESULTS.md, "Strong augmentation from the cache"): what
recorded augmentation stages do for ce, kd and catkd students on the real-data study's
setting, paired by seed against the plain crop-and-flip spec.

    shard -> the teacher -> one cache per recipe (S = epochs views, the recipe's stages
    recorded in each view) -> students: every mode of every recipe, every seed ->
    results.json (rewritten as each run ends), recipes.png, results.md

    .venv/bin/python bench/recipe_study.py ../shared/data/cifar10-jpeg.tar.gz --out outputs/recipes \\
        --teacher-weights ../shared/data/teachers/cifar10_resnet20.pt
    .venv/bin/python bench/recipe_study.py --report outputs/recipes/results.json --doc docs/RESULTS.md

A recipe is ``plain`` (the spec's crop and flip), ``trivialaugment``,
``randaugment:N:M``, ``cutmix:ALPHA`` or ``mixup:ALPHA``, joined with ``+`` and
optionally ``erase:P`` (``trivialaugment+erase:0.25``). The ce runs use no cache and
draw the recipe's stages anew every epoch; kd and catkd read the recipe's cache, whose
S = epochs views also give a new view every epoch. A recipe that mixes runs the
--mix-modes students only (catkd by default). Every other setting is bench/study.py's.
Rerunning with the same --out resumes: finished shards, caches and runs are reused (a
finished run is read back, not started), and recipes or seeds added to the command run.
"""

from __future__ import annotations

import shlex
import statistics
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

from pipeline.data.stages import MIX_KINDS, parse_stages  # noqa: E402
from pipeline.train.run import train  # noqa: E402
from pipeline.train.sweep import finished_history  # noqa: E402

PLAIN = "plain"
MODES = ("ce", "kd", "catkd")


@dataclass
class RecipeStudyConfig(study.StudyConfig):
    seeds: list[int] = field(default_factory=lambda: [0, 1])  # every run of every recipe
    recipes: list[str] = field(default_factory=lambda: [PLAIN, "trivialaugment"])  # plain is the base
    modes: list[str] = field(default_factory=lambda: list(MODES))  # the students of every recipe
    mix_modes: list[str] = field(default_factory=lambda: ["catkd"])  # the students of a recipe that mixes


def recipe_stages(recipe: str) -> dict:
    """``trivialaugment+erase:0.25`` -> {"ops": "trivialaugment", "erase": 0.25}; checked."""
    stages = {"ops": "none", "erase": 0.0, "mix": "none"}
    for part in recipe.split("+"):
        if part == PLAIN:
            continue
        if part.startswith("erase:"):
            stages["erase"] = float(part.split(":", 1)[1])
        elif part.startswith(MIX_KINDS):
            stages["mix"] = part
        else:
            stages["ops"] = part
    parse_stages(stages["ops"], stages["erase"], stages["mix"])
    return stages


def planned(cfg: RecipeStudyConfig) -> list[tuple[str, str, int]]:
    """(mode, recipe, seed), seed-major so that the first seed's comparison is complete first."""
    return [
        (mode, recipe, seed)
        for seed in cfg.seeds
        for recipe in cfg.recipes
        for mode in (cfg.mix_modes if recipe_stages(recipe)["mix"] != "none" else cfg.modes)
    ]


def run_name(mode: str, recipe: str, seed: int) -> str:
    return f"{mode}-{recipe.replace(':', '').replace('+', '-')}-seed{seed}"


def _order(mode: str, recipe: str) -> tuple:
    return (MODES.index(mode) if mode in MODES else len(MODES), recipe != PLAIN, recipe)


def groups(runs: list[dict]) -> list[dict]:
    return study.seed_groups(runs, "recipe", _order)


def paired(runs: list[dict]) -> list[dict]:
    """Per seed, each recipe's run minus the same mode's plain run (same initial weights
    and data order: only the views' stages differ)."""
    return study.paired_against(runs, "recipe", PLAIN, _order)


def plot(summary: dict, path: Path) -> None:
    """Test top-1 per epoch of every run: a panel per mode, a colour per recipe."""
    modes = [m for m in MODES if any(r["mode"] == m for r in summary["runs"])]
    fig, axes = plt.subplots(1, len(modes), figsize=(5 * len(modes), 4.2), squeeze=False, sharey=True)
    recipes = summary["settings"]["recipes"]
    colours = {recipe: f"C{k}" for k, recipe in enumerate(recipes)}
    for ax, mode in zip(axes[0], modes, strict=True):
        for run in (r for r in summary["runs"] if r["mode"] == mode):
            ax.plot(
                [m["epoch"] for m in run["history"]],
                [m["test_top1"] for m in run["history"]],
                color=colours.get(run["recipe"], "k"),
                lw=1,
                alpha=0.85,
                label=run["recipe"] if run["seed"] == summary["settings"]["seeds"][0] else None,
            )
        ax.set_title(f"{mode}: test top-1 (%) per epoch")
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_recipe_study(cfg: RecipeStudyConfig, command: str = "") -> dict:
    stages = {recipe: recipe_stages(recipe) for recipe in cfg.recipes}  # a bad recipe stops here
    if PLAIN not in cfg.recipes:
        raise SystemExit("--recipes: include plain, the base every recipe is compared with")
    setup = study.set_up(cfg)
    cfg, out, base = setup.cfg, setup.out, setup.base
    plan = planned(cfg)
    # a cache only for recipes with a kd or catkd run still to do: finished runs are read back
    needed = [
        recipe
        for recipe in cfg.recipes
        if any(
            r == recipe and m != "ce" and not finished_history(replace(base, name=run_name(m, r, seed)))
            for m, r, seed in plan
        )
    ]
    caches = {}
    study._say(f"3/4 caches with S = {cfg.epochs} views: {', '.join(needed) or 'none needed'}")
    for recipe in needed:
        caches[recipe] = study.study_cache(
            cfg, setup.data, setup.teacher["weights"], setup.cache_root, cfg.epochs, stages=stages[recipe]
        )
    study._say(f"4/4 {len(plan)} student runs, {cfg.concurrent} at a time")
    summary = setup.summary(command, stages=stages)

    def student(mode: str, recipe: str, seed: int) -> dict:
        name = run_name(mode, recipe, seed)
        history = finished_history(replace(base, name=name))  # a finished run is read back, not started
        if not history:
            cache = caches.get(recipe) if mode != "ce" else None
            history = train(replace(base, mode=mode, cache=cache, seed=seed, name=name, **stages[recipe]))["history"]
        return study.run_row(name, mode, "recipe", recipe, seed, history, train_top1=history[-1]["train_top1"])

    study.run_plan(plan, student, summary, out, cfg.concurrent, "recipe", PLAIN, _order, "recipes", setup.started)
    study.finish(summary, out, TABLES, "recipes.png", plot)
    return summary


# --- tables for docs/RESULTS.md (<!-- recipe:NAME --> blocks) -----------------------------


def accuracy_table(summary: dict) -> str:
    lines = [
        "| student | recipe | seeds | top-1 mean (%) | std | per seed | train top-1, last epoch (%) |",
        "|---|---|---:|---:|---:|---|---:|",
    ]
    train_top1 = {}
    for run in summary["runs"]:
        train_top1.setdefault((run["mode"], run["recipe"]), []).append(run["train_top1"])
    for g in summary["groups"]:
        per_seed = ", ".join(f"{v:.2f}" for v in g["top1"])
        fit = statistics.mean(train_top1[(g["mode"], g["recipe"])])
        lines.append(
            f"| `{g['mode']}` | {g['recipe']} | {len(g['top1'])} | **{g['top1_mean']:.2f}** | "
            f"{_std(g['top1_std'])} | {per_seed} | {fit:.2f} |"
        )
    lines += ["", study_report.teacher_line(summary)]
    return "\n".join(lines)


def paired_table(summary: dict) -> str:
    return study_report.paired_table(summary, lambda row: f"`{row['mode']}` {row['recipe']} - `{row['mode']}` plain")


TABLES = {"accuracy": accuracy_table, "paired": paired_table}


def main(argv: list[str]) -> int:
    if "--report" in argv:  # tables only, from a finished run's JSON
        i = argv.index("--report")
        return regenerate(argv[:i] + argv[i + 1 :], TABLES, "recipe", __doc__.splitlines()[0])
    cfg = study.parse_args(argv, RecipeStudyConfig, __doc__)
    run_recipe_study(cfg, command=shlex.join(["python", "bench/recipe_study.py", *argv]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
