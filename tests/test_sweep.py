"""The sweep's search space, its config file section, and its report, without Ray
(the sweep itself runs on Ray Tune in tests/test_train_run.py)."""

from __future__ import annotations

import pytest

from catkd.errors import ConfigError
from pipeline.train.config import TrainConfig, load_config
from pipeline.train.search_space import check_against, grid_size, parse_space
from pipeline.train.sweep import SweepConfig, load_sweep_config
from pipeline.train.sweep_report import plot, sort_rows, table


def test_every_kind_is_typed_as_its_field_and_becomes_a_tune_domain():
    from ray import tune

    dims = parse_space(
        [
            "beta=grid:0.5,1,2",
            "student=choice:resnet8,resnet14",
            "lr=loguniform:0.01,0.1",
            "seed=uniform:0,9",
            "lr_decay_epochs=grid:[[2],[3, 4]]",
            "kd_temperature=[2, 4]",
        ],
        TrainConfig,
    )
    by_field = {d.field: d for d in dims}
    assert by_field["beta"].values == (0.5, 1.0, 2.0) and all(isinstance(v, float) for v in by_field["beta"].values)
    assert by_field["lr_decay_epochs"].values == ([2], [3, 4])
    assert by_field["kd_temperature"].kind == "grid" and by_field["kd_temperature"].values == (2.0, 4.0)
    assert grid_size(dims) == 3 * 2 * 2
    assert by_field["beta"].to_tune() == {"grid_search": [0.5, 1.0, 2.0]}
    assert isinstance(by_field["student"].to_tune(), tune.search.sample.Categorical)
    lr = by_field["lr"].to_tune()
    assert isinstance(lr, tune.search.sample.Float) and (lr.lower, lr.upper) == (0.01, 0.1)
    seed = by_field["seed"].to_tune()  # an integer field draws integers, both ends included
    assert isinstance(seed, tune.search.sample.Integer) and (seed.lower, seed.upper) == (0, 10)


@pytest.mark.parametrize(
    "item, message",
    [
        ("betaa=grid:1,2", "space: betaa: unknown field"),
        ("beta=grid:1,big", "beta: expected a number, got 'big'"),
        ("beta=normal:1,2", "space: beta: unknown kind 'normal'"),
        ("beta=grid:", "space: beta: no values"),
        ("student=uniform:1,2", "space: student: uniform draws numbers"),
        ("lr=uniform:0.1", "space: lr: uniform takes LOW,HIGH, got 1 value(s)"),
        ("lr=uniform:0.1,0.01", "space: lr: uniform needs LOW < HIGH"),
        ("lr=loguniform:0,0.1", "space: lr: loguniform needs LOW > 0"),
        ("name=grid:a,b", "space: name: the sweep sets it"),
        ("beta", "space: expected FIELD=KIND:VALUES"),
    ],
)
def test_a_bad_space_is_one_line_naming_the_field(item, message):
    with pytest.raises(ConfigError) as raised:
        parse_space([item], TrainConfig)
    assert message in str(raised.value) and "\n" not in str(raised.value)


def test_values_the_config_refuses_are_refused_before_the_sweep():
    base = TrainConfig(data="/d", mode="ce")
    check_against(parse_space(["lr=grid:0.1,0.2", "beta=loguniform:0.5,8"], TrainConfig), base)
    with pytest.raises(ConfigError, match="space: epochs: must be at least 1, got 0"):
        check_against(parse_space(["epochs=grid:2,0"], TrainConfig), base)
    with pytest.raises(ConfigError, match="space: given twice|beta: given twice"):
        parse_space(["beta=grid:1", "beta=grid:2"], TrainConfig)


def test_a_config_file_holds_the_base_and_the_sweep(tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text(
        "mode: ce\nstudent: resnet8\nepochs: 3\n"
        "sweep:\n  space:\n    beta: [0.5, 2]\n    lr: loguniform:0.01,0.1\n  grace_period: 2\n  scheduler: asha\n"
    )
    base = load_config(str(path), ["data=/d"])  # catkd train reads the same file, without its sweep section
    assert (base.mode, base.epochs, base.data) == ("ce", 3, "/d")
    sweep = load_sweep_config(str(path), {"reduction_factor": 3})
    assert sweep == SweepConfig(
        space=["beta=grid:[0.5, 2]", "lr=loguniform:0.01,0.1"], grace_period=2, reduction_factor=3
    )
    assert [d.values for d in parse_space(sweep.space, TrainConfig)] == [(0.5, 2.0), (0.01, 0.1)]
    assert load_sweep_config(str(path), {"space": ["seed=grid:0,1"]}).space == ["seed=grid:0,1"]  # flags win
    path.write_text("mode: ce\nsweep:\n  grace: 2\n")
    with pytest.raises(ConfigError, match=r"sweep: unknown keys \['grace'\]"):
        load_sweep_config(str(path), {})


def _row(trial, beta, values, status="finished", stopped_at=None, error=None):
    history = [
        {"epoch": e + 1, "test_top1": v, "images_per_s": 100.0 + e, "train_cat": 12.5} for e, v in enumerate(values)
    ]
    return {
        "trial": trial,
        "params": {"beta": beta},
        "status": status,
        "stopped_at": stopped_at,
        "epochs": len(values),
        "planned_epochs": 3,
        "metric_last": values[-1] if values else None,
        "metric_best": max(values) if values else None,
        "top1_last": values[-1] if values else None,
        "top1_best": max(values) if values else None,
        "images_per_s": 101.0 if values else None,
        "cat_after_epoch_1": 12.5 if values else None,
        "beta_cat_after_epoch_1": 12.5 * beta if values else None,
        "history": history,
        **({"error": error} if error else {}),
    }


def test_the_table_ranks_by_the_metric_and_marks_stopped_and_failed_trials():
    rows = [
        _row("beta=8_00002", 8.0, [20.0], "stopped", stopped_at=1),
        _row("beta=1_00001", 1.0, [30.0, 50.0, 60.0]),
        _row("beta=64_00003", 64.0, [], "failed", error="ConfigError: lr: bad"),
        _row("beta=0.5_00000", 0.5, [35.0, 45.0, 55.0]),
    ]
    ranked = sort_rows(rows, "test_top1", "max")
    assert [r["trial"] for r in ranked] == ["beta=1_00001", "beta=0.5_00000", "beta=8_00002", "beta=64_00003"]
    assert [r["trial"] for r in sort_rows(rows, "test_top1", "min")][:3] == [
        "beta=8_00002",
        "beta=0.5_00000",
        "beta=1_00001",
    ]
    text = table(ranked, "test_top1").splitlines()
    assert text[0].split()[:3] == ["trial", "status", "beta"] and "beta*CAT ep 1" in text[0]
    assert text[1].split() == ["beta=1_00001", "finished", "1", "60.00", "60.00", "3/3", "101", "12.5"]
    assert text[3].split()[:2] == ["beta=8_00002", "stopped@1"]
    assert text[-1] == "beta=64_00003 failed: ConfigError: lr: bad"
    png = plot(ranked, parse_space(["beta=grid:0.5,1,8,64"], TrainConfig), "test_top1")
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_a_rerun_with_another_space_or_base_is_refused_not_mixed(tmp_path):
    import dataclasses

    from pipeline.train.run import ResumeError
    from pipeline.train.sweep import check_sweep_resume

    folder = str(tmp_path / "sweep")
    base, sweep = TrainConfig(data="/d", mode="ce"), SweepConfig(space=["beta=grid:1,2"])
    check_sweep_resume(folder, base, sweep)  # the first start records both
    check_sweep_resume(folder, base, sweep)  # the same command continues
    check_sweep_resume(
        folder, dataclasses.replace(base, loader_workers=0), dataclasses.replace(sweep, max_concurrent=1)
    )
    with pytest.raises(ResumeError, match=r"sweep.space=\['beta=grid:1,2'\], now sweep.space=\['beta=grid:1,4'\]"):
        check_sweep_resume(folder, base, SweepConfig(space=["beta=grid:1,4"]))
    with pytest.raises(ResumeError, match="started with epochs=240, now epochs=3; continuing would mix two sweeps"):
        check_sweep_resume(folder, dataclasses.replace(base, epochs=3), sweep)


def test_a_run_saved_before_a_field_existed_resumes_with_that_fields_default():
    import dataclasses

    from pipeline.train.config import resume_conflicts

    now = TrainConfig(data="/d", mode="ce")
    saved = {k: v for k, v in dataclasses.asdict(now).items() if k != "mix"}  # written by an older catkd
    assert resume_conflicts(saved, now) == ([], [])
    assert resume_conflicts(saved, dataclasses.replace(now, mix="cutmix:1.0")) == (["mix"], [])
