"""``catkd train``: validate inputs on the driver, then run the loop on Ray Train.

Everything that can be refused is refused before any worker starts: a missing
dataset, a cache made for another teacher, dataset, split, spec, view count,
resolution or class count, or a partial cache. Rerunning the same command (same
``storage_path`` and ``name``) resumes after the last completed epoch.
"""

from __future__ import annotations

import dataclasses
import io
import json
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import ray
import torch
from ray.train import (
    CheckpointConfig,
    FailureConfig,
    Result,
    RunConfig,
    ScalingConfig,
    TrainingFailedError,
    UserCallback,
)
from ray.train.torch import TorchTrainer

from catkd.errors import CatkdError, user_error
from catkd.models import build_model
from catkd.models.hub_env import hub_env
from pipeline.cache.identity import CacheIdentity, CacheMismatchError, file_sha256, identity_of, parse_storage
from pipeline.cache.reader import TargetCache
from pipeline.console import Console, Relay
from pipeline.data.shard_format import read_index
from pipeline.ray_setup import check_request_fits, init_ray
from pipeline.storage import absolute, check_location, filesystem, join, write_atomic
from pipeline.train.checkpoint import load_training_state
from pipeline.train.config import LOGIT_METHODS, TrainConfig, resume_conflicts
from pipeline.train.loop import train_loop
from pipeline.train.tracking import log_run_end, tracker_env, with_tracking_uri


class ResumeError(CatkdError, ValueError):
    """A rerun whose configuration differs from the run it would resume."""


def resolve(cfg: TrainConfig) -> TrainConfig:
    """Check the inputs and fill what the cache decides (S; the teacher's name)."""
    cfg = dataclasses.replace(
        cfg,
        data=absolute(cfg.data),
        cache=cfg.cache and absolute(cfg.cache),
        teacher_weights=cfg.teacher_weights and absolute(cfg.teacher_weights),
        storage_path=absolute(cfg.storage_path),
    )
    index = read_index(cfg.data, cfg.train_split)
    read_index(cfg.data, cfg.test_split)
    if not cfg.needs_cache:
        cfg.augment_spec()  # a renderer this run cannot use is refused here, before any worker starts
        return cfg  # num_views 0: a new view every epoch, as plain training augments
    cache = TargetCache(cfg.cache)
    found = cache.identity
    # The cache decides how views are made unless the run says; a GPU-made cache needs a GPU.
    made_by = {key: found.spec.get(key, "cpu") for key in ("renderer", "decoder")}
    cfg = dataclasses.replace(
        cfg, **{key: made_by[key] if getattr(cfg, key) == "auto" else getattr(cfg, key) for key in made_by}
    )
    if not cfg.use_gpu and (cfg.renderer == "device" or cfg.decoder == "nvjpeg"):
        raise CacheMismatchError(
            f"{cfg.cache}: its views were made by the {made_by['renderer']} renderer and the {made_by['decoder']} "
            f"decoder, on a GPU; this run would make them with renderer={cfg.renderer} decoder={cfg.decoder} "
            "but has no GPU (use_gpu=false): "
            "train with use_gpu=true, or build a cache with --renderer cpu --decoder cpu"
        )
    # any storage form serves, whatever precision the teacher computed in, built or derived
    ignore = ["storage", "precision", "derived_from"]
    if cfg.method in LOGIT_METHODS:  # the logits are the same whatever maps the cache holds beside them
        ignore += ["resolution", "target_kind"]
    elif cfg.resolution != found.resolution:
        served = cache.served_resolutions
        if cfg.resolution not in served:
            raise CacheMismatchError(
                f"resolution: {cfg.cache} holds r = {found.resolution} maps"
                + (
                    f" of the teacher's {'x'.join(map(str, cache.manifest['teacher_cam_size']))} CAMs"
                    if cache.manifest.get("teacher_cam_size")
                    else ""
                )
                + f" and serves resolution {', '.join(map(str, served))}; got {cfg.resolution}: use one of those, "
                f"or build a cache with --resolution {cfg.resolution}"
            )
        ignore.append("resolution")  # the loss pools the stored maps to cfg.resolution (cat_loss)
    weights_sha = found.teacher_sha256
    if cfg.teacher_weights:
        fs, path = filesystem(cfg.teacher_weights)
        weights_sha = file_sha256(fs.cat_file(path))
    expected = identity_of(
        teacher=cfg.teacher or found.teacher_arch,
        weights_sha=weights_sha,
        index=index,
        split=cfg.train_split,
        # the teacher normalised by its own mean and std (in the cache's spec), the student
        # by its own: both see the same pixels, so those two fields are the cache's to say
        spec=cfg.augment_spec().to_dict() | {key: found.spec.get(key) for key in ("mean", "std")},
        num_views=cfg.num_views if cfg.num_views > 0 else found.num_views,
        resolution=cfg.resolution,
        binarize=cfg.binarize,
        storage=found.storage,
        precision=found.precision,
    )
    cache.check(expected, ignore=tuple(ignore))
    _check_topk_selection(cfg, found)
    return dataclasses.replace(cfg, num_views=found.num_views, teacher=found.teacher_arch)


def _check_topk_selection(cfg: TrainConfig, found: CacheIdentity) -> None:
    """A top-k cache holds the maps of its K highest classes only: CAT over at most K of
    them, the highest first (``select_n`` <= K, strategy top)."""
    kind, k = parse_storage(found.storage)
    if kind != "topk" or cfg.mode not in ("catkd", "cat"):
        return
    if cfg.select_n is not None and cfg.select_n > k:
        raise CacheMismatchError(
            f"select_n: {cfg.select_n} classes asked for, but {cfg.cache} keeps the top {k} per view "
            f"(storage {found.storage}): set select_n <= {k}, or build a cache with storage topk:{cfg.select_n}"
        )
    if cfg.select_strategy != "top":
        raise CacheMismatchError(
            f"select_strategy: {cfg.select_strategy!r} needs the lowest classes' maps, but {cfg.cache} keeps only "
            f"the top {k} per view (storage {found.storage}): use a full cache (storage float16) for it"
        )


RUN_CONFIG = "run_config.json"


def check_resume(cfg: TrainConfig) -> None:
    """Refuse to resume a run under another configuration that changes what it computes
    (student, mode, data, cache, batch, loss weights, ...); say what changed harmlessly
    (epochs extended, loader workers). The first start records the configuration."""
    fs, root = filesystem(cfg.storage_path)
    path = join(root, cfg.name, RUN_CONFIG)
    if fs.exists(path):
        saved = json.loads(fs.cat_file(path))
        refused, allowed = resume_conflicts(saved, cfg)
        if refused:
            field = refused[0]
            raise ResumeError(
                f"{join(cfg.storage_path, cfg.name)}: this run was started with {field}={saved.get(field)!r}, now "
                f"{field}={getattr(cfg, field)!r}"
                f"{f' (and {len(refused) - 1} more: {refused[1:]})' if len(refused) > 1 else ''}; "
                "resuming would mix two runs: choose another name= for a new run"
            )
        if allowed:
            print(
                f"[train] resuming {cfg.name} with changed "
                f"{', '.join(f'{k}={getattr(cfg, k)!r} (was {saved.get(k)!r})' for k in allowed)}"
            )
    write_atomic(fs, path, json.dumps(asdict(cfg), indent=1).encode())


def cpus_per_worker(cfg: TrainConfig) -> int:
    """loader_workers + 1 by default (the loader processes and the training loop), capped
    on a cluster too small for it so that a laptop run still starts; a cpus_per_worker
    that is set is taken as it is (and refused at once where it can never fit)."""
    if cfg.cpus_per_worker:
        return cfg.cpus_per_worker
    wanted = cfg.loader_workers + 1
    available = int(ray.cluster_resources().get("CPU", 1))
    fit = max(1, available // max(1, cfg.num_workers))
    if wanted > fit:
        print(
            f"[train] {cfg.num_workers} workers x {wanted} CPUs do not fit in this Ray cluster's {available} CPUs: "
            f"reserving {fit} per worker"
        )
        return fit
    return wanted


def train(cfg: TrainConfig, callbacks: Sequence[UserCallback] = ()) -> dict[str, Any]:
    """Run (or resume) ``cfg`` on Ray Train; ``callbacks`` are Ray Train's (a sweep's
    trial passes the one that reports each epoch to Tune)."""
    check_location(cfg.storage_path)
    cfg = with_tracking_uri(resolve(cfg))
    check_resume(cfg)
    init_ray(verbose=cfg.verbose)
    storage = cfg.storage_path
    resources = {"CPU": cpus_per_worker(cfg)} | ({"GPU": 1} if cfg.use_gpu else {})
    if cfg.elastic:  # it starts once min_workers fit: only those must ever fit
        check_request_fits(resources, cfg.min_workers, f"catkd train {cfg.name} (elastic, at least min_workers)")
    else:
        check_request_fits(resources, cfg.num_workers, f"catkd train {cfg.name}")
    with Relay(waiting=lambda: _waiting_line(cfg, resources)) as console:
        try:
            result = _fit(cfg, resources, console, callbacks)
        except TrainingFailedError as exc:  # Ray Train V2's fit raises what its workers failed with
            log_run_end(cfg, {}, failed=True)
            raise worker_user_error(exc) from None
    if result.error:
        log_run_end(cfg, {}, failed=True)
        raise worker_user_error(result.error)
    with result.checkpoint.as_directory() as folder:
        state = load_training_state(folder)
    exported = export_student(cfg, state)
    log_run_end(cfg, exported)
    return {"history": state["history"], "exported": exported, "run": join(storage, cfg.name)}


def worker_user_error(error: BaseException) -> BaseException:
    """The bad-input error (a CatkdError) a training worker failed with, as one line, when
    there is one (a damaged cache read by a loader, say); else ``error`` as it is. A
    loader worker's error reaches the rank re-raised by PyTorch with its traceback in the
    message: the line kept is the original error's own."""
    failures = getattr(error, "worker_failures", None) or {}
    for _, failure in sorted(failures.items()):
        failure = user_error(failure)
        if isinstance(failure, CatkdError):
            message = str(failure)
            if "Original Traceback" in message:  # from a DataLoader worker process
                marker = f"{type(failure).__name__}: "
                message = message.rstrip().splitlines()[-1]
                message = message[message.find(marker) + len(marker) :] if marker in message else message
            return type(failure)(message)
    return error


def _waiting_line(cfg: TrainConfig, resources: dict[str, float]) -> str:
    free = {k: v for k, v in ray.available_resources().items() if k in resources}
    wanted = f"at least {cfg.min_workers} (up to {cfg.num_workers})" if cfg.elastic else str(cfg.num_workers)
    return (
        f"[train] {cfg.name}: still waiting for {wanted} worker(s) x {resources}; "
        f"this Ray cluster has {free or 'none of that'} free (other runs may hold it, or an autoscaler is adding nodes)"
    )


def _fit(
    cfg: TrainConfig, resources: dict[str, float], console: Console, callbacks: Sequence[UserCallback] = ()
) -> Result:
    trainer = TorchTrainer(
        train_loop,
        # the driver's hub and tracker settings, for workers started without them
        train_loop_config={"cfg": asdict(cfg), "console": console, "env": hub_env() | tracker_env()},
        scaling_config=_scaling(cfg, resources),
        run_config=RunConfig(
            name=cfg.name,
            storage_path=cfg.storage_path,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            callbacks=list(callbacks),
        ),
    )
    return trainer.fit()


def _scaling(cfg: TrainConfig, resources: dict[str, float]) -> ScalingConfig:
    """A fixed worker group, or an elastic one (Ray Train V2): it starts once min_workers
    fit, asks for num_workers, restarts smaller from the latest checkpoint after a lost
    node and larger when capacity returns (looked for every resize_check_s, which a fixed
    group never does)."""
    return ScalingConfig(
        num_workers=(cfg.min_workers, cfg.num_workers) if cfg.elastic else cfg.num_workers,
        use_gpu=cfg.use_gpu,
        resources_per_worker=resources,
        elastic_resize_monitor_interval_s=cfg.resize_check_s,
    )


def export_student(cfg: TrainConfig, state: dict[str, Any]) -> dict[str, str]:
    """The final student as plain state dicts, loadable without Ray: CAM form (our
    checkpoint format) and classifier form (a Linear head with zero bias)."""
    payload = state["model"]
    model = build_model(payload["arch"], payload["num_classes"])
    model.load_state_dict(payload["state_dict"])
    fs, root = filesystem(cfg.storage_path)
    out = {}
    for name, obj in (("student_cam.pt", payload), ("student_classifier.pt", model.classifier_state_dict())):
        buf = io.BytesIO()
        torch.save(obj, buf)
        path = join(root, cfg.name, name)
        write_atomic(fs, path, buf.getvalue())
        out[name] = path
    return out
