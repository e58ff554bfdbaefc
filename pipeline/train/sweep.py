"""``catkd sweep``: many student runs from one cache, as a Ray Tune experiment.

Every trial is an ordinary ``catkd train`` run (its own Ray Train worker group, its own
checkpoints) started by a Tune trial acting as its driver, with the trial's values of
the search space (pipeline.train.search_space) over a base TrainConfig. Ray Train's
per-epoch reports reach Tune (``TuneReportCallback``), so ASHA can stop a trial whose
metric lags at a rung; a stopped trial keeps its checkpoints and metrics. The sweep
lives in one folder, ``storage_path/name``: Tune's experiment state, and per trial one
folder holding both Tune's files and the Ray Train run (checkpoints, metrics.jsonl,
TensorBoard events). Rerunning the same command after a killed driver restores the
experiment (``Tuner.restore``): finished and stopped trials are kept as they are,
unfinished ones restart and their runs resume after their last checkpoint.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import posixpath
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import ray
from ray import tune
from ray.tune.schedulers import ASHAScheduler

from catkd.errors import ConfigError
from pipeline.ray_setup import init_ray
from pipeline.settings import check_fields, checked_values, read_yaml
from pipeline.storage import check_location, filesystem, join, write_atomic
from pipeline.train.config import LOGIT_METHODS, TrainConfig
from pipeline.train.run import ResumeError, cpus_per_worker, resolve, train
from pipeline.train.search_space import Dimension, check_against, grid_size, parse_space, space_items
from pipeline.train.sweep_report import report, run_history, trial_rows
from pipeline.train.tracking import close_stopped_run, with_tracking_uri


@dataclass
class SweepConfig:
    """The flags of ``catkd sweep`` are these fields (pipeline.settings.add_flags); a config
    file's ``sweep:`` section may hold them too (the flags win)."""

    # FIELD=KIND:VALUES for each swept TrainConfig field; KIND is grid (every value), choice
    # (one drawn per trial), uniform or loguniform (LOW,HIGH): beta=grid:0.5,1,2 lr=loguniform:0.01,0.1
    space: list[str] = field(default_factory=list)
    num_samples: int = 1  # draws of the space; a grid is run this many times over
    metric: str = "test_top1"  # what ASHA and the table rank trials by: any per-epoch metric
    mode: Literal["max", "min"] = "max"  # whether a higher or a lower metric is better
    scheduler: Literal["asha", "none"] = "asha"  # asha stops lagging trials at its rungs; none runs all to the end
    grace_period: int = 1  # epochs every trial runs before ASHA may stop it
    reduction_factor: int = 2  # at each rung ASHA keeps the best 1/reduction_factor of the trials
    max_concurrent: int = 0  # trials at once; 0: as many as the cluster's CPUs (and GPUs) hold
    seed: int = 0  # seed of the random draws (choice, uniform, loguniform)

    def __post_init__(self) -> None:
        check_fields(self, at_least={"num_samples": 1, "grace_period": 1, "reduction_factor": 2, "max_concurrent": 0})


def load_sweep_config(path: str | None, flags: dict[str, Any]) -> SweepConfig:
    """The ``sweep:`` section of the config file (optional; its ``space`` may be a mapping
    of FIELD to KIND:VALUES or to a list, a grid), then the command's flags."""
    section = (read_yaml(path).get("sweep") or {}) if path else {}
    if not isinstance(section, dict):
        raise ConfigError(f"{path}: sweep: expected a mapping of sweep settings, got {type(section).__name__}")
    if isinstance(section.get("space"), dict):
        section = section | {"space": space_items(section["space"])}
    return SweepConfig(**(checked_values(SweepConfig, section, f"{path}: sweep", noun="keys") | flags))


# Tune saves its experiment state at most this often (s): a driver killed right after a
# trial finished loses at most this much of the record (trials finished meanwhile are
# still not rerun: their runs' metrics say they are complete).
STATE_PERIOD_S = "1"


def run_sweep(base: TrainConfig, sweep: SweepConfig) -> list[dict[str, Any]]:
    """Run (or resume) the sweep; returns the table's rows, best first."""
    check_location(base.storage_path)
    # The trials are runs of one tracker experiment, named after the sweep.
    base = with_tracking_uri(
        dataclasses.replace(base, experiment=base.experiment or posixpath.basename(base.name.rstrip("/")))
    )
    dims = parse_space(sweep.space, TrainConfig)
    check_against(dims, base)
    base = _check_inputs(base, dims)
    _check_metric(base, sweep)
    init_ray(verbose=base.verbose)
    if not base.verbose:  # Tune's own lines (trial errors with tracebacks, summaries): the table says it
        logging.getLogger("ray.tune").setLevel(logging.CRITICAL)

    folder = join(base.storage_path, base.name)
    check_sweep_resume(folder, base, sweep)
    concurrent = sweep.max_concurrent or _trials_that_fit(base)
    trials = grid_size(dims) * sweep.num_samples
    trainable = tune.with_resources(
        # The trial is only the Ray Train run's driver: its workers reserve the CPUs (and
        # GPUs). Tune refuses an empty reservation, so the driver's is 1 MiB of memory.
        functools.partial(_trial, base=dataclasses.asdict(base)),
        {"cpu": 0, "memory": 2**20},
    )
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", STATE_PERIOD_S)
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"  # Ctrl-C is catkd's one-line stop (pipeline.stopping)
    if not base.verbose:  # Tune's output engine prints its start box even at verbose=0; the old one does not
        os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    if tune.Tuner.can_restore(folder):
        print(f"[sweep] {folder}: resuming (finished and stopped trials are kept; unfinished ones resume)")
        tuner = tune.Tuner.restore(folder, trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        print(
            f"[sweep] {base.name}: {trials} trial(s) over {', '.join(d.describe() for d in dims) or 'no space'}, "
            f"up to {concurrent} at a time, reading {base.cache or 'no cache'}; scheduler {sweep.scheduler}"
        )
        tuner = tune.Tuner(
            trainable,
            param_space={d.field: d.to_tune() for d in dims},
            tune_config=tune.TuneConfig(
                scheduler=_scheduler(base, dims, sweep),
                num_samples=sweep.num_samples,
                trial_dirname_creator=functools.partial(_trial_folder, fields=[d.field for d in dims]),
                search_alg=tune.search.BasicVariantGenerator(random_state=sweep.seed, max_concurrent=concurrent),
            ),
            run_config=tune.RunConfig(
                name=base.name,
                storage_path=base.storage_path,
                verbose=0,  # one line per trial event instead (_Lines)
                callbacks=[_Lines(base.epochs)],
            ),
        )
    grid = tuner.fit()
    rows = trial_rows(grid, base, dims, sweep)
    for row in rows:
        if row["status"] == "stopped":
            trial = dataclasses.asdict(base) | row["params"] | {"name": join(base.name, row["trial"])}
            close_stopped_run(TrainConfig(**trial))
    report(rows, base, dims, sweep, folder)
    return rows


SWEEP_CONFIG = "sweep_config.json"
# What a rerun may change without mixing two sweeps: how many trials run at once, and how
# each trial's run executes (not what it computes).
SWEEP_RESUMABLE = ("max_concurrent",)
BASE_RESUMABLE = (
    "loader_workers",
    "cpus_per_worker",
    "max_failures",
    "verbose",
    "compile",
    "tracking",
    "tracking_uri",
    "experiment",
)


def check_sweep_resume(folder: str, base: TrainConfig, sweep: SweepConfig) -> None:
    """Refuse to continue the sweep in ``folder`` under another base config or sweep
    setting (the restored experiment would keep its old space and scheduler while its
    restarted trials took the new base); the first start records both."""
    fs, root = filesystem(folder)
    path = join(root, SWEEP_CONFIG)
    now = {"base": dataclasses.asdict(base), "sweep": dataclasses.asdict(sweep)}
    if fs.exists(path):
        saved = json.loads(fs.cat_file(path))
        changed = [
            (f"{part}.{key}" if part == "sweep" else key, saved[part].get(key), now[part].get(key))
            for part, allowed in (("sweep", SWEEP_RESUMABLE), ("base", BASE_RESUMABLE))
            for key in sorted(set(saved[part]) | set(now[part]))
            if key not in allowed and saved[part].get(key) != now[part].get(key)
        ]
        if changed:
            key, before, after = changed[0]
            raise ResumeError(
                f"{folder}: this sweep was started with {key}={before!r}, now {key}={after!r}"
                f"{f' (and {len(changed) - 1} more)' if len(changed) > 1 else ''}; "
                "continuing would mix two sweeps: choose another name= for a new sweep"
            )
    write_atomic(fs, path, json.dumps(now, indent=1).encode())


def _check_inputs(base: TrainConfig, dims: list[Dimension]) -> TrainConfig:
    """The data and the cache against every value a trial may get (a resolution the
    cache lacks, say), so that a bad sweep stops before its first trial; returns the
    base with its paths absolute (trials run in Tune's working folders)."""
    for dim in dims:
        for value in dim.values:
            resolve(dataclasses.replace(base, **{dim.field: value}))
    return resolve(base)


def _check_metric(base: TrainConfig, sweep: SweepConfig) -> None:
    """The metric must be one every epoch of this mode reports (pipeline.train.loop)."""
    method = base.method
    terms = (
        ["ce"]
        if method == "ce"
        else ["ce", method]
        if method in LOGIT_METHODS
        else ["cat"] + (["ce"] if base.ce_weight > 0 else [])
    )
    known = ["test_top1", "test_top5", "train_top1", "train_top5", "train_loss"]
    known += [f"train_{t}" for t in terms] + ["images_per_s", "data_wait_fraction"]
    if sweep.metric not in known:
        raise ConfigError(f"metric: {sweep.metric!r} is not reported by mode {base.mode}; one of {', '.join(known)}")


def _trials_that_fit(base: TrainConfig) -> int:
    """How many trials the cluster holds at once: its CPUs (and GPUs) over one trial's."""
    per_worker = cpus_per_worker(base)
    resources = ray.cluster_resources()
    fit = int(resources.get("CPU", 1) // (per_worker * base.num_workers))
    if base.use_gpu:
        fit = min(fit, int(resources.get("GPU", 0) // base.num_workers))
    return max(1, fit)


class ResumableASHA(ASHAScheduler):
    """ASHA whose rung records survive a restart of the sweep's driver. Tune restores
    the trials and the search algorithm but not the scheduler's state (it unpickles the
    scheduler as first configured), so after a restart the first trial to reach a rung
    would be compared with nobody and always go on. When Tune adds a trial that has
    already reported, its past epochs (its run's metrics.jsonl) are replayed into its
    bracket: the rungs hold again what every trial reached."""

    def __init__(self, history: Callable[[str], list[dict[str, Any]]], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._history = history  # trial folder -> the run's per-epoch metrics

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        super().on_trial_add(tune_controller, trial)
        if self._time_attr not in (trial.last_result or {}):
            return  # a new trial (or one that never reported): nothing to replay
        bracket = self._trial_info[trial.trial_id]
        for epoch in self._history(trial.storage.trial_dir_name):
            if self._time_attr in epoch and self._metric in epoch:
                bracket.on_result(trial, epoch[self._time_attr], self._metric_op * epoch[self._metric])
        if trial.is_finished():  # Tune will not report it again
            del self._trial_info[trial.trial_id]


def _scheduler(base: TrainConfig, dims: list[Dimension], sweep: SweepConfig) -> Any:
    if sweep.scheduler == "none":
        return None
    epochs = max([base.epochs] + [v for d in dims if d.field == "epochs" for v in d.values])
    return ResumableASHA(
        history=functools.partial(_trial_history, base.storage_path, base.name),
        time_attr="epoch",
        metric=sweep.metric,
        mode=sweep.mode,
        max_t=epochs,
        grace_period=min(sweep.grace_period, epochs),
        reduction_factor=sweep.reduction_factor,
        # A trial that reaches the last epoch ends by itself, exporting its student and
        # closing its tracker run; ASHA's default stops it at its last report instead,
        # before either (its rungs all lie below max_t, so nothing else changes).
        stop_last_trials=False,
    )


def _trial_folder(trial: Any, fields: list[str]) -> str:
    """``beta=0.5,seed=1_00003``: the swept values, then the trial's number (unique)."""
    values = ",".join(f"{k}={_short(trial.config[k])}" for k in fields if k in trial.config)
    number = trial.trial_id.rsplit("_", 1)[-1]
    return f"{values}_{number}" if values else number


def _short(value: Any) -> str:
    text = f"{value:.4g}" if isinstance(value, float) else str(value)
    return text.replace("/", "-").replace(":", "-").replace(" ", "")


def _trial(config: dict[str, Any], base: dict[str, Any]) -> None:
    """One trial: the Ray Train run of the base config with the trial's values, in the
    trial's own folder, its epochs reported to Tune."""
    from ray.tune.integration.ray_train import TuneReportCallback

    folder = posixpath.basename(tune.get_context().get_trial_dir().rstrip("/"))
    cfg = TrainConfig(**(base | config | {"name": join(base["name"], folder)}))
    done = finished_history(cfg)
    if done:  # finished before a driver restart that Tune's state did not record
        tune.report(done[-1])
        return
    train(cfg, callbacks=[TuneReportCallback()])


def _trial_history(storage_path: str, sweep_name: str, folder: str) -> list[dict[str, Any]]:
    return run_history(storage_path, join(sweep_name, folder))


def finished_history(cfg: TrainConfig) -> list[dict[str, Any]]:
    """The run's per-epoch metrics when it has run all its epochs, else []."""
    history = run_history(cfg.storage_path, cfg.name)
    return history if history and history[-1]["epoch"] >= cfg.epochs else []


class _Lines(tune.Callback):
    """On the driver: one console line per trial start, epoch and end (Tune's own
    progress tables are off)."""

    def __init__(self, epochs: int) -> None:
        self.epochs = epochs

    def on_trial_start(self, iteration, trials, trial, **info):
        print(f"[sweep] {_name(trial)}: started", flush=True)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        print(
            f"[sweep] {_name(trial)}: epoch {result.get('epoch', '?')}/{trial.config.get('epochs', self.epochs)}  "
            f"test top-1 {result.get('test_top1', float('nan')):.2f}%  {result.get('images_per_s', 0):.0f} images/s",
            flush=True,
        )

    def on_trial_complete(self, iteration, trials, trial, **info):
        ran, planned = (trial.last_result or {}).get("epoch", 0), trial.config.get("epochs", self.epochs)
        how = "finished" if ran >= planned else f"stopped by the scheduler after epoch {ran} of {planned}"
        print(f"[sweep] {_name(trial)}: {how}", flush=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        print(f"[sweep] {_name(trial)}: failed (its error is in the table)", flush=True)


def _name(trial: Any) -> str:
    return posixpath.basename(str(trial.local_path).rstrip("/")) if trial.local_path else trial.trial_id
