"""bench/methods_study.py's bookkeeping: the plan, each method's config, groups and the
differences against KD by seed, and the tables (the study itself is a long real run)."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import methods_study  # noqa: E402


def _cfg(*flags):
    return methods_study.study.parse_args(["a.tar.gz", *flags], methods_study.MethodsStudyConfig)


def _run(mode, method, seed, top1):
    return {"mode": mode, "method": method, "seed": seed, "test_top1": top1, "history": []}


def test_plan_runs_every_method_and_resolution_every_seed_from_one_cache():
    cfg = _cfg("--seeds", "0", "1", "--epochs", "24")
    plan = methods_study.planned(cfg)
    assert plan[:8] == [
        ("ce", "ce", 0),
        ("kd", "kd", 0),
        ("kd", "kd+LS", 0),
        ("dkd", "dkd", 0),
        ("dist", "dist", 0),
        ("catkd", "catkd r=4", 0),
        ("catkd", "catkd r=2", 0),
        ("catkd", "catkd r=1", 0),
    ]
    assert len(plan) == 16 and len({methods_study.run_name(m, s) for _, m, s in plan}) == 16
    # each method's own settings, on the study's base config (the cache's r is the largest)
    base = methods_study.study.base_config(replace(cfg, resolution=4), "data", "runs")
    cache = {24: "caches/c"}
    configs = {
        method: methods_study.study.mode_config(
            cfg, base, mode, 24, cache, "w.pt", **methods_study.student_changes(cfg, method)
        )
        for mode, method, _ in plan
    }
    assert configs["ce"].cache is None and configs["kd"].cache == "caches/c" and configs["dist"].mode == "dist"
    assert configs["kd+LS"].logit_std and not configs["kd"].logit_std
    assert configs["dkd"].dkd_warmup == 2  # the paper's 20 of 240 epochs, as a fraction
    assert [configs[f"catkd r={r}"].resolution for r in (4, 2, 1)] == [4, 2, 1]


@pytest.mark.parametrize(
    "flags, field",
    [
        (["--methods", "ce", "dist"], "--methods"),  # no kd to pair against
        (["--methods", "kd", "cat"], "--methods"),  # not a method read from logits
        (["--resolutions", "4", "3"], "--resolutions"),  # 3 does not divide the cache's 4
    ],
)
def test_bad_settings_name_the_flag(flags, field):
    with pytest.raises(SystemExit, match=field):
        _cfg(*flags)


def test_groups_differences_against_kd_and_tables():
    runs = [
        _run("kd", "kd", 0, 70.0),
        _run("kd", "kd", 1, 71.0),
        _run("ce", "ce", 0, 64.0),
        _run("dkd", "dkd", 0, 69.0),
        _run("catkd", "catkd r=1", 0, 73.0),
        _run("catkd", "catkd r=4", 0, 74.5),
        _run("catkd", "catkd r=4", 1, 75.0),
        _run("dist", "dist", 2, 80.0),  # no kd run of seed 2: not paired
    ]
    groups = methods_study.groups(runs)
    assert [g["method"] for g in groups] == ["ce", "kd", "dkd", "dist", "catkd r=4", "catkd r=1"]
    assert groups[1]["top1_mean"] == pytest.approx(70.5)
    paired = {p["method"]: p for p in methods_study.paired(runs)}
    assert set(paired) == {"ce", "dkd", "catkd r=4", "catkd r=1"}
    assert paired["catkd r=4"]["per_seed"] == {"0": 4.5, "1": 4.0} and paired["catkd r=4"]["positive"] == 2
    assert paired["ce"]["mean"] == pytest.approx(-6.0) and paired["ce"]["std"] is None
    summary = {
        "groups": groups,
        "paired_differences": methods_study.paired(runs),
        "teacher": {"arch": "resnet20", "test_top1": 88.4},
    }
    assert "| `catkd r=4` | 2 | **74.75** | 0.35 | 74.50, 75.00 |" in methods_study.accuracy_table(summary)
    assert "| `catkd r=4` - `kd` | +4.50 (seed 0), +4.00 (seed 1) | **+4.25** |" in methods_study.paired_table(summary)


def test_docs_results_methods_tables_are_generated_from_the_committed_json():
    """docs/RESULTS.md's methods tables are exactly what the committed JSON gives, and its
    groups and paired differences are those of its own runs."""
    import json

    from study_report import update_document

    summary = json.loads((ROOT / "docs" / "results" / "cifar10_methods.json").read_text())
    assert summary["complete"] and {r["seed"] for r in summary["runs"]} == {0, 1}
    assert all(len(r["history"]) == summary["settings"]["epochs"] for r in summary["runs"])
    assert {r["method"] for r in summary["runs"]} == {g["method"] for g in summary["groups"]}
    assert methods_study.groups(summary["runs"]) == summary["groups"]
    assert methods_study.paired(summary["runs"]) == summary["paired_differences"]
    doc = (ROOT / "docs" / "RESULTS.md").read_text()
    assert "<!-- methods:accuracy -->" in doc and "<!-- methods:paired -->" in doc
    assert update_document(doc, summary, methods_study.TABLES, "methods") == doc
