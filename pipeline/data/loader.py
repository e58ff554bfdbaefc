"""Streaming reader over WebDataset shards for one rank and its DataLoader workers.

Each DataLoader worker builds whole batches (decode, view, collate) so per-sample
Python work stays small; the DataLoader runs with ``batch_size=None``. A training
batch is a dict: ``ids`` (B,), ``image`` (B, 3, H, W), ``label`` (B,), ``params``
(B, P) the view parameters, ``view`` the view index of this epoch, and for a mixing
spec ``label_b`` (B,) the partners' labels and ``lam`` (B,) each view's own share; targets cached for
the teacher are joined to these ids, one read per shard and view, and travel in their
stored form (``t_logits``, ``t_cam`` [+ ``t_cam_scale``] or ``t_features``) to be
decoded on the training device.

The data plane knows nothing of how targets are stored: a ``TargetReader`` (the cache's
``TargetCache`` is one) is handed in, and the loader only joins what it returns by id.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.data.order import WorkerPlan, epoch_plan, eval_plan
from pipeline.data.partners import pack_for_device, partner_samples, shard_mix_source
from pipeline.data.shard_format import Sample, ShardError, ShardIndex, decode_image, load_shard, read_index
from pipeline.data.views import AugmentSpec, eval_transform, mix_of, normalize_batch, render_views
from pipeline.storage import join


class TargetReader(Protocol):
    """Per-shard teacher targets: ``read(j, view, decode=False)`` gives data shard j's
    ``ids`` (n,), ``params`` (n, P) and target arrays of that view, in their stored form.
    Picklable: it travels to the DataLoader's worker processes."""

    url: str

    def read(self, j: int, view: int, decode: bool = True) -> dict[str, np.ndarray]: ...


@dataclass
class ReaderConfig:
    data: str  # URL of the shards folder
    split: str = "train"
    batch_size: int = 128
    train: bool = True  # False: evaluation views, natural order, no padding
    spec: AugmentSpec = field(default_factory=AugmentSpec)
    num_views: int = 1  # S: epoch e uses view (e + view_offset) mod S; 0: a new view every epoch
    view_offset: int = 0
    seed: int = 0  # run seed: shard order and shuffling
    shuffle_buffer: int = 2048  # samples pooled across consecutive shards before shuffling
    normalize: bool = True  # float with the spec's mean/std; False: uint8 (normalise on device)
    targets: TargetReader | None = None  # teacher targets to join to the samples (training only)


class ShardStream(IterableDataset):
    def __init__(self, cfg: ReaderConfig, rank: int = 0, world_size: int = 1) -> None:
        super().__init__()
        self.cfg = cfg
        self.rank, self.world_size = rank, world_size
        # Shared memory: DataLoader workers that persist across epochs see set_epoch.
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        self.index: ShardIndex = read_index(cfg.data, cfg.split)

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        self._epoch.fill_(epoch)

    @property
    def view(self) -> int:
        if self.cfg.num_views <= 0:  # no fixed set of views (no cache): plain augmentation
            return self.epoch + self.cfg.view_offset
        return (self.epoch + self.cfg.view_offset) % self.cfg.num_views

    def plan(self, num_workers: int) -> list[list[WorkerPlan]]:
        sizes = [s.count for s in self.index.shards]
        return epoch_plan(sizes, self.world_size, num_workers, self.cfg.batch_size, self.cfg.seed, self.epoch)

    def steps_per_epoch(self, num_workers: int) -> int:
        """Training batches every rank yields this epoch (the same for all ranks)."""
        return sum(w.batches for w in self.plan(max(num_workers, 1))[self.rank])

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        if info:
            torch.set_num_threads(1)  # workers are processes already; threads would oversubscribe
        if not self.cfg.train:
            yield from self._eval_batches(
                eval_plan(len(self.index.shards), self.world_size, num_workers)[self.rank][worker]
            )
            return
        plan = self.plan(num_workers)[self.rank][worker]
        needed = plan.batches * self.cfg.batch_size
        batch: list[Sample] = []
        emitted = 0
        while emitted < needed:  # a second pass over the stream supplies the repeats
            for sample in self._shuffled(plan.shards, worker):
                batch.append(sample)
                emitted += 1
                if len(batch) == self.cfg.batch_size:
                    yield self._train_batch(batch)
                    batch = []
                if emitted == needed:
                    break

    def _samples(self, shards: tuple[int, ...]) -> Iterator[Sample]:
        for j in shards:
            samples = load_shard(self.cfg.data, self.index, self.index.shards[j])
            if self.cfg.targets is not None and self.cfg.train:
                self._join_targets(j, samples)
            if self.cfg.train and self.cfg.spec.mixes:  # each sample keeps its shard: its partner is there
                for sample in samples:
                    sample.shard = samples
            yield from samples

    def _join_targets(self, j: int, samples: list[Sample]) -> None:
        """One read of shard j's targets for this epoch's view, joined by id."""
        stored = self.cfg.targets.read(j, self.view, decode=False)  # stored form: decoded on the training device
        ids = np.array([s.id for s in samples])
        if not np.array_equal(stored["ids"], ids):
            bad = int(np.argmax(stored["ids"] != ids)) if len(ids) == len(stored["ids"]) else 0
            raise ShardError(
                f"{self.cfg.targets.url}: data shard {j}: cached ids do not match {self.index.shards[j].name} "
                f"(first at position {bad})"
            )
        fields = [name for name in stored if name != "ids"]
        for k, sample in enumerate(samples):
            sample.target = {name: stored[name][k] for name in fields}

    def _shuffled(self, shards: tuple[int, ...], worker: int) -> Iterator[Sample]:
        """A shuffle buffer across consecutive shards, seeded by (seed, epoch, rank, worker)."""
        rng = np.random.default_rng([self.cfg.seed, self.epoch, self.rank, worker])
        pool: list[Sample] = []
        for sample in self._samples(shards):
            pool.append(sample)
            if len(pool) >= self.cfg.shuffle_buffer:
                k = int(rng.integers(len(pool)))
                pool[k], pool[-1] = pool[-1], pool[k]
                yield pool.pop()
        rng.shuffle(pool)
        yield from pool

    @property
    def _targets_url(self) -> str:
        return self.cfg.targets.url if self.cfg.targets is not None else ""

    @property
    def _source(self) -> str:
        """What decoding errors name: the split's shards."""
        return join(self.cfg.data, f"{self.cfg.split} shards")

    def _decode(self, samples: list[Sample]) -> list[np.ndarray]:
        return [decode_image(s, self.index.image_shape, self._source) for s in samples]

    def _train_batch(self, samples: list[Sample]) -> dict[str, torch.Tensor]:
        """One training batch. With the cpu renderer its views are rendered here; with the
        device renderer the batch carries the packed images (``host_images.pack``) and
        their view parameters, and the training loop renders them on its device."""
        ids = np.array([s.id for s in samples], np.int64)
        cached = samples[0].target is not None
        stored = np.stack([s.target["params"] for s in samples]) if cached else None
        spec = self.cfg.spec
        # a mixing view's partner replays its own stored view of the same index, or draws it
        partner_stored = (lambda partner: partner.target["params"]) if cached else None
        shards = [s.shard for s in samples] if spec.mixes else None
        if spec.renderer == "device":  # a mixing batch's missing partners travel with it: the device mixes
            packed = pack_for_device(
                spec,
                samples,
                shards,
                self.view,
                self.index.image_shape,
                self._source,
                stored,
                partner_stored,
                self._targets_url,
            )
            params = packed["params"]
            batch = self._collate(samples, None, params) | {name: torch.from_numpy(a) for name, a in packed.items()}
        else:
            mixing = None
            if spec.mixes:
                mixing = shard_mix_source(shards, self.index.image_shape, self._source, partner_stored)
            params, views = render_views(
                spec, self._decode(samples), ids, self.view, stored, self._targets_url, mixing=mixing
            )
            batch = self._collate(samples, views, params)
        if spec.mixes:  # the labels mix as the pixels do: lambda of the sample's own, the rest its partner's
            batch["label_b"] = torch.tensor([p.label for p in partner_samples(spec, shards, params)])
            batch["lam"] = torch.from_numpy(mix_of(spec, params)[1].astype(np.float32))
        if cached:  # t_logits, t_cam (and t_cam_scale for int8), or t_features: as stored
            for name in samples[0].target:
                if name != "params":
                    batch[f"t_{name}"] = torch.from_numpy(np.stack([s.target[name] for s in samples]))
        return batch

    def _eval_batches(self, shards: tuple[int, ...]) -> Iterator[dict[str, torch.Tensor]]:
        batch: list[Sample] = []
        for sample in self._samples(shards):
            batch.append(sample)
            if len(batch) == self.cfg.batch_size:
                yield self._collate(batch, eval_transform(self.cfg.spec, self._decode(batch)), None)
                batch = []
        if batch:
            yield self._collate(batch, eval_transform(self.cfg.spec, self._decode(batch)), None)

    def _collate(
        self, samples: list[Sample], images: torch.Tensor | None, params: np.ndarray | None
    ) -> dict[str, torch.Tensor]:
        out = {
            "ids": torch.tensor([s.id for s in samples], dtype=torch.int64),
            "label": torch.tensor([s.label for s in samples], dtype=torch.int64),
            "view": torch.tensor(self.view if params is not None else -1),
        }
        if images is not None:  # None: packed images for the device renderer
            out["image"] = normalize_batch(self.cfg.spec, images) if self.cfg.normalize else images
        if params is not None:
            out["params"] = torch.from_numpy(params)
        if self.index.has_boxes:
            out["box"] = torch.tensor([s.box for s in samples], dtype=torch.int64)
        return out


def make_loader(stream: ShardStream, num_workers: int = 2, pin_memory: bool = False) -> DataLoader:
    """Worker processes persist across epochs (no start-up per epoch); each iteration
    reads the stream's current epoch from shared memory."""
    return DataLoader(
        stream,
        batch_size=None,
        num_workers=num_workers,
        pin_memory=pin_memory,
        prefetch_factor=4 if num_workers else None,
        persistent_workers=num_workers > 0,
    )
