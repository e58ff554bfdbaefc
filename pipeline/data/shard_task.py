"""The work of one ``catkd shard`` task, free of Ray: read a slice of the source,
validate (and optionally shrink) each image, write one shard atomically, then its
completion record. ``pipeline.data.shard_writer`` runs it as Ray tasks;
``bench/gpu_check.py`` runs it in a process pool on a machine without Ray.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np

from pipeline.data.shard_format import (
    PROGRESS_DIR,
    RAW_FORMAT,
    Sample,
    ShardError,
    ShardInfo,
    decode_image,
    encode_shard,
    offsets_path,
    sample_key,
    sample_offsets,
    shard_name,
)
from pipeline.data.sources import Record, SourceError, SourceSlice
from pipeline.storage import filesystem, join, write_atomic

Encoding = Literal["keep", "raw"]


@dataclass(frozen=True)
class ShardTask:
    """What one Ray task needs to write one shard: its entries and how to store them."""

    split: str
    j: int
    first: int
    entries: SourceSlice
    out: str
    encoding: Encoding
    num_classes: int
    digest: str
    max_short_side: int | None
    jpeg_quality: int


def etag(stat: dict[str, Any]) -> str | None:
    tag = stat.get("ETag") or stat.get("etag")
    return str(tag).strip('"') if tag else None


def _shrink(pixels: np.ndarray, max_short_side: int) -> np.ndarray:
    """Resize (antialiased) so that the shorter side is ``max_short_side``."""
    import torch
    from torchvision.transforms.v2 import functional as TF

    tensor = torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1)
    return TF.resize(tensor, max_short_side, antialias=True).permute(1, 2, 0).contiguous().numpy()


def _jpeg(pixels: np.ndarray, quality: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _to_sample(record: Record, sample_id: int, task: ShardTask) -> tuple[Sample, tuple[int, int]]:
    """Validate one record and turn it into the sample the shard stores: decoded once to
    check it, resized when it is larger than ``max_short_side``, raw when asked."""
    key = sample_key(sample_id)
    if not 0 <= record.label < task.num_classes:
        raise SourceError(f"{record.origin}: sample {key}: label {record.label} outside 0..{task.num_classes - 1}")
    if isinstance(record.image, np.ndarray):
        pixels, sample = record.image, Sample(sample_id, record.label, b"", RAW_FORMAT, record.box)
    else:
        sample = Sample(sample_id, record.label, record.image, record.fmt, record.box)
        try:
            pixels = decode_image(sample, None, record.origin)
        except ShardError as exc:
            raise SourceError(str(exc)) from None
    if pixels.ndim != 3 or pixels.shape[2] != 3 or pixels.dtype != np.uint8:
        raise SourceError(
            f"{record.origin}: sample {key}: pixels of shape {pixels.shape} {pixels.dtype}, expected (H, W, 3) uint8"
        )
    if task.max_short_side is not None and min(pixels.shape[:2]) > task.max_short_side:
        if record.box is not None:
            raise SourceError(
                f"{record.origin}: sample {key}: resizing would invalidate its object box; shard it without "
                "--max-short-side"
            )
        pixels = _shrink(pixels, task.max_short_side)
        sample.image, sample.fmt = _jpeg(pixels, task.jpeg_quality), "jpg"
    if task.encoding == "raw" or sample.fmt == RAW_FORMAT:
        sample.image, sample.fmt = np.ascontiguousarray(pixels).tobytes(), RAW_FORMAT
    return sample, pixels.shape[:2]


def write_shard(task: ShardTask) -> dict[str, Any]:
    samples, shapes = [], set()
    for offset, record in enumerate(task.entries.read()):
        sample, shape = _to_sample(record, task.first + offset, task)
        samples.append(sample)
        shapes.add(shape)
    data = encode_shard(samples)
    name = shard_name(task.split, task.j)
    fs, root = filesystem(task.out)
    write_atomic(fs, join(root, name), data)
    info = ShardInfo(
        name=name, first_id=task.first, count=len(samples), bytes=len(data), sha256=hashlib.sha256(data).hexdigest()
    )
    record = {
        "j": task.j,
        "settings": task.digest,
        "info": asdict(info),
        "etag": etag(fs.info(join(root, name))),
        "formats": sorted({s.fmt for s in samples}),
        "shapes": sorted(shapes),
        "has_boxes": all(s.box is not None for s in samples),
    }
    # each sample's byte range, for readers of a few samples (verify); before the record,
    # which says the shard is complete
    write_atomic(fs, offsets_path(root, info), sample_offsets(data, name).astype("<i8").tobytes())
    write_atomic(fs, join(root, PROGRESS_DIR, f"{name}.json"), json.dumps(record).encode())
    return record
