"""The Ray Train worker loop: one loop for teachers and every student mode (DESIGN 7)."""

from __future__ import annotations

import io
import json
import tempfile
import time
from typing import Any

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from catkd.models import CAMClassifier, build_model, load_checkpoint
from pipeline.data.views import AugmentSpec, normalize_batch
from pipeline.data.loader import ReaderConfig, ShardStream, make_loader
from pipeline.storage import filesystem, is_local, join, write_atomic
from pipeline.train.checkpoint import load_training_state, save_training_state, unwrap
from pipeline.train.config import TrainConfig
from pipeline.train.step import live_targets, loss_terms


def _reader(cfg: TrainConfig, split: str, train: bool, rank: int, world: int) -> ShardStream:
    reader_cfg = ReaderConfig(
        data=cfg.data,
        split=split,
        batch_size=cfg.batch_size,
        train=train,
        spec=AugmentSpec.preset(cfg.spec, cfg.spec_seed),
        num_views=cfg.num_views,
        view_offset=cfg.view_offset,
        seed=cfg.seed,
        shuffle_buffer=cfg.shuffle_buffer,
        normalize=False,  # uint8 leaves the loader; normalised on the device
        cache=cfg.cache if train and cfg.mode in ("kd", "catkd", "cat") else None,
    )
    return ShardStream(reader_cfg, rank, world)


def _topk_correct(logits: torch.Tensor, labels: torch.Tensor) -> tuple[int, int]:
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices
    hits = top == labels[:, None]
    return int(hits[:, 0].sum()), int(hits.any(dim=1).sum())


def _all_reduce(values: list[float], device: torch.device) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor.tolist()


def train_loop(config: dict[str, Any]) -> None:
    cfg = TrainConfig(**config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.seed)
    # Subnormal floats make CPU arithmetic orders of magnitude slower (seen here: a
    # CAT-KD epoch slowed from 40 s to minutes once small gradients went subnormal).
    torch.set_flush_denormal(True)
    train_stream = _reader(cfg, cfg.train_split, True, rank, world)
    num_classes = train_stream.index.num_classes
    spec = train_stream.cfg.spec

    model = build_model(cfg.student, num_classes).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=cfg.lr_decay_epochs, gamma=cfg.lr_decay_rate)
    start_epoch, history = 0, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as folder:
            state = load_training_state(folder)
        model.load_state_dict(state["model"]["state_dict"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, history = state["epoch"], state["history"]
    model = ray.train.torch.prepare_model(model)

    teacher: CAMClassifier | None = None
    if cfg.mode == "online-catkd":
        fs, path = filesystem(cfg.teacher_weights)
        teacher = load_checkpoint(io.BytesIO(fs.cat_file(path)), cfg.teacher, num_classes).eval().to(device)

    test_stream = _reader(cfg, cfg.test_split, False, rank, world)
    for epoch in range(start_epoch, cfg.epochs):
        train_stream.set_epoch(epoch)
        metrics = _train_epoch(cfg, model, teacher, train_stream, optimizer, spec, device, rank)
        scheduler.step()
        _use_rank0_buffers(model)
        metrics |= _evaluate(cfg, model, test_stream, spec, device)
        metrics |= {"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"]}
        history.append(metrics)
        with tempfile.TemporaryDirectory() as folder:
            if rank == 0:
                save_training_state(folder, model, optimizer, scheduler, epoch + 1, cfg, history)
                _write_run_logs(cfg, history)
                print(_format(metrics, cfg.epochs), flush=True)
            # report() is a barrier: every rank calls it once per epoch.
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder) if rank == 0 else None)


def _train_epoch(cfg, model, teacher, stream, optimizer, spec, device, rank) -> dict[str, float]:
    model.train()
    loader = make_loader(stream, cfg.loader_workers, pin_memory=device.type == "cuda")
    sums: dict[str, float] = {}
    seen = correct1 = correct5 = 0
    wait = 0.0
    start = last = time.perf_counter()
    for batch in loader:
        now = time.perf_counter()
        wait += now - last
        x = normalize_batch(spec, batch["image"].to(device, non_blocking=True))
        if cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        labels = batch["label"].to(device, non_blocking=True)
        t_cam = batch["t_cam"].to(device) if "t_cam" in batch else None
        t_logits = batch["t_logits"].to(device) if "t_logits" in batch else None
        if teacher is not None:
            t_cam, t_logits = live_targets(cfg, teacher, x)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
            logits, cam = model(x)
        terms = loss_terms(cfg, logits, cam, labels, t_cam, t_logits)
        if not torch.isfinite(terms["loss"]):
            raise FloatingPointError(
                f"rank {rank}: the training loss became non-finite ({ {k: float(v) for k, v in terms.items()} }) at sample ids "
                f"{batch['ids'][:4].tolist()}...; lower lr or beta, or set normalize=true"
            )
        optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        optimizer.step()
        for name, value in terms.items():
            sums[name] = sums.get(name, 0.0) + float(value.detach()) * len(labels)
        c1, c5 = _topk_correct(logits.detach(), labels)
        correct1, correct5, seen = correct1 + c1, correct5 + c5, seen + len(labels)
        last = time.perf_counter()
    elapsed = time.perf_counter() - start
    names = sorted(sums)
    totals = _all_reduce([sums[n] for n in names] + [seen, correct1, correct5, wait, elapsed], device)
    world_seen = totals[len(names)]
    world = max(1, int(dist.get_world_size()) if dist.is_initialized() else 1)
    metrics = {f"train_{n}": totals[i] / world_seen for i, n in enumerate(names)}
    metrics |= {
        "train_top1": 100 * totals[len(names) + 1] / world_seen,
        "train_top5": 100 * totals[len(names) + 2] / world_seen,
        "images_per_s": world_seen / (totals[len(names) + 4] / world),
        "data_wait_fraction": totals[len(names) + 3] / totals[len(names) + 4],
    }
    return metrics


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
def _evaluate(cfg, model, stream, spec, device) -> dict[str, float]:
    model.eval()
    seen = correct1 = correct5 = 0
    for batch in make_loader(stream, cfg.loader_workers):
        logits, _ = unwrap(model)(normalize_batch(spec, batch["image"].to(device)))
        c1, c5 = _topk_correct(logits, batch["label"].to(device))
        correct1, correct5, seen = correct1 + c1, correct5 + c5, seen + len(logits)
    seen, correct1, correct5 = _all_reduce([seen, correct1, correct5], device)
    return {"test_top1": 100 * correct1 / max(seen, 1), "test_top5": 100 * correct5 / max(seen, 1)}


def _format(metrics: dict[str, float], epochs: int) -> str:
    keys = [k for k in metrics if k not in ("epoch", "lr")]
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
