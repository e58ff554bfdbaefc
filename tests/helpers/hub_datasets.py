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
