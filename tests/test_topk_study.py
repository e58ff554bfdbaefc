"""bench/topk_study.py's bookkeeping: the plan, groups and paired differences by seed, and
the tables docs/RESULTS.md is generated from (the study itself is a long real run)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import topk_study  # noqa: E402


def _run(mode, storage, seed, top1):
    return {"mode": mode, "storage": storage, "seed": seed, "test_top1": top1, "history": []}


def test_plan_pairs_every_topk_run_with_a_full_one_of_its_seed():
    cfg = topk_study.study.parse_args(["a.tar.gz", "--seeds", "0", "1", "--ks", "1", "5"], topk_study.TopkStudyConfig)
    plan = topk_study.planned(cfg)
    assert plan[:5] == [
        ("catkd", "float16", 0),
        ("catkd", "topk:1", 0),
        ("catkd", "topk:5", 0),
        ("kd", "float16", 0),
        ("kd", "topk:2", 0),
    ]
    assert len(plan) == 10 and len({topk_study.run_name(*run) for run in plan}) == 10


def test_groups_paired_differences_and_tables():
    runs = [
        _run("catkd", "float16", 0, 76.0),
        _run("catkd", "float16", 1, 77.0),
        _run("catkd", "topk:2", 0, 75.0),
        _run("catkd", "topk:2", 1, 77.5),
        _run("catkd", "topk:10", 0, 76.5),  # sorted by K, not as text
        _run("kd", "float16", 0, 73.0),
        _run("kd", "topk:2", 0, 72.0),
    ]
    groups = topk_study.groups(runs)
    assert [(g["mode"], g["storage"]) for g in groups] == [
        ("catkd", "float16"),
        ("catkd", "topk:2"),
        ("catkd", "topk:10"),
        ("kd", "float16"),
        ("kd", "topk:2"),
    ]
    assert groups[1]["top1_mean"] == pytest.approx(76.25) and groups[2]["top1_std"] is None
    paired = {(p["mode"], p["storage"]): p for p in topk_study.paired(runs)}
    assert paired[("catkd", "topk:2")]["per_seed"] == {"0": -1.0, "1": 0.5}
    assert paired[("catkd", "topk:2")]["positive"] == 1 and paired[("kd", "topk:2")]["mean"] == pytest.approx(-1.0)
    summary = {
        "groups": groups,
        "paired_differences": topk_study.paired(runs),
        "caches": {s: {"bytes_per_view": 10.0} for s in ("float16", "topk:2", "topk:10")},
        "teacher": {"arch": "resnet20", "test_top1": 81.6},
        "settings": {"imagenet_views": 8},
        "imagenet_sizes": topk_study.imagenet_sizes(8),
    }
    accuracy = topk_study.accuracy_table(summary)
    assert "| `catkd` | topk:2 | 10 | 2 | **76.25** | 1.77 | 75.00, 77.50 |" in accuracy
    assert "| `catkd` topk:2 - `catkd` full | -1.00 (seed 0), +0.50 (seed 1) | **-0.25** |" in (
        topk_study.paired_table(summary)
    )
    sizes = topk_study.sizes_table(summary)
    assert "| 4 | `topk:50` | 1,822 | 18.7 GB |" in sizes and "ImageNet-21k (21,841 classes" in sizes


def test_docs_results_topk_tables_are_generated_from_the_committed_json():
    """docs/RESULTS.md's top-k tables are exactly what docs/results/cifar10_topk.json gives,
    and its groups and paired differences are those of its own runs."""
    import json

    from study_report import update_document

    summary = json.loads((ROOT / "docs" / "results" / "cifar10_topk.json").read_text())
    assert summary["complete"] and len({r["seed"] for r in summary["runs"]}) == 2
    assert topk_study.groups(summary["runs"]) == summary["groups"]
    assert topk_study.paired(summary["runs"]) == summary["paired_differences"]
    doc = (ROOT / "docs" / "RESULTS.md").read_text()
    assert "<!-- topk:accuracy -->" in doc and "<!-- topk:sizes -->" in doc
    assert update_document(doc, summary, topk_study.TABLES, "topk") == doc
