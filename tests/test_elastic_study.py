"""bench/elastic_study.py's bookkeeping: each run's config, the groups and the table (the
drill itself runs in tests/test_faults.py; the comparison is a long real run)."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import elastic_study  # noqa: E402

from pipeline.train.config import TrainConfig  # noqa: E402


def _cfg(*flags):
    return elastic_study.study.parse_args(["a.tar.gz", *flags], elastic_study.ElasticStudyConfig)


def test_fixed_and_elastic_runs_share_the_recipe_and_differ_in_their_range():
    cfg = _cfg("--epochs", "6")
    base = TrainConfig(data="/d", mode="ce", batch_size=cfg.batch_size, epochs=6, lr_decay_epochs=[4])
    fixed, elastic = (elastic_study.run_config(cfg, base, "/c", kind, 1) for kind in ("fixed", "elastic"))
    assert (fixed.name, elastic.name) == ("fixed-seed1", "elastic-seed1")
    assert not fixed.elastic and elastic.elastic and (elastic.min_workers, elastic.num_workers) == (1, 2)
    assert fixed.global_batch == elastic.global_batch == 64 and fixed.lr == elastic.lr == cfg.lr
    assert fixed.mode == elastic.mode == "catkd" and fixed.cache == elastic.cache == "/c"
    assert elastic.max_failures > 0  # a lost node is a failure Ray Train retries
    # the drill's own run: the same range and a global batch of 16
    drill = elastic_study.drill_config("/d", "/c", "/runs", "drill")
    assert drill.elastic and drill.global_batch == 16 and drill.batch_for(1).per_worker == 16


def test_groups_and_table():
    runs = [
        {"kind": "fixed", "seed": 0, "test_top1": 60.0, "world_sizes": [2, 2, 2]},
        {"kind": "elastic", "seed": 0, "test_top1": 59.0, "world_sizes": [1, 2, 1]},
        {"kind": "fixed", "seed": 1, "test_top1": 62.0, "world_sizes": [2, 2, 2]},
        {"kind": "elastic", "seed": 1, "test_top1": 61.5, "world_sizes": [1, 1, 2]},
    ]
    groups = elastic_study.summarize(runs)
    assert [(g["kind"], g["seeds"], g["mean"]) for g in groups] == [("fixed", 2, 61.0), ("elastic", 2, 60.25)]
    table = elastic_study.table({"groups": groups, "runs": runs}).splitlines()
    assert table[2] == "| fixed | 2 | 61.00 ± 1.41 | 60.00, 62.00 | 2 2 2 |"
    assert table[3] == "| elastic | 2 | 60.25 ± 1.77 | 59.00, 61.50 | 1 2 1 |"


def test_the_epochs_table_is_the_first_elastic_runs_record():
    history = [
        {"epoch": 1, "world_size": 1, "global_batch": 64, "lr": 0.05, "train_samples": 2000.0, "test_top1": 30.0},
        {"epoch": 2, "world_size": 2, "global_batch": 64, "lr": 0.05, "train_samples": 2000.0, "test_top1": 41.25},
    ]
    run = {"name": "elastic-seed0", "kind": "elastic", "history": history, "drill": {"events": ["a", "b"]}}
    lines = elastic_study.epochs_table({"runs": [{"kind": "fixed"}, run]}).splitlines()
    assert lines[0] == "`elastic-seed0`: a; b."
    assert lines[4:] == ["| 1 | 1 | 64 | 0.05 | 2000 | 30.00 |", "| 2 | 2 | 64 | 0.05 | 2000 | 41.25 |"]


def test_docs_training_elastic_tables_are_generated_from_the_committed_json():
    """docs/training.md's elastic tables are exactly what the committed JSON gives: every
    elastic run resized (a grow, then a shrink), every fixed run kept two workers."""
    import json

    from study_report import update_document

    summary = json.loads((ROOT / "docs" / "results" / "cifar10_elastic.json").read_text())
    for run in summary["runs"]:
        sizes = run["world_sizes"]
        assert len(sizes) == summary["settings"]["epochs"]
        if run["kind"] == "fixed":
            assert set(sizes) == {2}
        else:
            assert sizes[0] == 1 and 2 in sizes and sizes[-1] == 1, sizes
    assert elastic_study.summarize(summary["runs"]) == summary["groups"]
    doc = (ROOT / "docs" / "training.md").read_text()
    assert "<!-- elastic:epochs -->" in doc and "<!-- elastic:comparison -->" in doc
    assert update_document(doc, summary, elastic_study.TABLES, "elastic") == doc
