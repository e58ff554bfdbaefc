"""Datasets that ``catkd shard`` reads: ``imagefolder:PATH``, ``cifar10:PATH``,
``cifar100:PATH`` and ``synthetic:shapes``.

A source gives, per split, its class names, its sample count and ``read(split, start,
count)``: the records with ids start..start+count-1 in sorted source order (DESIGN
section 4). ``read`` runs inside the Ray tasks that write shards, so a source is a
small picklable object that opens its files lazily.
"""

from __future__ import annotations

import os
import pickle
import tarfile
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

from pipeline.data import synthetic
from pipeline.data.shard_format import sample_key

IMAGE_EXTENSIONS = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".bmp": "bmp", ".gif": "gif", ".webp": "webp", ".tif": "tiff", ".tiff": "tiff", ".ppm": "ppm"}


class SourceError(ValueError):
    """A source that cannot be read; the message names the file or folder."""


@dataclass
class Record:
    image: bytes | np.ndarray  # encoded file bytes, or (H, W, 3) uint8 pixels
    fmt: str  # "jpg", "png", ... or "rgb" for pixels
    label: int
    origin: str  # where it came from, for error messages
    box: tuple[int, int, int, int] | None = None


class Source:
    spec: str

    def splits(self) -> list[str]:
        raise NotImplementedError

    def classes(self, split: str) -> list[str]:
        raise NotImplementedError

    def size(self, split: str) -> int:
        raise NotImplementedError

    def read(self, split: str, start: int, count: int) -> list[Record]:
        raise NotImplementedError

    def settings(self) -> dict[str, Any]:
        """What identifies this source's content in an index."""
        return {"source": self.spec}


# ---------------------------------------------------------------- image folders


def _split_layout(names: list[str], origin: str) -> dict[str, dict[str, list[str]]]:
    """``<split>/<class>/<image>`` relative paths -> {split: {class: [paths...]}}."""
    layout: dict[str, dict[str, list[str]]] = {}
    for name in names:
        parts = name.strip("/").split("/")
        if len(parts) != 3:
            continue
        split, cls, file = parts
        if os.path.splitext(file)[1].lower() in IMAGE_EXTENSIONS:
            layout.setdefault(split, {}).setdefault(cls, []).append(name.strip("/"))
    if not layout:
        raise SourceError(f"{origin}: no images laid out as <split>/<class>/<image>")
    return layout


@dataclass
class ImageFolderSource(Source):
    """A directory, or a .tar / .tar.gz archive, laid out as ``<split>/<class>/<image>``.

    An archive is read in one streaming pass into memory when the source is opened
    (fine for CIFAR-sized data; extract very large archives and pass the directory).
    """

    path: str
    _members: dict[str, bytes] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.spec = f"imagefolder:{self.path}"
        if not os.path.exists(self.path):
            raise SourceError(f"{self.path}: source path does not exist")
        if self.is_archive and self._members is None:
            self._members = self._read_archive()

    @property
    def is_archive(self) -> bool:
        return os.path.isfile(self.path)

    def _read_archive(self) -> dict[str, bytes]:
        members = {}
        try:
            with tarfile.open(self.path, mode="r:*") as tar:
                for member in tar:
                    if member.isfile() and os.path.splitext(member.name)[1].lower() in IMAGE_EXTENSIONS:
                        members[member.name.strip("/").removeprefix("./")] = tar.extractfile(member).read()
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise SourceError(f"{self.path}: cannot read archive ({exc})") from exc
        return members

    @cached_property
    def layout(self) -> dict[str, dict[str, list[str]]]:
        if self._members is not None:
            names = list(self._members)
        else:
            names = []
            for split in sorted(os.listdir(self.path)):
                split_dir = os.path.join(self.path, split)
                if not os.path.isdir(split_dir):
                    continue
                for cls in sorted(os.listdir(split_dir)):
                    cls_dir = os.path.join(split_dir, cls)
                    if not os.path.isdir(cls_dir):
                        continue
                    files = [f for f in os.listdir(cls_dir) if os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS]
                    if not files:
                        raise SourceError(f"{cls_dir}: empty class folder (no images)")
                    names += [f"{split}/{cls}/{f}" for f in files]
        layout = _split_layout(names, self.path)
        for split in layout:
            for cls in layout[split]:
                layout[split][cls].sort()
        return layout

    def splits(self) -> list[str]:
        return sorted(self.layout)

    def classes(self, split: str) -> list[str]:
        # Every split shares the union of class names, so label i means the same class everywhere.
        names = sorted({cls for s in self.layout.values() for cls in s})
        missing = [c for c in names if c not in self.layout[split]]
        if missing:
            raise SourceError(f"{os.path.join(self.path, split, missing[0])}: empty class folder (no images)")
        return names

    @cached_property
    def _ordered(self) -> dict[str, list[tuple[str, int]]]:
        ordered = {}
        for split in self.layout:
            classes = self.classes(split)
            ordered[split] = [(name, label) for label, cls in enumerate(classes) for name in self.layout[split][cls]]
        return ordered

    def size(self, split: str) -> int:
        return len(self._ordered[split])

    def read(self, split: str, start: int, count: int) -> list[Record]:
        records = []
        for name, label in self._ordered[split][start : start + count]:
            fmt = IMAGE_EXTENSIONS[os.path.splitext(name)[1].lower()]
            if self._members is not None:
                data, origin = self._members[name], f"{self.path}:{name}"
            else:
                origin = os.path.join(self.path, name)
                with open(origin, "rb") as f:
                    data = f.read()
            records.append(Record(data, fmt, label, origin))
        return records

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("layout", None)
        return state


# ---------------------------------------------------------------- CIFAR pickles


@dataclass
class CifarSource(Source):
    """The python-pickle layout torchvision reads: ``cifar-10-batches-py`` or ``cifar-100-python``."""

    path: str
    num_classes: int  # 10 or 100

    def __post_init__(self) -> None:
        self.spec = f"cifar{self.num_classes}:{self.path}"
        folder = "cifar-10-batches-py" if self.num_classes == 10 else "cifar-100-python"
        # Accept the dataset folder itself or its parent (torchvision's root).
        self.root = self.path if not os.path.isdir(os.path.join(self.path, folder)) else os.path.join(self.path, folder)
        if not os.path.isdir(self.root):
            raise SourceError(f"{self.path}: source path does not exist")

    def _files(self, split: str) -> list[str]:
        if self.num_classes == 10:
            names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
        else:
            names = [split]
        return [os.path.join(self.root, n) for n in names]

    def _load(self, path: str) -> dict[str, Any]:
        if not os.path.isfile(path):
            raise SourceError(f"{path}: missing CIFAR file")
        try:
            with open(path, "rb") as f:
                return pickle.load(f, encoding="latin1")
        except Exception as exc:
            raise SourceError(f"{path}: not a CIFAR pickle ({exc})") from exc

    def _split_arrays(self, split: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """(images (N, 32, 32, 3), labels, origins) of one split, loaded once per process."""
        cache = self.__dict__.setdefault("_loaded", {})
        if split not in cache:
            label_key = "labels" if self.num_classes == 10 else "fine_labels"
            images, labels, origins = [], [], []
            for path in self._files(split):
                batch = self._load(path)
                data = np.asarray(batch["data"], np.uint8)
                if data.ndim != 2 or data.shape[1] != 3072:
                    raise SourceError(f"{path}: data has shape {data.shape}, expected (N, 3072)")
                images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
                labels.append(np.asarray(batch[label_key], np.int64))
                origins += [f"{path}[{i}]" for i in range(len(data))]
            cache[split] = (np.concatenate(images), np.concatenate(labels), origins)
        return cache[split]

    def splits(self) -> list[str]:
        return ["train", "test"]

    def classes(self, split: str) -> list[str]:
        meta_name, key = ("batches.meta", "label_names") if self.num_classes == 10 else ("meta", "fine_label_names")
        return list(self._load(os.path.join(self.root, meta_name))[key])

    def size(self, split: str) -> int:
        return len(self._split_arrays(split)[1])

    def read(self, split: str, start: int, count: int) -> list[Record]:
        images, labels, origins = self._split_arrays(split)
        return [Record(np.ascontiguousarray(images[i]), "rgb", int(labels[i]), origins[i]) for i in range(start, start + count)]

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_loaded", None)  # each task loads only the split it reads
        return state


# ---------------------------------------------------------------- synthetic


@dataclass
class ShapesSource(Source):
    """``synthetic:shapes``: generated from (seed, id); see ``pipeline.data.synthetic``."""

    image_size: int = 32
    train_samples: int = 5000
    test_samples: int = 1000
    seed: int = 0

    def __post_init__(self) -> None:
        self.spec = "synthetic:shapes"

    def settings(self) -> dict[str, Any]:
        return {"source": self.spec, "image_size": self.image_size, "train_samples": self.train_samples, "test_samples": self.test_samples, "seed": self.seed}

    def splits(self) -> list[str]:
        return ["train", "test"]

    def classes(self, split: str) -> list[str]:
        return list(synthetic.CLASSES)

    def size(self, split: str) -> int:
        return self.train_samples if split == "train" else self.test_samples

    def read(self, split: str, start: int, count: int) -> list[Record]:
        # Distinct seeds per split, so test images are never copies of training images.
        seed = self.seed * 2 + (split == "test")
        out = []
        for i in range(start, start + count):
            s = synthetic.make_sample(seed, i, self.image_size)
            out.append(Record(s.image, "rgb", s.label, f"synthetic:shapes/{split}/{sample_key(i)}", s.box))
        return out


@dataclass
class SubsetSource(Source):
    """``limit`` samples per split, evenly spaced over the sorted order of ``inner``, so a
    subset of a class-sorted folder keeps every class. Ids are renumbered 0..limit-1."""

    inner: Source
    limit: int

    def __post_init__(self) -> None:
        self.spec = self.inner.spec

    def settings(self) -> dict[str, Any]:
        return {**self.inner.settings(), "subset": self.limit}

    def splits(self) -> list[str]:
        return self.inner.splits()

    def classes(self, split: str) -> list[str]:
        return self.inner.classes(split)

    def _positions(self, split: str) -> np.ndarray:
        total = self.inner.size(split)
        return np.floor(np.arange(min(self.limit, total)) * total / min(self.limit, total)).astype(np.int64)

    def size(self, split: str) -> int:
        return len(self._positions(split))

    def read(self, split: str, start: int, count: int) -> list[Record]:
        return [self.inner.read(split, int(p), 1)[0] for p in self._positions(split)[start : start + count]]


def open_source(spec: str, **options: Any) -> Source:
    """Parse ``kind:PATH`` (``imagefolder:``, ``cifar10:``, ``cifar100:``, ``synthetic:shapes``)."""
    kind, sep, rest = spec.partition(":")
    if not sep:
        raise SourceError(f"{spec}: a source is written kind:PATH (imagefolder:, cifar10:, cifar100:, synthetic:shapes)")
    if kind == "imagefolder":
        return ImageFolderSource(rest)
    if kind in ("cifar10", "cifar100"):
        return CifarSource(rest, 10 if kind == "cifar10" else 100)
    if kind == "synthetic":
        if rest != "shapes":
            raise SourceError(f"{spec}: the only synthetic dataset is synthetic:shapes")
        return ShapesSource(**options)
    raise SourceError(f"{spec}: unknown source kind {kind!r}")
