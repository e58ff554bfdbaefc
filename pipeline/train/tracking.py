"""Runs in the team's tracker: ``tracking=mlflow`` or ``tracking=wandb``.

Ray's documentation for Train V2 has rank 0 of the training function talk to the
tracker itself (its ``setup_mlflow``/``setup_wandb`` helpers belong to the V1 API), and
so does catkd: rank 0 opens the run when training starts (the config as parameters, the
cache identity and teacher as tags) and logs every epoch's metrics; the driver adds the
exported student, the metrics file and a picture of the student's CAMs as artifacts
when training ends, and closes the run. A run is found again by its catkd run name
(tag ``catkd.run``), so a restarted rank 0 or a resumed training continues the same
tracker run. A sweep's trials are runs of one experiment, named after the sweep.

MLflow: the tracking URI is ``tracking_uri`` or ``MLFLOW_TRACKING_URI`` (a server, or
``sqlite:///PATH`` offline: artifacts then go beside the database). W&B: the project is
the experiment; ``WANDB_MODE=offline`` writes the run folder under the run's storage
folder without an account. Both are optional extras (``catkd[mlflow]``,
``catkd[wandb]``); a missing one is refused in one line before anything runs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict
from typing import TYPE_CHECKING

from catkd.errors import CatkdError, ConfigError

if TYPE_CHECKING:
    from pipeline.cache.identity import CacheIdentity
    from pipeline.train.config import TrainConfig

TRACKERS = ("none", "mlflow", "wandb")
DEFAULT_EXPERIMENT = "catkd"
RUN_TAG = "catkd.run"


class TrackingUnavailableError(CatkdError, ImportError):
    """A tracker asked for whose client is not installed."""


def check_tracking(cfg: TrainConfig) -> None:
    """Refuse an unknown tracker, or one whose client is not installed (one line)."""
    if cfg.tracking not in TRACKERS:
        raise ConfigError(f"tracking: expected one of {', '.join(TRACKERS)}, got {cfg.tracking!r}")
    if cfg.tracking == "none":
        return
    try:
        __import__(cfg.tracking)
    except ImportError:
        raise TrackingUnavailableError(
            f"tracking: {cfg.tracking} needs its client: pip install 'catkd[{cfg.tracking}]'"
        ) from None
    if cfg.tracking == "mlflow" and not (cfg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")):
        raise ConfigError("tracking_uri: set it (or MLFLOW_TRACKING_URI) to an MLflow server or sqlite:///PATH")


def experiment_name(cfg: TrainConfig) -> str:
    return cfg.experiment or DEFAULT_EXPERIMENT


def run_params(cfg: TrainConfig) -> dict[str, str]:
    """The config as flat string parameters (lists and dicts as JSON)."""
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in asdict(cfg).items()}


def run_tags(cfg: TrainConfig, identity: CacheIdentity | None) -> dict[str, str]:
    """What the run learns from: its cache's identity (the one the training opened) and
    teacher, its data."""
    tags = {RUN_TAG: cfg.name, "catkd.mode": cfg.mode, "catkd.student": cfg.student, "catkd.data": cfg.data}
    if cfg.teacher:
        tags["catkd.teacher"] = cfg.teacher
    if cfg.cache and identity is not None:
        tags |= {
            "catkd.cache": cfg.cache,
            "catkd.cache_id": identity.cache_id,
            "catkd.teacher": identity.teacher_arch,
            "catkd.teacher_sha256": identity.teacher_sha256,
            "catkd.cache_storage": identity.storage,
        }
    return tags


class Tracker:
    """One tracker run, opened by ``open_tracker``: by rank 0 when training starts, by the
    driver when it ends."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        raise NotImplementedError

    def log_artifact(self, path: str) -> None:
        raise NotImplementedError

    def end_of_training(self) -> None:
        """Rank 0's last call; the driver closes the run after adding its artifacts."""

    def finish(self, status: str = "finished") -> None:
        """Close the run as ``status``: finished, failed, or stopped (early, by a sweep's
        scheduler)."""
        raise NotImplementedError


def open_tracker(cfg: TrainConfig, tags: dict[str, str] | None = None) -> Tracker | None:
    """The tracker run of ``cfg`` (None for tracking=none); ``tags`` (``run_tags``, given
    by rank 0 at the start of training) are recorded with the parameters."""
    if cfg.tracking == "mlflow":
        return MlflowTracker(cfg, tags)
    if cfg.tracking == "wandb":
        return WandbTracker(cfg, tags)
    return None


# catkd's ends of a run as MLflow's run statuses
MLFLOW_STATUS = {"finished": "FINISHED", "failed": "FAILED", "stopped": "KILLED"}


class MlflowTracker(Tracker):
    def __init__(self, cfg: TrainConfig, tags: dict[str, str] | None) -> None:
        self.client, experiment_id = _mlflow_experiment(cfg)
        found = self.client.search_runs(
            [experiment_id],
            filter_string=f"tags.`{RUN_TAG}` = '{cfg.name}'",
            max_results=1,
            order_by=["start_time DESC"],
        )
        if found:
            self.run_id = found[0].info.run_id
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            self.run_id = self.client.create_run(experiment_id, run_name=cfg.name, tags={RUN_TAG: cfg.name}).info.run_id
        if tags is not None:
            for key, value in tags.items():
                self.client.set_tag(self.run_id, key, value)
            if not found:  # parameters cannot change once logged
                from mlflow.entities import Param

                self.client.log_batch(self.run_id, params=[Param(k, v) for k, v in run_params(cfg).items()])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def log_artifact(self, path: str) -> None:
        self.client.log_artifact(self.run_id, path)

    def finish(self, status: str = "finished") -> None:
        self.client.set_terminated(self.run_id, status=MLFLOW_STATUS[status])


def _mlflow_experiment(cfg: TrainConfig):
    """The client of ``cfg``'s tracking URI and its experiment's id (created if new)."""
    import mlflow

    uri = cfg.tracking_uri or os.environ["MLFLOW_TRACKING_URI"]
    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(experiment_name(cfg))
    if experiment is not None:
        return client, experiment.experiment_id
    return client, client.create_experiment(experiment_name(cfg), artifact_location=_beside_database(uri))


def prepare_tracking(cfg: TrainConfig) -> None:
    """On the driver, before any worker starts: MLflow's store opened (a new SQLite
    database is created and migrated here, once, not by a sweep's trials at once) and
    the experiment made."""
    if cfg.tracking == "mlflow":
        _mlflow_experiment(cfg)


def _beside_database(uri: str) -> str | None:
    """Artifacts of a SQLite store go in a folder beside the database (MLflow's default,
    ./mlruns of the process, would be a Ray worker's temporary folder)."""
    if uri.startswith("sqlite:///"):
        return os.path.join(os.path.dirname(os.path.abspath(uri.removeprefix("sqlite:///"))), "mlflow-artifacts")
    return None


class WandbTracker(Tracker):
    def __init__(self, cfg: TrainConfig, tags: dict[str, str] | None) -> None:
        import wandb

        from pipeline.storage import filesystem, is_local, join

        fs, root = filesystem(cfg.storage_path)
        folder = join(root, cfg.name) if is_local(fs) else None  # the run folder beside the run's own logs
        if folder:
            os.makedirs(folder, exist_ok=True)
        # One W&B run per catkd run, found again by an id made from its name.
        run_id = hashlib.sha256(f"{cfg.storage_path}|{cfg.name}".encode()).hexdigest()[:16]
        self.run = wandb.init(
            project=experiment_name(cfg),
            name=cfg.name,
            id=run_id,
            resume="allow",
            dir=folder,
            config=run_params(cfg) if tags is not None else None,
            reinit="finish_previous",
        )
        if tags is not None:
            self.run.summary.update({k.replace(".", "_"): v for k, v in tags.items()})

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(dict(metrics), step=step)

    def log_artifact(self, path: str) -> None:
        self.run.save(path, base_path=os.path.dirname(path), policy="now")

    def end_of_training(self) -> None:
        self.run.finish()  # one process holds a W&B run at a time: the driver reopens it

    def finish(self, status: str = "finished") -> None:
        self.run.summary["catkd_status"] = status  # W&B's own states have no "stopped early"
        self.run.finish(exit_code=1 if status == "failed" else 0)


# W&B settings a worker needs from the driver (never a key: that is the cluster's own)
TRACKER_ENV_VARS = ("WANDB_MODE", "WANDB_BASE_URL", "WANDB_ENTITY")


def tracker_env() -> dict[str, str]:
    return {name: os.environ[name] for name in TRACKER_ENV_VARS if name in os.environ}


def with_tracking_uri(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with MLflow's URI taken from the driver's environment, so that the
    workers (started without it) find the same server; the store prepared."""
    if cfg.tracking == "mlflow" and not cfg.tracking_uri:
        cfg = dataclasses.replace(cfg, tracking_uri=os.environ.get("MLFLOW_TRACKING_URI"))
    prepare_tracking(cfg)
    return cfg


def log_run_end(cfg: TrainConfig, exported: dict[str, str], *, failed: bool = False) -> None:
    """On the driver when training ends: the exported student, the metrics file and a
    picture of the student's CAMs on test images as artifacts, then the run closed. The
    training's own outputs are written by then: a tracker that fails here costs a line
    on stderr, not the run."""
    if cfg.tracking == "none":
        return
    try:
        _log_run_end(cfg, exported, failed)
    except Exception as exc:  # the tracker's clients raise many types (network, store, auth)
        _say_tracker_failed(f"[train] {cfg.name}: {cfg.tracking}: the run's artifacts were not logged", exc)


def _say_tracker_failed(what: str, exc: Exception) -> None:
    """One line on stderr: what was not done, and the tracker client's error, first line."""
    text = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
    print(f"{what} ({type(exc).__name__}: {text})", file=sys.stderr)


def _log_run_end(cfg: TrainConfig, exported: dict[str, str], failed: bool) -> None:
    tracker = open_tracker(cfg)
    assert tracker is not None
    with tempfile.TemporaryDirectory() as folder:
        from pipeline.storage import filesystem, join

        # export_student's paths are the storage filesystem's own (no protocol)
        fs, root = filesystem(cfg.storage_path)
        sources = dict(exported) | {"metrics.jsonl": join(root, cfg.name, "metrics.jsonl")}
        local: dict[str, str] = {}
        for name, path in sources.items():
            if fs.exists(path):
                local[name] = os.path.join(folder, os.path.basename(name))
                fs.get(path, local[name])
                tracker.log_artifact(local[name])
        if "student_cam.pt" in local:
            from pipeline.viz import render_cam_report

            picture = os.path.join(folder, "student_cams.png")
            student = {"student": local["student_cam.pt"]}
            render_cam_report(cfg.data, student, picture, split=cfg.test_split, spec=cfg.spec, limit=64)
            tracker.log_artifact(picture)
    tracker.finish("failed" if failed else "finished")


def close_stopped_run(cfg: TrainConfig) -> None:
    """On a sweep's driver: the tracker run of a trial its scheduler stopped early (Tune
    ends such a trial's process, so the trial never closed it itself) closed as stopped."""
    if cfg.tracking == "none":
        return
    try:
        tracker = open_tracker(cfg)
        assert tracker is not None
        tracker.finish("stopped")
    except Exception as exc:  # as log_run_end: a tracker that fails costs a line, not the sweep
        _say_tracker_failed(f"[sweep] {cfg.name}: {cfg.tracking}: the run was not closed", exc)
