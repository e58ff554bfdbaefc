"""bench/recipe_study.py's bookkeeping: recipes, the plan, paired differences by seed and
the tables docs/RESULTS.md is generated from (the study itself is a long real run)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from catkd.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import recipe_study  # noqa: E402


def _run(mode, recipe, seed, top1):
    return {"mode": mode, "recipe": recipe, "seed": seed, "test_top1": top1, "train_top1": 90.0, "history": []}


def test_recipes_parse_into_checked_stages():
    assert recipe_study.recipe_stages("plain") == {"ops": "none", "erase": 0.0, "mix": "none"}
    assert recipe_study.recipe_stages("randaugment:2:9+erase:0.25+cutmix:1.0") == {
        "ops": "randaugment:2:9",
        "erase": 0.25,
        "mix": "cutmix:1.0",
    }
    with pytest.raises(ConfigError, match="ops: expected none, trivialaugment"):
        recipe_study.recipe_stages("autoaugment")


def test_plan_pairs_every_recipe_run_with_a_plain_one_of_its_seed():
    argv = ["a.tar.gz", "--seeds", "0", "1", "--recipes", "plain", "trivialaugment", "cutmix:1.0"]
    plan = recipe_study.planned(recipe_study.study.parse_args(argv, recipe_study.RecipeStudyConfig))
    assert plan[:4] == [("ce", "plain", 0), ("kd", "plain", 0), ("catkd", "plain", 0), ("ce", "trivialaugment", 0)]
    assert plan[6] == ("catkd", "cutmix:1.0", 0)  # a mixing recipe: catkd only (--mix-modes)
    assert len(plan) == 14 and len({recipe_study.run_name(*run) for run in plan}) == 14


def test_groups_paired_differences_and_tables():
    runs = [
        _run("catkd", "plain", 0, 76.0),
        _run("catkd", "plain", 1, 77.0),
        _run("catkd", "trivialaugment", 0, 77.5),
        _run("catkd", "trivialaugment", 1, 76.5),
        _run("ce", "plain", 0, 70.0),
        _run("ce", "trivialaugment", 1, 71.0),  # no plain partner of its seed: not paired
    ]
    groups = recipe_study.groups(runs)
    assert [(g["mode"], g["recipe"]) for g in groups] == [
        ("ce", "plain"),
        ("ce", "trivialaugment"),
        ("catkd", "plain"),
        ("catkd", "trivialaugment"),
    ]
    (row,) = recipe_study.paired(runs)
    assert row["per_seed"] == {"0": 1.5, "1": -0.5} and row["mean"] == 0.5 and row["positive"] == 1
    summary = {"runs": runs, "groups": groups, "paired_differences": [row], "teacher": {"arch": "t", "test_top1": 81.0}}
    assert "| `catkd` | trivialaugment | 2 | **77.00** |" in recipe_study.accuracy_table(summary)
    assert "| `catkd` trivialaugment - `catkd` plain | +1.50 (seed 0), -0.50 (seed 1) | **+0.50** |" in (
        recipe_study.paired_table(summary)
    )


@pytest.mark.parametrize(
    "results, prefix, epochs",
    [("cifar10_recipes.json", "recipe", 20), ("cifar10_recipes_40ep.json", "recipe40", 40)],
)
def test_docs_results_recipe_tables_are_generated_from_the_committed_json(results, prefix, epochs):
    """docs/RESULTS.md's recipe tables (20 epochs, and the longer schedule at 40) are
    exactly what their committed JSON gives, and its groups and paired differences are
    those of its own runs."""
    import json

    from study_report import update_document

    summary = json.loads((ROOT / "docs" / "results" / results).read_text())
    assert summary["complete"] and len({r["seed"] for r in summary["runs"]}) == 2
    assert summary["settings"]["epochs"] == epochs
    assert all(len(r["history"]) == epochs for r in summary["runs"])
    assert {r["recipe"] for r in summary["runs"]} == {"plain", "trivialaugment", "cutmix:1.0"}
    assert recipe_study.groups(summary["runs"]) == summary["groups"]
    assert recipe_study.paired(summary["runs"]) == summary["paired_differences"]
    doc = (ROOT / "docs" / "RESULTS.md").read_text()
    assert f"<!-- {prefix}:accuracy -->" in doc and f"<!-- {prefix}:paired -->" in doc
    assert update_document(doc, summary, recipe_study.TABLES, prefix) == doc
