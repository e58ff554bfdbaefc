"""The Ray Train worker loop: one loop for teachers and every student mode (DESIGN 7)."""

from __future__ import annotations

import io
import json
import logging
import os
import tempfile
import time
import warnings
from typing import Any

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from catkd.models import CAMClassifier, load_checkpoint
from catkd.models.pretrained import build_pretrained
from pipeline.cache.reader import TargetCache
from pipeline.console import Console
from pipeline.data.device_render import batch_views
from pipeline.data.host_images import FALLBACK_REASONS, describe_fallbacks
from pipeline.data.loader import ReaderConfig, ShardStream, make_loader
from pipeline.data.views import normalize_batch, renormalize
from pipeline.storage import filesystem, is_local, join, write_atomic
from pipeline.train.checkpoint import load_training_state, save_training_state, unwrap
from pipeline.train.config import ONLINE_MODES, TrainConfig, WorldBatch
from pipeline.train.step import cached_targets, live_targets, loss_terms
from pipeline.train.tracking import open_tracker, run_tags
from pipeline.weights import read_weights


def _reader(
    cfg: TrainConfig,
    split: str,
    train: bool,
    rank: int,
    world: int,
    batch_size: int,
    targets: TargetCache | None = None,
) -> ShardStream:
    reader_cfg = ReaderConfig(
        data=cfg.data,
        split=split,
        batch_size=batch_size,
        train=train,
        spec=cfg.augment_spec(),
        num_views=cfg.num_views,
        view_offset=cfg.view_offset,
        seed=cfg.seed,
        shuffle_buffer=cfg.shuffle_buffer,
        normalize=False,  # uint8 leaves the loader; normalised on the device
        targets=targets,
    )
    return ShardStream(reader_cfg, rank, world)


def _topk_correct(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(top-1 hits, top-5 hits) as a float64 device tensor: no host sync."""
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices
    hits = top == labels[:, None]
    return torch.stack([hits[:, 0].sum(), hits.any(dim=1).sum()]).double()


def _all_reduce(values: list[float], device: torch.device) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor.tolist()


def _quiet_ray_train() -> None:
    """Ray Train's per-report and per-checkpoint INFO lines (every metric, from every
    rank) off; warnings stay. Some of its loggers are named by file path, not module."""
    for name in list(logging.Logger.manager.loggerDict):
        if name.startswith("ray.train") or "/ray/train/" in name:
            logging.getLogger(name).setLevel(logging.WARNING)


def train_loop(config: dict[str, Any]) -> None:
    worker_start = time.perf_counter()
    os.environ.update(config.get("env", {}))  # the driver's hub and tracker settings
    cfg = TrainConfig(**config["cfg"])
    console: Console = config.get("console") or Console()
    if not cfg.verbose:
        _quiet_ray_train()
    # The CPU conv backward gives a 1x1 head weight's gradient (C, D, 1, 1) strides
    # (D, 1, D, D), DDP's bucket (D, 1, 1, 1): the same memory order, so nothing is lost
    # and the warning (once per rank, three lines each) says nothing useful.
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.seed)
    # Subnormal floats make CPU arithmetic orders of magnitude slower (seen here: a
    # CAT-KD epoch slowed from 40 s to minutes once small gradients went subnormal).
    torch.set_flush_denormal(True)
    targets = TargetCache(cfg.cache) if cfg.needs_cache else None
    # The epoch's shard plan and the per-worker batch follow the world size this worker
    # group runs with (an elastic run's changes at each resize); the global batch stays.
    batch = cfg.batch_for(world)
    train_stream = _reader(cfg, cfg.train_split, True, rank, world, batch.per_worker, targets)
    num_classes = train_stream.index.num_classes
    spec = train_stream.cfg.spec

    model = build_pretrained(cfg.student, num_classes).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    peak_lr = cfg.peak_lr * batch.lr_scale
    optimizer = torch.optim.SGD(model.parameters(), lr=peak_lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    # Warm-up, then step decay or cosine (TrainConfig.lr_factor), stepped once per epoch.
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cfg.lr_factor)
    start_epoch, history = 0, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as folder:
            state = load_training_state(folder)
        model.load_state_dict(state["model"]["state_dict"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        _rescale_lr(optimizer, scheduler, peak_lr)  # the checkpoint's was for its own world size
        start_epoch, history = state["epoch"], state["history"]
    if rank == 0:
        _say_start(console, cfg, world, batch, start_epoch, history, bool(checkpoint), device)
    model = ray.train.torch.prepare_model(model)
    if cfg.compile:
        model = torch.compile(model)

    teacher: CAMClassifier | None = None
    if cfg.mode in ONLINE_MODES:
        weights, _ = read_weights(cfg.teacher, cfg.teacher_weights, "teacher_weights")
        teacher = load_checkpoint(io.BytesIO(weights), cfg.teacher, num_classes).eval().to(device)
        if cfg.channels_last:
            teacher = teacher.to(memory_format=torch.channels_last)

    head = targets.head_weight if targets is not None else None  # the features form only
    head_weight = torch.from_numpy(head).to(device) if head is not None else None
    test_stream = _reader(cfg, cfg.test_split, False, rank, world, batch.per_worker)
    # Loader workers persist across epochs; the epoch reaches them through the stream's
    # shared-memory epoch counter (ShardStream.set_epoch).
    train_loader = make_loader(train_stream, cfg.loader_workers, pin_memory=device.type == "cuda")
    test_loader = make_loader(test_stream, cfg.loader_workers)
    tracker = open_tracker(cfg, run_tags(cfg, targets.identity if targets is not None else None)) if rank == 0 else None
    for epoch in range(start_epoch, cfg.epochs):
        train_stream.set_epoch(epoch)
        steps = train_stream.steps_per_epoch(cfg.loader_workers)
        # The first epoch this worker group runs reports when its first batch arrived.
        started = worker_start if epoch == start_epoch else None
        progress = _Progress(console, rank, epoch, cfg.epochs, steps, cfg.name, started)
        lr = optimizer.param_groups[0]["lr"]
        metrics = _train_epoch(
            cfg, model, teacher, train_loader, optimizer, spec, device, rank, progress, head_weight, num_classes
        )
        scheduler.step()
        _use_rank0_buffers(model)
        metrics |= _evaluate(cfg, model, test_loader, spec, device)
        # the learning rate the epoch trained with, and the world it ran on (elastic runs resize)
        metrics |= {"epoch": epoch + 1, "lr": lr, "world_size": world, "global_batch": batch.global_batch}
        history.append(metrics)
        with tempfile.TemporaryDirectory() as folder:
            if rank == 0:
                save_training_state(folder, model, optimizer, scheduler, epoch + 1, cfg, history)
                _write_run_logs(cfg, history)
                if tracker is not None:
                    tracker.log_metrics(metrics, step=epoch + 1)
                console.say(_format(metrics, cfg.epochs))
            # report() is a barrier: every rank calls it once per epoch.
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder) if rank == 0 else None)
    if tracker is not None:
        tracker.end_of_training()


def _rescale_lr(optimizer: torch.optim.Optimizer, scheduler, peak_lr: float) -> None:
    """The schedule's peak learning rate set to ``peak_lr``, at the epoch it stands at
    (a checkpoint made at another world size holds that size's peak)."""
    scheduler.base_lrs = [peak_lr for _ in scheduler.base_lrs]
    factor = scheduler.lr_lambdas[0](scheduler.last_epoch)
    for group in optimizer.param_groups:
        group["lr"] = peak_lr * factor


def _say_start(
    console: Console,
    cfg: TrainConfig,
    world: int,
    batch: WorldBatch,
    start_epoch: int,
    history: list[dict[str, Any]],
    resumed: bool,
    device: torch.device,
) -> None:
    """Rank 0's line as a worker group starts: where training picks up (after a lost
    worker or node, or on a rerun), as a resize when the world size changed since the
    last epoch (one line per resize), and the batch rule where the global batch cannot
    be kept at this size."""
    before = history[-1].get("world_size") if history else None
    if before is not None and before != world:
        why = "workers lost" if world < before else "capacity returned"
        console.say(
            f"[train] {cfg.name}: resized {before} -> {world} workers at epoch {start_epoch + 1} ({why}); "
            f"resuming from epoch {start_epoch}'s checkpoint"
        )
    else:
        started = f"resuming after epoch {start_epoch} of {cfg.epochs}" if resumed else "started"
        console.say(f"[train] {cfg.name}: {world} worker(s) {started}; rank 0 on {device}")
    if not batch.kept:
        console.say(
            f"[train] {cfg.name}: {world} workers cannot share the global batch {cfg.global_batch} evenly: "
            f"{batch.per_worker} per worker (global {batch.global_batch}), learning rate x {batch.lr_scale:.4g}"
        )


# Steps between checks of the device-side non-finite flag (each check is one host sync).
NONFINITE_CHECK_STEPS = 50


def _inputs(
    cfg: TrainConfig, batch: dict[str, torch.Tensor], spec, device: torch.device, fallbacks: np.ndarray | None = None
) -> torch.Tensor:
    """The batch's views on the device (rendered there with the device renderer),
    normalised, in the run's memory format; ``fallbacks`` accumulates the images
    decoded on the host although the decoder is nvjpeg."""
    views, batch_fallbacks = batch_views(spec, batch, device, cfg.data)
    if fallbacks is not None and batch_fallbacks is not None:
        fallbacks += batch_fallbacks
    x = normalize_batch(spec, views)
    return x.contiguous(memory_format=torch.channels_last) if cfg.channels_last else x


class _Progress:
    """A rate line from rank 0 every ``every_s`` seconds within a long epoch, and, in the
    first epoch a worker group runs, one line when its first batch arrives: on object
    storage far away, the start-up (index, cache manifest, first shards) is what a user
    waits through before any rate line."""

    def __init__(
        self,
        console: Console,
        rank: int,
        epoch: int,
        epochs: int,
        steps: int,
        name: str = "",
        worker_start: float | None = None,
        every_s: float = 30.0,
    ) -> None:
        self.console, self.active, self.epoch, self.epochs, self.steps = console, rank == 0, epoch, epochs, steps
        self.name, self.worker_start, self.every_s = name, worker_start, every_s
        self.start = self.last = time.perf_counter()

    def first_batch(self) -> None:
        if self.active and self.worker_start is not None:
            waited = time.perf_counter() - self.worker_start
            self.console.say(f"[train] {self.name}: first batch {waited:.1f} s after the workers started")
            self.worker_start = None

    def step(self, step: int, images: int) -> None:
        now = time.perf_counter()
        if self.active and now - self.last >= self.every_s:
            self.last = now
            self.console.say(
                f"[train] epoch {self.epoch + 1}/{self.epochs}  step {step}/{self.steps}  "
                f"{images / (now - self.start):.0f} images/s on rank 0"
            )


def _train_epoch(
    cfg, model, teacher, loader, optimizer, spec, device, rank, progress: _Progress, head_weight=None, num_classes=None
) -> dict[str, float]:
    """One epoch with no per-step host synchronisation: loss terms and top-1/top-5 counts
    accumulate on the device and are reduced once at the end; a non-finite loss sets a
    device-side flag (with the first bad batch's sample ids), checked every
    NONFINITE_CHECK_STEPS steps and at the end."""
    model.train()
    teacher_spec = cfg.teacher_spec() if teacher is not None else None  # the live teacher's own normalisation
    sums: dict[str, torch.Tensor] = {}
    correct = torch.zeros(2, dtype=torch.float64, device=device)
    bad = torch.zeros((), dtype=torch.bool, device=device)
    bad_ids = torch.full((4,), -1, dtype=torch.int64, device=device)
    seen, wait = 0, 0.0
    fallbacks = np.zeros(len(FALLBACK_REASONS), np.int64)
    start = last = time.perf_counter()
    for step, batch in enumerate(loader):
        wait += time.perf_counter() - last
        if step == 0:
            progress.first_batch()
        x = _inputs(cfg, batch, spec, device, fallbacks)
        labels = batch["label"].to(device, non_blocking=True)
        ce_labels = _mixed_labels(batch, labels, num_classes, device) if "lam" in batch else labels
        t_cam, t_logits, t_classes = cached_targets(batch, device, head_weight, num_classes)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
            if teacher is not None:
                t_cam, t_logits = live_targets(cfg, teacher, renormalize(x, spec, teacher_spec))
            logits, cam = model(x)
        terms = loss_terms(cfg, logits, cam, ce_labels, t_cam, t_logits, t_classes, progress.epoch, labels)
        nonfinite = ~torch.isfinite(terms["loss"].detach())
        ids = torch.nn.functional.pad(batch["ids"][:4], (0, max(0, 4 - len(batch["ids"]))), value=-1).to(
            device, non_blocking=True
        )
        bad_ids = torch.where(nonfinite & ~bad, ids, bad_ids)
        bad |= nonfinite
        if (step + 1) % NONFINITE_CHECK_STEPS == 0:
            _raise_if_nonfinite(bad, bad_ids, rank)
        optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        optimizer.step()
        for name, value in terms.items():
            sums[name] = sums.get(name, 0) + value.detach().double() * len(labels)
        correct += _topk_correct(logits.detach(), labels)
        seen += len(labels)
        progress.step(step + 1, seen)
        last = time.perf_counter()
    _raise_if_nonfinite(bad, bad_ids, rank)
    elapsed = time.perf_counter() - start
    names = sorted(sums)
    device_totals = torch.stack([sums[n] for n in names] + [correct[0], correct[1]]) if names else correct
    totals = _all_reduce(device_totals.tolist() + fallbacks.tolist() + [seen, wait, elapsed], device)
    world_seen = totals[-3]
    host_decoded = np.array(totals[-3 - len(FALLBACK_REASONS) : -3], np.int64)
    world = max(1, int(dist.get_world_size()) if dist.is_initialized() else 1)
    metrics = {f"train_{n}": totals[i] / world_seen for i, n in enumerate(names)}
    metrics |= {
        "train_top1": 100 * totals[len(names)] / world_seen,
        "train_top5": 100 * totals[len(names) + 1] / world_seen,
        "images_per_s": world_seen / (totals[-1] / world),
        "data_wait_fraction": totals[-2] / totals[-1],
        "train_samples": world_seen,  # samples read by all ranks (with the padding that evens their steps)
    }
    if spec.decoder == "nvjpeg":
        metrics["host_decoded"] = float(host_decoded.sum())  # images nvJPEG did not decode
        note = describe_fallbacks(host_decoded, int(world_seen))
        if note and rank == 0:
            progress.console.say(f"[train] epoch {progress.epoch + 1}: {note}")
    return metrics


def _mixed_labels(batch: dict, labels: torch.Tensor, num_classes: int, device: torch.device) -> torch.Tensor:
    """(B, C) soft targets of mixed views: lambda on the sample's label, 1 - lambda on its
    partner's; cross-entropy against them is lambda CE(y) + (1 - lambda) CE(y_b)."""
    lam = batch["lam"].to(device, non_blocking=True)[:, None]
    partner = batch["label_b"].to(device, non_blocking=True)
    one_hot = torch.nn.functional.one_hot
    return lam * one_hot(labels, num_classes).float() + (1 - lam) * one_hot(partner, num_classes).float()


def _raise_if_nonfinite(bad: torch.Tensor, bad_ids: torch.Tensor, rank: int) -> None:
    if bool(bad):  # one host sync
        raise FloatingPointError(
            f"rank {rank}: the training loss became non-finite at sample ids "
            f"{[i for i in bad_ids.tolist() if i >= 0]}...; lower lr or beta, or set normalize=true"
        )


@torch.no_grad()
def _use_rank0_buffers(model: torch.nn.Module) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics). DDP broadcasts
    them only at the start of each training forward, after which each rank updates its
    own; without this, each rank would evaluate its part of the test set with other
    statistics than the model rank 0 exports, and the reported top-1 would not be the
    exported model's."""
    if dist.is_available() and dist.is_initialized():
        for buffer in unwrap(model).buffers():
            dist.broadcast(buffer, src=0)


@torch.no_grad()
def _evaluate(cfg, model, loader, spec, device) -> dict[str, float]:
    """Test top-1/top-5 in the run's precision and memory format; counts stay on the device."""
    model.eval()
    seen, correct = 0, torch.zeros(2, dtype=torch.float64, device=device)
    for batch in loader:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
            logits, _ = unwrap(model)(_inputs(cfg, batch, spec, device))
        correct += _topk_correct(logits.float(), batch["label"].to(device, non_blocking=True))
        seen += len(batch["label"])
    seen, correct1, correct5 = _all_reduce([seen, *correct.tolist()], device)
    return {"test_top1": 100 * correct1 / max(seen, 1), "test_top5": 100 * correct5 / max(seen, 1)}


def _format(metrics: dict[str, float], epochs: int) -> str:
    keys = [k for k in metrics if k not in ("epoch", "lr", "world_size", "global_batch")]
    return f"[train] epoch {metrics['epoch']}/{epochs}  " + "  ".join(f"{k} {metrics[k]:.4g}" for k in keys)


def _write_run_logs(cfg: TrainConfig, history: list[dict[str, float]]) -> None:
    """metrics.jsonl (rewritten from the checkpointed history: no duplicates after a
    restart) and TensorBoard events (local storage only)."""
    fs, root = filesystem(cfg.storage_path)
    run = join(root, cfg.name)
    write_atomic(fs, join(run, "metrics.jsonl"), "".join(json.dumps(m) + "\n" for m in history).encode())
    if is_local(fs):
        from torch.utils.tensorboard import SummaryWriter

        with SummaryWriter(join(run, "tensorboard")) as writer:
            latest = history[-1]
            for key, value in latest.items():
                if key != "epoch" and np.isfinite(value):
                    writer.add_scalar(key, value, int(latest["epoch"]))
