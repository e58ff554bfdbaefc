"""Datasets that ``catkd shard`` reads: ``imagefolder:URL``, ``cifar10:PATH``,
``cifar100:PATH`` and ``synthetic:shapes``.

A source is opened once, on the driver. It lists each split once, in sorted source
order (image folders: class folder, then file name), and holds only that listing:
names and labels, never image bytes. ``slice(split, positions)`` returns a small
picklable ``SourceSlice`` holding just the entries at those positions; one Ray task
reads one slice (``slice.read()``) and writes one shard from it. Which positions go
into which shard is the shard writer's business (a seeded permutation, DESIGN
section 4), not the source's.

Image folders may live on any fsspec URL (a local or shared path, ``s3://``,
``gs://``). Archives (``.tar``, ``.tar.gz``, ``.tar.bz2``, ``.tar.xz``, local or on
fsspec) are streamed, never held whole: a plain tar is listed by walking its headers
and each task reads its members by byte range; a compressed tar has no random access,
so it is first decompressed, as a stream, into a plain tar in the shard writer's
staging folder, and read from there the same way.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import lzma
import os
import pickle
import posixpath
import shutil
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

from catkd.errors import CatkdError
from pipeline.data import synthetic
from pipeline.data.shard_format import sample_key
from pipeline.storage import cat_small, filesystem, is_local, join, list_entries

IMAGE_EXTENSIONS = {
    ".jpg": "jpg",
    ".jpeg": "jpg",
    ".png": "png",
    ".bmp": "bmp",
    ".gif": "gif",
    ".webp": "webp",
    ".tif": "tiff",
    ".tiff": "tiff",
    ".ppm": "ppm",
}
_COMPRESSED = {b"\x1f\x8b": gzip.open, b"BZh": bz2.open, b"\xfd7zXZ\x00": lzma.open}
_COPY_CHUNK = 8 << 20  # bytes per read while decompressing an archive


class SourceError(CatkdError, ValueError):
    """A source that cannot be read; the message names the file or folder."""


@dataclass
class Record:
    image: bytes | np.ndarray  # encoded file bytes, or (H, W, 3) uint8 pixels
    fmt: str  # "jpg", "png", ... or "rgb" for pixels
    label: int
    origin: str  # where it came from, for error messages
    box: tuple[int, int, int, int] | None = None


class SourceSlice:
    """The entries of one shard task, in the order the shard stores them."""

    def read(self) -> list[Record]:
        raise NotImplementedError


class Source:
    spec: str

    def splits(self) -> list[str]:
        raise NotImplementedError

    def classes(self, split: str) -> list[str]:
        raise NotImplementedError

    def size(self, split: str) -> int:
        raise NotImplementedError

    def slice(self, split: str, positions: np.ndarray) -> SourceSlice:
        """The entries at ``positions`` (indices into the sorted source order)."""
        raise NotImplementedError

    def settings(self) -> dict[str, Any]:
        """What identifies this source's content in an index."""
        return {"source": self.spec}

    def listing_digest(self, split: str) -> str:
        """A hash of the split's listing (names and labels): a changed listing is refused on rerun."""
        return hashlib.sha256(f"{self.spec}|{split}|{self.size(split)}".encode()).hexdigest()[:16]

    def notes(self) -> list[str]:
        """Things worth telling the user about the listing (skipped files, ...)."""
        return []


def _format_of(name: str) -> str | None:
    return IMAGE_EXTENSIONS.get(os.path.splitext(name)[1].lower())


def digest_lines(lines: Iterable[str]) -> str:
    """``Source.listing_digest`` of a listing given as one line per sample."""
    h = hashlib.sha256()
    for line in lines:
        h.update(f"{line}\n".encode())
    return h.hexdigest()[:16]


def label_id_classes(labels: Iterable[np.ndarray]) -> list[str]:
    """Class names for a source that has none: the label ids, as many as the largest label
    of every split plus one, so that label i means the same class in every split."""
    top = max(int(split_labels.max(initial=-1)) for split_labels in labels)
    return [str(i) for i in range(top + 1)]


# ---------------------------------------------------------------- image folders


@dataclass
class _Split:
    """One split of an image folder, in sorted order: names, labels and, for archives,
    each member's byte range in the (plain) tar."""

    classes: list[str]
    names: list[str]
    labels: np.ndarray  # (N,) int32
    offsets: np.ndarray | None = None  # (N,) int64, archives only
    sizes: np.ndarray | None = None


def _group_layout(
    entries: list[tuple[str, int, int]], origin: str, empty_classes: list[str]
) -> tuple[dict[str, _Split], int]:
    """``(relative path, offset, size)`` of every file -> splits laid out as
    ``<split>/<class>/<image>``; returns the splits and the count of files skipped
    because they are not images in that layout."""
    layout: dict[str, dict[str, list[tuple[str, int, int]]]] = {}
    skipped = 0
    for name, offset, size in entries:
        parts = name.strip("/").split("/")
        if len(parts) != 3 or _format_of(parts[2]) is None:
            skipped += 1
            continue
        layout.setdefault(parts[0], {}).setdefault(parts[1], []).append((name.strip("/"), offset, size))
    if not layout:
        raise SourceError(f"{origin}: no images laid out as <split>/<class>/<image>")
    for empty in empty_classes:
        split, cls = empty.split("/")
        if cls not in layout.get(split, {}):
            raise SourceError(f"{join(origin, empty)}: empty class folder (no images)")
    # Every split shares the union of class names, so label i means the same class everywhere.
    classes = sorted({cls for per_class in layout.values() for cls in per_class})
    splits = {}
    for split, per_class in sorted(layout.items()):
        missing = [c for c in classes if c not in per_class]
        if missing:
            raise SourceError(f"{join(origin, split, missing[0])}: empty class folder (no images)")
        rows = [(entry, label) for label, cls in enumerate(classes) for entry in sorted(per_class[cls])]
        splits[split] = _Split(
            classes=classes,
            names=[e[0] for e, _ in rows],
            labels=np.fromiter((label for _, label in rows), np.int32, len(rows)),
            offsets=np.fromiter((e[1] for e, _ in rows), np.int64, len(rows)),
            sizes=np.fromiter((e[2] for e, _ in rows), np.int64, len(rows)),
        )
    return splits, skipped


def _list_directory(fs, root: str, origin: str) -> tuple[list[tuple[str, int, int]], list[str]]:
    """Relative paths of every file up to ``split/class/file`` depth, and class folders
    that hold no file at all (those exist only on file systems with real folders)."""
    files, class_dirs = [], set()
    if is_local(fs):
        # os.scandir: no stat per file, which matters at a million files.
        for split in sorted(os.scandir(root), key=lambda e: e.name):
            if not split.is_dir():
                continue
            for cls in os.scandir(split.path):
                if not cls.is_dir():
                    continue
                class_dirs.add(f"{split.name}/{cls.name}")
                files += [(f"{split.name}/{cls.name}/{f.name}", 0, 0) for f in os.scandir(cls.path) if f.is_file()]
    else:
        try:
            files, class_dirs = _list_object_store(fs, root)
        except (PermissionError, OSError) as exc:
            raise SourceError(f"{origin}: cannot list the source ({type(exc).__name__}: {str(exc)[:200]})") from None
    with_files = {posixpath.dirname(name) for name, _, _ in files if _format_of(name)}
    return files, sorted(class_dirs - with_files)


TAR_BLOCK = 64 << 20  # bytes a request when an archive on an object store is listed


def _list_object_store(fs, root: str) -> tuple[list[tuple[str, int, int]], set[str]]:
    """An image folder on an object store, listed a class folder at a time, 32 listings
    in flight: the listing info of one class folder is held at once (s3fs keeps every
    listing it makes, ~1 KB a file: 15 GB at 14M files), and 21,841 class folders at
    20 ms a listing take seconds, not minutes."""
    from concurrent.futures import ThreadPoolExecutor

    def names(folder: str) -> tuple[list[str], list[str]]:
        """(files, folders) directly in ``folder``, relative to ``root``."""
        found = list_entries(fs, folder)
        rel = lambda e: posixpath.relpath(e["name"].rstrip("/"), root)  # noqa: E731
        return [rel(e) for e in found if e["type"] != "directory"], [rel(e) for e in found if e["type"] == "directory"]

    # Files beside the split and class folders (a README, a LICENSE) are not part of the
    # layout and not counted as skipped, as on local disk.
    files: list[str] = []
    class_dirs: set[str] = set()
    for split in names(root)[1]:
        class_dirs.update(names(join(root, split))[1])
    with ThreadPoolExecutor(32) as pool:
        for class_files, _ in pool.map(lambda c: names(join(root, c)), sorted(class_dirs)):
            files += class_files  # folders below a class folder hold nothing of the layout
    return [(name, 0, 0) for name in files], class_dirs


def _list_plain_tar(fs, path: str, origin: str) -> list[tuple[str, int, int]]:
    """``(name, data offset, size)`` of each regular member, reading headers only
    (tarfile seeks past member data on a seekable file). On an object store the archive
    is read as one forward stream in 64 MB blocks (fsspec's read-ahead cache serves each
    header inside the block): a request per 64 MB, where 1 MB blocks made one per 1 MB,
    one after another (1.3M requests for ImageNet-21k's 1.3 TB)."""
    entries = []
    block = 1 << 20 if is_local(fs) else TAR_BLOCK
    try:
        with (
            fs.open(path, "rb", block_size=block, cache_type="readahead") as f,
            tarfile.open(fileobj=f, mode="r:") as tar,
        ):
            while (member := tar.next()) is not None:
                if member.isfile():
                    entries.append((member.name.removeprefix("./"), member.offset_data, member.size))
                tar.members.clear()  # tarfile keeps every header it reads: a dataset-sized list otherwise
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise SourceError(f"{origin}: cannot read archive ({exc})") from exc
    return entries


def _decompress(fs, path: str, opener, staged: str, origin: str) -> None:
    """Stream-decompress an archive into a plain tar at ``staged`` (bounded memory)."""
    sfs, spath = filesystem(staged)
    sfs.makedirs(posixpath.dirname(spath), exist_ok=True)
    partial = f"{spath}.partial"
    try:
        with fs.open(path, "rb") as raw, opener(raw, "rb") as src, sfs.open(partial, "wb") as dst:
            shutil.copyfileobj(src, dst, _COPY_CHUNK)
    except (OSError, EOFError, lzma.LZMAError) as exc:
        raise SourceError(f"{origin}: cannot read archive ({exc})") from exc
    sfs.mv(partial, spath)


@dataclass
class ImageFolderSource(Source):
    """A folder, or a tar archive, laid out as ``<split>/<class>/<image>``, on any fsspec URL.

    ``staging`` is a folder (URL) where a compressed archive is decompressed once;
    the shard writer passes ``<OUT>/_staging``.
    """

    url: str
    staging: str | None = None

    def __post_init__(self) -> None:
        self.spec = f"imagefolder:{self.url}"
        self.fs, self.path = filesystem(self.url)
        try:
            exists, is_file = self.fs.exists(self.path), self.fs.isfile(self.path)
        except (PermissionError, OSError) as exc:
            raise SourceError(
                f"{self.url}: cannot read the source location ({type(exc).__name__}: {str(exc)[:200]})"
            ) from None
        if not exists:
            raise SourceError(f"{self.url}: source path does not exist")
        self.archive: str | None = self.url if is_file else None

    @cached_property
    def _listing(self) -> tuple[dict[str, _Split], int]:
        if self.archive is None:
            files, empty = _list_directory(self.fs, self.path, self.url)
            return _group_layout(files, self.url, empty)
        with self.fs.open(self.path, "rb") as f:
            magic = f.read(6)
        opener = next((op for m, op in _COMPRESSED.items() if magic.startswith(m)), None)
        if opener is not None:
            if self.staging is None:
                raise SourceError(f"{self.url}: a compressed archive needs a staging folder to decompress into")
            staged = join(self.staging, posixpath.basename(self.path) + ".plain.tar")
            sfs, spath = filesystem(staged)
            if not sfs.exists(spath):
                _decompress(self.fs, self.path, opener, staged, self.url)
            self.archive = staged
        afs, apath = filesystem(self.archive)
        return _group_layout(_list_plain_tar(afs, apath, self.url), self.url, [])

    def splits(self) -> list[str]:
        return sorted(self._listing[0])

    def _split(self, split: str) -> _Split:
        return self._listing[0][split]

    def classes(self, split: str) -> list[str]:
        return self._split(split).classes

    def size(self, split: str) -> int:
        return len(self._split(split).names)

    def listing_digest(self, split: str) -> str:
        part = self._split(split)
        return digest_lines(f"{name}\0{label}" for name, label in zip(part.names, part.labels.tolist(), strict=True))

    def notes(self) -> list[str]:
        skipped = self._listing[1]
        return (
            [f"{self.url}: skipped {skipped} files that are not images laid out as <split>/<class>/<image>"]
            if skipped
            else []
        )

    def slice(self, split: str, positions: np.ndarray) -> SourceSlice:
        part = self._split(split)
        names = [part.names[p] for p in positions.tolist()]
        labels = part.labels[positions].tolist()
        if self.archive is None:
            return _FolderSlice(self.url, names, labels)
        return _ArchiveSlice(
            [self.archive],
            [self.url],
            names,
            labels,
            [0] * len(names),
            part.offsets[positions].tolist(),
            part.sizes[positions].tolist(),
        )


@dataclass
class _FolderSlice(SourceSlice):
    root: str
    names: list[str]
    labels: list[int]

    def read(self) -> list[Record]:
        fs, root = filesystem(self.root)
        paths = [join(root, n) for n in self.names]
        if is_local(fs):
            data = []
            for path in paths:
                with open(path, "rb") as f:
                    data.append(f.read())
        else:  # one concurrent batch of GETs
            data = cat_small(fs, paths)
        records = []
        for name, label, payload in zip(self.names, self.labels, data, strict=True):
            origin = join(self.root, name)
            if isinstance(payload, BaseException):
                raise SourceError(f"{origin}: cannot read ({type(payload).__name__}: {payload})")
            records.append(Record(payload, _format_of(name), label, origin))
        return records


@dataclass
class _ArchiveSlice(SourceSlice):
    """Members of plain tars, read by byte range: one forward pass per tar on local disk,
    one concurrent batch of ranged reads on an object store."""

    archives: list[str]  # the plain tars read (the sources themselves, or decompressed copies)
    origins: list[str]  # the archives the user named, for messages
    names: list[str]
    labels: list[int]
    archive_of: list[int]  # index into archives of each member
    offsets: list[int]
    sizes: list[int]
    formats: list[str] | None = None  # default: from each name's extension

    @classmethod
    def select(
        cls,
        archives: list[str],
        origins: list[str],
        positions: np.ndarray,
        names: list[str],
        formats: list[str] | None,
        *,
        archive_of: np.ndarray,
        labels: np.ndarray,
        offsets: np.ndarray,
        sizes: np.ndarray,
    ) -> _ArchiveSlice:
        """The members at ``positions`` of a listing over several archives (its columns
        ``archive_of``, ``labels``, ``offsets``, ``sizes``; ``names`` and ``formats``
        already those of the positions). Only the archives the members lie in travel with
        the slice."""
        used, local = np.unique(archive_of[positions], return_inverse=True)
        return cls(
            [archives[a] for a in used.tolist()],
            [origins[a] for a in used.tolist()],
            names,
            labels[positions].tolist(),
            local.tolist(),
            offsets[positions].tolist(),
            sizes[positions].tolist(),
            formats,
        )

    def read(self) -> list[Record]:
        fs, _ = filesystem(self.archives[0])
        paths = [filesystem(a)[1] for a in self.archives]
        data: list[bytes] = [b""] * len(self.names)
        # one forward pass per archive
        order = sorted(range(len(self.names)), key=lambda k: (self.archive_of[k], self.offsets[k]))
        if is_local(fs):
            current, f = None, None
            try:
                for k in order:
                    if self.archive_of[k] != current:
                        if f is not None:
                            f.close()
                        current = self.archive_of[k]
                        f = open(paths[current], "rb")
                    f.seek(self.offsets[k])
                    data[k] = f.read(self.sizes[k])
            finally:
                if f is not None:
                    f.close()
        else:
            starts = [self.offsets[k] for k in order]
            ends = [self.offsets[k] + self.sizes[k] for k in order]
            members = fs.cat_ranges([paths[self.archive_of[k]] for k in order], starts, ends)
            for k, payload in zip(order, members, strict=True):
                data[k] = payload
        records = []
        for k, (name, label, payload, size) in enumerate(zip(self.names, self.labels, data, self.sizes, strict=True)):
            origin = f"{self.origins[self.archive_of[k]]}:{name}"
            if isinstance(payload, BaseException):
                raise SourceError(f"{origin}: cannot read ({type(payload).__name__}: {payload})")
            if len(payload) != size:
                raise SourceError(f"{origin}: archive member is truncated ({len(payload)} of {size} bytes)")
            fmt = self.formats[k] if self.formats is not None else _format_of(name)
            records.append(Record(payload, fmt, label, origin))
        return records


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

    def files(self, split: str) -> list[str]:
        if self.num_classes == 10:
            names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
        else:
            names = [split]
        return [os.path.join(self.root, n) for n in names]

    @cached_property
    def _sizes(self) -> dict[str, int]:
        return {split: len(load_cifar_split(self, split)[1]) for split in self.splits()}

    def splits(self) -> list[str]:
        return ["train", "test"]

    def classes(self, split: str) -> list[str]:
        meta_name, key = ("batches.meta", "label_names") if self.num_classes == 10 else ("meta", "fine_label_names")
        return list(_load_pickle(os.path.join(self.root, meta_name))[key])

    def size(self, split: str) -> int:
        return self._sizes[split]

    def slice(self, split: str, positions: np.ndarray) -> SourceSlice:
        return _CifarSlice(self, split, positions.tolist())

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_sizes"}


def _load_pickle(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise SourceError(f"{path}: missing CIFAR file")
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="latin1")
    except Exception as exc:
        raise SourceError(f"{path}: not a CIFAR pickle ({exc})") from exc


def load_cifar_split(source: CifarSource, split: str) -> tuple[np.ndarray, np.ndarray, list[tuple[str, int]]]:
    """(images (N, 32, 32, 3), labels, (file, row) per image) of one split. CIFAR is
    small (180 MB at most), so each task loads the split it reads whole."""
    label_key = "labels" if source.num_classes == 10 else "fine_labels"
    images, labels, origins = [], [], []
    for path in source.files(split):
        batch = _load_pickle(path)
        data = np.asarray(batch["data"], np.uint8)
        if data.ndim != 2 or data.shape[1] != 3072:
            raise SourceError(f"{path}: data has shape {data.shape}, expected (N, 3072)")
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(np.asarray(batch[label_key], np.int64))
        origins += [(path, i) for i in range(len(data))]
    return np.concatenate(images), np.concatenate(labels), origins


@dataclass
class _CifarSlice(SourceSlice):
    source: CifarSource
    split: str
    positions: list[int]

    def read(self) -> list[Record]:
        images, labels, origins = load_cifar_split(self.source, self.split)
        return [
            Record(np.ascontiguousarray(images[p]), "rgb", int(labels[p]), f"{origins[p][0]}[{origins[p][1]}]")
            for p in self.positions
        ]


# ---------------------------------------------------------------- synthetic


@dataclass
class ShapesSource(Source):
    """``synthetic:shapes``: image ``p`` of a split is generated from (seed, p); see ``synthetic``."""

    image_size: int = 32  # synthetic:shapes image side
    train_samples: int = 5000  # synthetic:shapes training samples
    test_samples: int = 1000  # synthetic:shapes test samples
    seed: int = 0  # synthetic:shapes seed

    def __post_init__(self) -> None:
        self.spec = "synthetic:shapes"

    def settings(self) -> dict[str, Any]:
        return {
            "source": self.spec,
            "image_size": self.image_size,
            "train_samples": self.train_samples,
            "test_samples": self.test_samples,
            "seed": self.seed,
        }

    def splits(self) -> list[str]:
        return ["train", "test"]

    def classes(self, split: str) -> list[str]:
        return list(synthetic.CLASSES)

    def size(self, split: str) -> int:
        return self.train_samples if split == "train" else self.test_samples

    def slice(self, split: str, positions: np.ndarray) -> SourceSlice:
        # Distinct seeds per split, so test images are never copies of training images.
        return _ShapesSlice(self.seed * 2 + (split == "test"), split, self.image_size, positions.tolist())


@dataclass
class _ShapesSlice(SourceSlice):
    seed: int
    split: str
    image_size: int
    positions: list[int]

    def read(self) -> list[Record]:
        out = []
        for p in self.positions:
            s = synthetic.make_sample(self.seed, p, self.image_size)
            out.append(Record(s.image, "rgb", s.label, f"synthetic:shapes/{self.split}/{sample_key(p)}", s.box))
        return out


@dataclass
class SubsetSource(Source):
    """``limit`` samples per split, evenly spaced over the sorted order of ``inner``, so a
    subset of a class-sorted folder keeps every class in proportion."""

    inner: Source
    limit: int
    _spaced: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.spec = self.inner.spec

    def settings(self) -> dict[str, Any]:
        return {**self.inner.settings(), "subset": self.limit}

    def splits(self) -> list[str]:
        return self.inner.splits()

    def classes(self, split: str) -> list[str]:
        return self.inner.classes(split)

    def _positions(self, split: str) -> np.ndarray:
        if split not in self._spaced:
            total = self.inner.size(split)
            n = min(self.limit, total)
            self._spaced[split] = np.floor(np.arange(n) * total / n).astype(np.int64)
        return self._spaced[split]

    def size(self, split: str) -> int:
        return len(self._positions(split))

    def listing_digest(self, split: str) -> str:
        return self.inner.listing_digest(split)

    def notes(self) -> list[str]:
        return self.inner.notes()

    def slice(self, split: str, positions: np.ndarray) -> SourceSlice:
        return self.inner.slice(split, self._positions(split)[positions])


def open_source(
    spec: str,
    *,
    staging: str | None = None,
    label: str | None = None,
    source_split: str | None = None,
    image_column: str | None = None,
    **options: Any,
) -> Source:
    """Parse ``kind:PATH`` (``imagefolder:``, ``webdataset:``, ``parquet:``, ``cifar10:``,
    ``cifar100:``, ``synthetic:shapes``). ``label``, ``source_split`` and ``image_column``
    are for the sources that take them."""
    kind, sep, rest = spec.partition(":")
    if not sep:
        raise SourceError(
            f"{spec}: a source is written kind:PATH (imagefolder:, webdataset:, parquet:, cifar10:, cifar100:, "
            "synthetic:shapes)"
        )
    if image_column is not None and kind != "parquet":
        raise SourceError(f"image_column: only a parquet: source takes it, not {kind}:")
    if kind == "webdataset":
        from pipeline.data.wds_source import WebDatasetSource

        return WebDatasetSource(rest, label, source_split)
    if kind == "parquet":
        from pipeline.data.parquet_source import ParquetSource

        return ParquetSource(rest, staging, label, image_column, source_split)
    for name, value in (("label", label), ("source_split", source_split)):
        if value is not None:
            raise SourceError(f"{name}: only webdataset: and parquet: sources take it, not {kind}:")
    if kind == "imagefolder":
        return ImageFolderSource(rest, staging)
    if kind in ("cifar10", "cifar100"):
        return CifarSource(rest, 10 if kind == "cifar10" else 100)
    if kind == "synthetic":
        if rest != "shapes":
            raise SourceError(f"{spec}: the only synthetic dataset is synthetic:shapes")
        return ShapesSource(**options)
    raise SourceError(f"{spec}: unknown source kind {kind!r}")
