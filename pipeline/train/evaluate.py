"""``catkd eval CHECKPOINT --data URL``: top-1/top-5 of a model on a split."""

from __future__ import annotations

import io

import torch

from catkd.errors import ConfigError
from catkd.models import load_checkpoint, read_checkpoint
from pipeline.data.loader import ReaderConfig, ShardStream, make_loader
from pipeline.data.views import AugmentSpec, normalize_batch
from pipeline.storage import filesystem


@torch.no_grad()
def evaluate_checkpoint(
    checkpoint: str,
    data: str,
    *,
    split: str = "test",
    arch: str | None = None,
    spec: str = "cifar",
    batch_size: int = 256,
    device: str | None = None,
    loader_workers: int = 2,
) -> dict[str, float]:
    fs, path = filesystem(checkpoint)
    try:
        raw = fs.cat_file(path)
    except FileNotFoundError:
        raise ConfigError(f"{checkpoint}: no such checkpoint") from None
    info = read_checkpoint(_named(raw, checkpoint))
    arch = arch or info["arch"]
    if arch is None:
        raise ConfigError(f"{checkpoint}: the checkpoint does not name its architecture; pass --arch")
    stream = ShardStream(
        ReaderConfig(
            data=data, split=split, batch_size=batch_size, train=False, spec=AugmentSpec.preset(spec), normalize=False
        )
    )
    model = load_checkpoint(_named(raw, checkpoint), arch, stream.index.num_classes)
    target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = model.eval().to(target)
    seen = top1 = top5 = 0
    for batch in make_loader(stream, loader_workers):
        logits, _ = model(normalize_batch(stream.cfg.spec, batch["image"].to(target)))
        labels = batch["label"].to(target)
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices == labels[:, None]
        top1, top5, seen = top1 + int(top[:, 0].sum()), top5 + int(top.any(1).sum()), seen + len(labels)
    return {"top1": 100 * top1 / seen, "top5": 100 * top5 / seen, "samples": seen, "arch": arch, "device": str(target)}


def _named(raw: bytes, name: str) -> io.BytesIO:
    """The checkpoint's bytes, named for error messages."""
    buf = io.BytesIO(raw)
    buf.name = name
    return buf
