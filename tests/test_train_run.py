"""Ray Train runs end to end: every mode trains, wrong caches are refused before any
worker starts, the final student is exported, and a rerun resumes."""

from __future__ import annotations

import glob
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from catkd.models import build_model, checkpoint_payload, load_checkpoint
from pipeline.cache import CacheBuildConfig, CacheMismatchError, build_cache
from pipeline.data.shard_writer import ShardConfig, shard_dataset
from pipeline.train.config import TrainConfig, load_config
from pipeline.train.evaluate import evaluate_checkpoint
from pipeline.train.run import ResumeError, resolve, train


@pytest.fixture(scope="module")
def env(ray_local, tmp_path_factory):
    base = tmp_path_factory.mktemp("train")
    data = str(base / "shapes")
    shard_dataset(
        ShardConfig(
            "synthetic:shapes",
            data,
            samples_per_shard=24,
            synthetic={"train_samples": 96, "test_samples": 32, "seed": 8},
            progress=False,
        )
    )
    torch.manual_seed(2)
    weights = str(base / "teacher.pth")
    torch.save(checkpoint_payload(build_model("resnet8", 10, bias=True), "resnet8"), weights)

    def cache_of(**form):  # the module's caches: one teacher and views, each a storage form or recipe
        settings = dict(data=data, teacher="resnet8", weights=weights, root=str(base / "caches"), num_views=2)
        return build_cache(CacheBuildConfig(**settings, progress=False, **form))

    cache, topk_cache, stage_cache = cache_of(), cache_of(storage="topk:2"), cache_of(**STAGES)
    return {
        "base": base,
        "data": data,
        "weights": weights,
        "cache": cache,
        "topk_cache": topk_cache,
        "stage_cache": stage_cache,
    }


def _cfg(env, name, **kw):
    values = dict(
        data=env["data"],
        cache=env["cache"],
        student="resnet8",
        epochs=2,
        batch_size=16,
        lr_decay_epochs=[1],
        num_workers=2,
        loader_workers=1,
        cpus_per_worker=1,  # so that the module's runs fit in the test cluster at once
        storage_path=str(env["base"] / "runs"),
        name=name,
        beta=0.5,
    )
    return TrainConfig(**(values | kw))


MODES = ["ce", "dkd", "cat", "online-catkd"]  # kd shares dkd's path (pipeline/train/step.py)
STAGES = {"ops": "trivialaugment", "erase": 0.25, "mix": "cutmix:1.0"}  # the stage cache's


def _mode_cfg(env, mode):
    extra = {"teacher": "resnet8", "teacher_weights": env["weights"]} if mode == "online-catkd" else {}
    if mode in ("ce", "online-catkd"):
        extra["cache"] = None
    if mode == "ce":  # also in the team's tracker (W&B offline)
        extra |= {"tracking": "wandb", "experiment": "catkd-tests"}
    if mode == "dkd":  # DKD from a top-k cache's logits (kd and the full cache's: test_train_parity)
        extra |= {"cache": env["topk_cache"], "dkd_warmup": 2}
    # one DataLoader process per rank is the two-worker run's; the others load in the loop
    return _cfg(env, f"mode-{mode}", mode=mode, epochs=1, num_workers=1, loader_workers=0, **extra)


@pytest.fixture(scope="module")
def runs(env):
    """The module's independent trainings, started together (Ray Train start-ups are
    most of their time, and overlap): each test then asserts on its own run's result,
    or on the exception it ended with."""
    configs = {
        "catkd": _cfg(env, "catkd"),
        **{f"mode-{mode}": _mode_cfg(env, mode) for mode in MODES},
        # also in the team's tracker (MLflow on a local SQLite store)
        "catkd-topk": _cfg(
            env,
            "catkd-topk",
            epochs=1,
            num_workers=1,
            loader_workers=0,
            cache=env["topk_cache"],
            tracking="mlflow",
            tracking_uri=_mlflow_uri(env),
        ),
        "catkd-stages": _cfg(
            env, "catkd-stages", epochs=1, num_workers=1, loader_workers=0, cache=env["stage_cache"], **STAGES
        ),
        "resume-first": _cfg(env, "resume", epochs=1, num_workers=1),
        "diverges": _cfg(env, "diverges", mode="ce", cache=None, epochs=1, num_workers=1, loader_workers=0, lr=1e12),
    }
    os.environ["WANDB_MODE"] = "offline"  # no account, no network: the run folder only

    def outcome(cfg):
        try:
            return train(cfg)
        except Exception as exc:  # the diverging run's error is what its test checks
            return exc

    with ThreadPoolExecutor(len(configs)) as pool:
        return dict(zip(configs, pool.map(outcome, configs.values()), strict=True))


def _mlflow_uri(env) -> str:
    return f"sqlite:///{env['base']}/mlflow.db"


def _mlflow(env) -> dict:
    return {"tracking": "mlflow", "tracking_uri": _mlflow_uri(env)}


def _result(runs, name):
    result = runs[name]
    if isinstance(result, Exception):
        raise result
    return result


def test_catkd_two_workers_trains_exports_and_evaluates(env, runs):
    result = _result(runs, "catkd")
    history = result["history"]
    assert [h["epoch"] for h in history] == [1, 2]
    for key in (
        "train_loss",
        "train_cat",
        "train_ce",
        "train_top1",
        "train_top5",
        "test_top1",
        "test_top5",
        "images_per_s",
        "data_wait_fraction",
    ):
        assert key in history[-1]
    assert 0 <= history[-1]["data_wait_fraction"] <= 1
    lines = (env["base"] / "runs" / "catkd" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]
    assert any((env["base"] / "runs" / "catkd" / "tensorboard").iterdir())
    # The export loads without Ray, in CAM form and in classifier form.
    cam_model = load_checkpoint(result["exported"]["student_cam.pt"], "resnet8", 10)
    classifier_state = torch.load(result["exported"]["student_classifier.pt"], weights_only=True)
    assert torch.count_nonzero(classifier_state["fc.bias"]) == 0
    assert "head.weight" in cam_model.state_dict()
    metrics = evaluate_checkpoint(result["exported"]["student_cam.pt"], env["data"], device="cpu", loader_workers=0)
    assert metrics["samples"] == 32
    assert metrics["top1"] == pytest.approx(history[-1]["test_top1"], abs=1e-6)


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_runs(runs, mode):
    history = _result(runs, f"mode-{mode}")["history"]
    terms = {k for k in history[0] if k.startswith("train_")}
    expected = {
        "ce": {"train_ce"},
        "dkd": {"train_ce", "train_dkd"},
        "cat": {"train_cat"},
        "online-catkd": {"train_ce", "train_cat"},
    }[mode]
    assert expected <= terms and ("train_ce" not in terms if mode == "cat" else True)


@pytest.mark.parametrize(
    "override, field",
    [
        ({"spec_seed": 3}, "spec"),
        ({"resolution": 4}, "resolution"),
        ({"num_views": 3}, "num_views"),
        ({"teacher": "resnet20"}, "teacher_arch"),
        ({"binarize": True}, "target_kind"),
    ],
)
def test_wrong_cache_is_refused_before_training(env, override, field):
    with pytest.raises(CacheMismatchError, match=field):
        resolve(_cfg(env, "refused", **override))


def test_catkd_from_a_topk_cache_trains(runs):
    history = _result(runs, "catkd-topk")["history"]
    assert history[0]["train_cat"] > 0 and "train_ce" in history[0]


@pytest.mark.parametrize(
    "override, message",
    [
        ({"select_n": 3}, "select_n: 3 classes asked for, but .* keeps the top 2 per view"),
        ({"select_n": 1, "select_strategy": "bottom"}, "select_strategy: 'bottom' needs the lowest classes"),
    ],
)
def test_topk_cache_refuses_what_it_does_not_hold(env, override, message):
    with pytest.raises(CacheMismatchError, match=message):
        resolve(_cfg(env, "refused", cache=env["topk_cache"], **override))
    resolve(_cfg(env, "accepted", cache=env["topk_cache"], select_n=1))


def test_runs_that_can_never_start_are_refused_at_once(env):
    """On catkd's own local Ray nothing can add nodes: a GPU run on a cluster without GPUs,
    or an elastic run whose minimum never fits, is refused in seconds, naming what was
    asked and what the cluster has."""
    import time

    from pipeline.ray_setup import ImpossibleRequestError

    start = time.monotonic()
    with pytest.raises(ImpossibleRequestError, match=r"asks for 1 x \{CPU: 1, GPU: 1\}.* has 0 GPU in all"):
        train(_cfg(env, "gpu-nowhere", use_gpu=True, num_workers=1, renderer="cpu", decoder="cpu"))
    with pytest.raises(ImpossibleRequestError, match="asks for 2 x \\{CPU: 64\\}.* CPU in all"):
        train(_cfg(env, "cpus-nowhere", cpus_per_worker=64))
    # an elastic run needs only its minimum to fit, and is refused when even that never can
    with pytest.raises(ImpossibleRequestError, match=r"\(elastic, at least min_workers\) asks for 3 x \{CPU: 64\}"):
        train(_cfg(env, "elastic-nowhere", cpus_per_worker=64, num_workers=8, min_workers=3))
    assert time.monotonic() - start < 30


def test_foreign_teacher_weights_are_refused(env):
    other = str(env["base"] / "other.pth")
    torch.save(checkpoint_payload(build_model("resnet8", 10, bias=True), "resnet8"), other)
    with pytest.raises(CacheMismatchError, match="teacher_sha256"):
        resolve(_cfg(env, "refused", teacher_weights=other))


def test_partial_cache_is_refused(env, tmp_path):
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "identity.json").write_text("{}")
    with pytest.raises(CacheMismatchError, match="partial cache"):
        resolve(_cfg(env, "refused", cache=str(partial)))


def test_rerun_resumes_after_last_epoch(env, runs):
    first = _result(runs, "resume-first")
    assert [h["epoch"] for h in first["history"]] == [1]
    second = train(_cfg(env, "resume", epochs=3, num_workers=1))
    assert [h["epoch"] for h in second["history"]] == [1, 2, 3]
    assert second["history"][0] == first["history"][0]  # epoch 1 was not run again
    # A change that alters what the run computes is refused, with the field named.
    for field, value in (("student", "resnet14"), ("beta", 2.0), ("batch_size", 32)):
        with pytest.raises(ResumeError, match=rf"started with {field}=.*now {field}=.*choose another name="):
            train(_cfg(env, "resume", epochs=3, num_workers=1, **{field: value}))


def test_learning_rate_recipe():
    base = dict(data="/d", cache="/c", epochs=10, lr=0.1, lr_decay_epochs=[6, 8])
    step = TrainConfig(**base)
    assert [round(step.lr_factor(e), 6) for e in (0, 5, 6, 8)] == [1.0, 1.0, 0.1, 0.01]
    warm = TrainConfig(
        **base, warmup_epochs=3, lr_schedule="cosine", lr_scaling="linear", batch_size=128, num_workers=8
    )
    assert warm.peak_lr == pytest.approx(0.1 * 1024 / 256)  # the linear rule, stated in the config
    assert [round(warm.lr_factor(e), 6) for e in (0, 1, 2)] == [0.25, 0.5, 0.75]
    assert warm.lr_factor(3) == 1.0 and 0 < warm.lr_factor(9) < 0.1
    assert TrainConfig(**base, lr_scaling="none", batch_size=128, num_workers=8).peak_lr == 0.1  # off by default
    with pytest.raises(ValueError, match="warmup_epochs"):
        TrainConfig(**base, warmup_epochs=10)


def test_yaml_config_and_overrides(tmp_path):
    path = os.path.join(os.path.dirname(__file__), "..", "jobs", "configs", "demo_catkd.yaml")
    cfg = load_config(path, ["data=/d", "cache=/c", "beta=2", "normalize=true", "lr_decay_epochs=[1, 2]"])
    assert cfg.beta == 2.0 and cfg.normalize is True and cfg.lr_decay_epochs == [1, 2] and cfg.student == "resnet8"
    with pytest.raises(ValueError, match="unknown"):
        load_config(None, ["data=/d", "nonsense=1"])
    with pytest.raises(ValueError, match="needs|cache"):
        load_config(None, ["data=/d", "mode=catkd"])


def test_a_cache_with_augmentation_stages_trains_and_must_match_the_runs_stages(env, runs):
    """The loader replays each view's stored stages (checking them against the spec's
    draws), CutMix partners and mixed labels included; a run whose stages differ from the
    cache's is refused naming the field."""
    history = _result(runs, "catkd-stages")["history"]
    assert len(history) == 1 and history[0]["train_cat"] > 0 and 0 <= history[0]["test_top1"] <= 100
    with pytest.raises(CacheMismatchError, match="spec.ops: the run needs 'none', the cache holds 'trivialaugment'"):
        resolve(_cfg(env, "stages-missing", cache=env["stage_cache"], **(STAGES | {"ops": "none"})))
    with pytest.raises(CacheMismatchError, match="spec.erase: the run needs 0.5, the cache holds 0.25"):
        resolve(_cfg(env, "stages-other", cache=env["stage_cache"], **(STAGES | {"erase": 0.5})))


def test_mlflow_run_has_the_config_the_cache_every_epoch_and_the_student(env, runs):
    import mlflow

    result = _result(runs, "catkd-topk")
    client = mlflow.MlflowClient(tracking_uri=_mlflow_uri(env))
    experiment = client.get_experiment_by_name("catkd").experiment_id
    (run,) = client.search_runs([experiment], "tags.`catkd.run` = 'catkd-topk'")
    assert run.info.status == "FINISHED"
    assert run.data.params["student"] == "resnet8" and run.data.params["beta"] == "0.5"
    assert run.data.tags["catkd.teacher"] == "resnet8" and run.data.tags["catkd.cache"] == env["topk_cache"]
    assert run.data.tags["catkd.cache_id"] in env["topk_cache"] and run.data.tags["catkd.cache_storage"] == "topk:2"
    history = client.get_metric_history(run.info.run_id, "test_top1")
    assert [(m.step, m.value) for m in history] == [(h["epoch"], h["test_top1"]) for h in result["history"]]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"student_cam.pt", "student_classifier.pt", "metrics.jsonl", "student_cams.png"} <= artifacts


def test_wandb_offline_run_folder_holds_the_metrics_and_the_student(env, runs):
    """Rank 0's offline run holds every epoch's metrics; the driver's, the artifacts."""
    from tests.helpers.hub_datasets import wandb_history

    result = _result(runs, "mode-ce")
    folders = sorted(glob.glob(str(env["base"] / "runs" / "mode-ce" / "wandb" / "offline-run-*")))
    rows = [row for folder in folders for row in wandb_history(glob.glob(f"{folder}/run-*.wandb")[0])]
    # which run folders there were, and their files, should this ever fail again (it did once
    # in a full suite on a loaded machine, with no history rows, and passed alone)
    seen = {os.path.basename(f): sorted(os.listdir(f)) for f in folders}
    assert [(int(r["epoch"]), float(r["test_top1"])) for r in rows] == [
        (h["epoch"], pytest.approx(h["test_top1"])) for h in result["history"]
    ], seen
    saved = {os.path.basename(p) for folder in folders for p in glob.glob(f"{folder}/files/*")}
    assert {"student_cam.pt", "metrics.jsonl", "student_cams.png"} <= saved


def test_a_sweep_over_values_its_cache_cannot_serve_is_refused_before_any_trial(env):
    """Every value of the space is checked against the data and the cache at start."""
    from pipeline.train.sweep import SweepConfig, run_sweep

    with pytest.raises(CacheMismatchError, match="resolution"):
        run_sweep(_cfg(env, "sweep-r", num_workers=1), SweepConfig(space=["resolution=grid:2,4"]))
    assert not (env["base"] / "runs" / "sweep-r").exists()


def test_a_sweep_of_elastic_trials_runs_each_on_ray_train_elastic_scaling(env):
    """Each trial of a sweep may be elastic (1 to 2 workers here): the sweep runs as many
    at once as fit at their full size (2 on the session's 4 CPUs), and each keeps the
    global batch of its full size at whatever size it ran."""
    from pipeline.train.sweep import SweepConfig, run_sweep

    base = _cfg(env, "sweep-elastic", epochs=1, min_workers=1, num_workers=2, resize_check_s=1.0, loader_workers=0)
    rows = run_sweep(base, SweepConfig(space=["beta=grid:0.5,2"], scheduler="none"))
    assert sorted((r["params"]["beta"], r["status"]) for r in rows) == [(0.5, "finished"), (2.0, "finished")]
    for row in rows:
        folder = env["base"] / "runs" / "sweep-elastic" / row["trial"]
        saved = json.loads((folder / "run_config.json").read_text())
        assert (saved["min_workers"], saved["num_workers"]) == (1, 2)
        history = row["history"]  # the trial's metrics.jsonl
        assert [h["epoch"] for h in history] == [1] and history[0]["global_batch"] == 32, history
        assert history[0]["world_size"] in (1, 2) and history[0]["train_samples"] >= 96


PAPER_CONFIGS = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "jobs", "configs", "paper", "*.yaml")))


def test_paper_configs_cover_the_papers_pairs():
    names = {os.path.basename(p)[: -len(".yaml")] for p in PAPER_CONFIGS}
    assert len(names) == 13
    assert {"cifar100_resnet56_resnet20", "cifar100_wrn_40_2_shufflev1", "imagenet_tv_resnet34_tv_resnet18"} <= names


@pytest.mark.parametrize("path", PAPER_CONFIGS, ids=lambda p: os.path.basename(p))
def test_paper_config_loads_and_validates(path):
    from catkd.models import list_models

    cfg = load_config(path, ["data=/data", "cache=/cache"])
    assert cfg.mode == "catkd" and cfg.teacher in list_models() and cfg.student in list_models()
    assert cfg.beta > 0 and cfg.resolution in (2, 4) and cfg.lr in (0.01, 0.05, 0.2)
    imagenet = cfg.spec == "imagenet"
    assert (cfg.epochs, cfg.lr_decay_epochs) == ((100, [30, 60, 90]) if imagenet else (240, [150, 180, 210]))
    assert cfg.batch_size * cfg.num_workers == (512 if imagenet else 64)


def test_nonfinite_loss_names_the_sample_ids(runs):
    with pytest.raises(Exception, match=r"training loss became non-finite at sample ids \[\d+"):
        _result(runs, "diverges")


def test_tracking_settings_are_refused_in_one_line(monkeypatch):
    from catkd.errors import ConfigError
    from pipeline.train.tracking import TrackingUnavailableError

    with pytest.raises(ConfigError, match="tracking: expected one of none, mlflow, wandb, got 'neptune'"):
        TrainConfig(data="d", mode="ce", tracking="neptune")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(ConfigError, match="tracking_uri: set it"):
        TrainConfig(data="d", mode="ce", tracking="mlflow")
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if the extra were not installed
    with pytest.raises(
        TrackingUnavailableError, match=r"tracking: wandb needs its client: pip install 'catkd\[wandb\]'"
    ):
        TrainConfig(data="d", mode="ce", tracking="wandb")
