"""ImageNet in the forms it ships in, made small: WebDataset shards laid out as timm's
converter writes them (``imagenet1k-SPLIT-NNNN.tar``, each sample ``__key__``, ``.jpg``,
``.cls`` and ``.json`` with ``label``, ``width``, ``height``, ``filename``, and an
``_info.json``). Each returns what a reader must find, in source order."""

from __future__ import annotations

import io
import json
import os
import tarfile
from dataclasses import dataclass

import numpy as np
from PIL import Image


@dataclass
class SourceSample:
    image: bytes
    label: int
    origin: str  # the file it is in and its key


def shard_in_threads(source: str, out: str, samples_per_shard: int, **options) -> dict:
    """``catkd shard`` of ``source`` into ``out`` with a local thread pool (no Ray)."""
    from concurrent.futures import ThreadPoolExecutor

    from pipeline.data.shard_writer import ShardConfig, shard_dataset

    config = ShardConfig(source, out, samples_per_shard=samples_per_shard, progress=False, **options)
    with ThreadPoolExecutor(4) as pool:
        return shard_dataset(config, pool)


def jpeg(rng: np.random.Generator, side: int = 12) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (side, side + 2, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_wds(
    folder: str,
    splits: dict[str, int],
    *,
    num_classes: int = 7,
    per_shard: int = 5,
    prefix: str = "imagenet1k",
    info: str | None = "_info.json",
    seed: int = 0,
) -> dict[str, list[SourceSample]]:
    """``splits``: samples per split. Labels cycle through the classes in a shuffled
    order, as timm's shards are shuffled."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    expected: dict[str, list[SourceSample]] = {}
    layout = {}
    for split, count in splits.items():
        labels = rng.permutation(np.arange(count) % num_classes)
        names, lengths = [], []
        expected[split] = []
        for s, first in enumerate(range(0, count, per_shard)):
            name = f"{prefix}-{split}-{s:04d}.tar"
            names.append(name)
            lengths.append(min(per_shard, count - first))
            with tarfile.open(os.path.join(folder, name), "w") as tar:
                for i in range(first, first + lengths[-1]):
                    key = f"{split}_{i:08d}"
                    image, label = jpeg(rng), int(labels[i])
                    meta = {"label": label, "width": 14, "height": 12, "filename": f"n{label:08d}_{i}.JPEG"}
                    _member(tar, f"{key}.jpg", image)
                    _member(tar, f"{key}.cls", str(label).encode())
                    _member(tar, f"{key}.json", json.dumps(meta).encode())
                    expected[split].append(SourceSample(image, label, f"{name}:{key}"))
        layout[split] = {"name": split, "filenames": names, "shard_lengths": lengths, "num_samples": count}
    if info:
        with open(os.path.join(folder, info), "w") as f:
            json.dump({"name": prefix, "splits": layout}, f)
    return expected


def write_hf_parquet(
    folder: str,
    splits: dict[str, int],
    *,
    num_classes: int = 7,
    files_per_split: int = 2,
    row_group_size: int = 4,
    seed: int = 0,
) -> dict[str, list[SourceSample]]:
    """Hugging Face's layout (``train-00000-of-00002.parquet``, ...) with its schema:
    ``image`` a ``{"bytes", "path"}`` struct, ``label`` an int64 ClassLabel whose names
    are in the ``huggingface`` schema metadata; several row groups a file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    names = [f"n{c:08d}" for c in range(num_classes)]
    features = {"image": {"_type": "Image"}, "label": {"names": names, "_type": "ClassLabel"}}
    schema = pa.schema(
        [("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])), ("label", pa.int64())],
        metadata={"huggingface": json.dumps({"info": {"features": features}})},
    )
    expected: dict[str, list[SourceSample]] = {}
    for split, count in splits.items():
        labels = rng.permutation(np.arange(count) % num_classes)
        bounds = np.linspace(0, count, files_per_split + 1).astype(int)
        expected[split] = []
        for f in range(files_per_split):
            name = f"{split}-{f:05d}-of-{files_per_split:05d}.parquet"
            rows = []
            for i in range(bounds[f], bounds[f + 1]):
                image, label = jpeg(rng), int(labels[i])
                rows.append({"image": {"bytes": image, "path": f"{names[label]}_{i}.JPEG"}, "label": label})
                expected[split].append(SourceSample(image, label, f"{name}:row {i - bounds[f]}"))
            table = pa.Table.from_pylist(rows, schema=schema)
            pq.write_table(table, os.path.join(folder, name), row_group_size=row_group_size)
    return expected


COMMIT = "0123456789abcdef0123456789abcdef01234567"


def put_in_hf_cache(cache: str, repo: str, files: dict[str, bytes]) -> str:
    """Lay ``files`` out as huggingface_hub's cache holds a repo's main revision; returns
    the snapshot folder."""
    folder = os.path.join(cache, f"models--{repo.replace('/', '--')}")
    snapshot = os.path.join(folder, "snapshots", COMMIT)
    os.makedirs(snapshot, exist_ok=True)
    os.makedirs(os.path.join(folder, "refs"), exist_ok=True)
    with open(os.path.join(folder, "refs", "main"), "w") as f:
        f.write(COMMIT)
    for name, data in files.items():
        with open(os.path.join(snapshot, name), "wb") as f:
            f.write(data)
    return snapshot


def timm_repo_files(architecture: str, num_classes: int, seed: int = 0, **config) -> dict[str, bytes]:
    """A timm model's Hugging Face repo (``config.json``, ``model.safetensors``) with
    random weights: the files timm's own hub export writes."""
    import tempfile

    import timm
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    model = timm.create_model(architecture, num_classes=num_classes)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.safetensors")
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
        weights = open(path, "rb").read()
    meta = {"architecture": architecture, "num_classes": num_classes} | config
    return {"config.json": json.dumps(meta).encode(), "model.safetensors": weights}


def wandb_history(path: str) -> list[dict[str, str]]:
    """The history rows (``wandb.log`` calls) of an offline run's ``run-ID.wandb`` file,
    values as W&B's JSON text. The file is LevelDB's log format (32 KiB blocks of chunks:
    crc32, length, type; full records or first/middle/last pieces) after a 7-byte
    header; each record a ``wandb_internal_pb2.Record``."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data = open(path, "rb").read()
    assert data[:4] == b":W&B", f"{path}: not a W&B run file"
    records, pending, position, block = [], b"", 7, 32768
    while position + 7 <= len(data):
        if block - position % block < 7:  # the block's tail is padding
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        chunk = data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind == 0 and length == 0:
            continue
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            records.append(pending)
    rows = []
    for raw in records:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or ".".join(item.nested_key): item.value_json for item in record.history.item})
    return rows
