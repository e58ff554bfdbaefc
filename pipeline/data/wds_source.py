"""``webdataset:URL``: ImageNet as it ships in WebDataset shards (timm's
``imagenet-1k-wds`` and ``imagenet-22k-wds``, img2dataset's output).

A sample is the tar members that share a key (``<key>.jpg``, ``<key>.cls``,
``<key>.json``, ...), the key being the member name up to the first dot of its base
name, as webdataset groups them. URL is either

* a folder holding the shards and, usually, ``_info.json`` or ``info.json``
  (``{"name", "splits": {SPLIT: {"name", "filenames", "shard_lengths", "num_samples"}}}``):
  every split it lists is a split of the output, its shards in the listed order; without
  an info file, the ``*.tar`` files are grouped by the split in their names
  (``PREFIX-SPLIT-NNNN.tar``, as in ``imagenet1k-train-0000.tar``);
* or a brace pattern of one split's shards (``s3://b/imagenet1k-train-{0000..1023}.tar``),
  whose split comes from the names or from ``--source-split``.

Images come from the first ``jpg``, ``jpeg``, ``png`` or ``webp`` member of a sample,
labels from ``cls`` (the default) or a field of ``json`` (``--label json:label``), class
names from the info file where it has them (``classes``, ``class_names`` or
``label_names``), else the label ids.

The source order is the shards' order, then each shard's member order; the shard job's
seeded permutation of it gives the stable sample ids as for every source. Each source
shard is listed by one reader walking its headers (16 shards at a time, as a forward
stream in 64 MB blocks on object storage, the small ``cls``/``json`` members read on
the way); the driver keeps only names, byte ranges and labels. Shard tasks read their
images by byte range, as for a tar archive source.
"""

from __future__ import annotations

import json
import posixpath
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np

from pipeline.data.sources import (
    TAR_BLOCK,
    Source,
    SourceError,
    SourceSlice,
    _ArchiveSlice,
    digest_lines,
    label_id_classes,
)
from pipeline.storage import filesystem, is_local, join, list_entries

IMAGE_MEMBERS = {"jpg": "jpg", "jpeg": "jpg", "png": "png", "webp": "webp"}  # in the order they are preferred
INFO_FILES = ("_info.json", "info.json")
CLASS_NAME_KEYS = ("classes", "class_names", "label_names")
LISTERS = 16  # source shards listed at once


@dataclass
class _WdsSplit:
    archives: list[str]  # the split's shard URLs, in source order
    names: list[str]  # the image member of each sample
    formats: list[str]
    labels: np.ndarray  # (N,) int32
    archive_of: np.ndarray  # (N,) int32
    offsets: np.ndarray  # (N,) int64
    sizes: np.ndarray  # (N,) int64


def parse_label(label: str | None) -> tuple[str, str | None]:
    """``cls`` -> ("cls", None); ``json:label`` -> ("json", "label")."""
    label = label or "cls"
    kind, _, field = label.partition(":")
    if kind == "cls" and not field:
        return "cls", None
    if kind == "json" and field:
        return "json", field
    raise SourceError(f"label: expected cls or json:FIELD for a webdataset source, got {label!r}")


def split_of(name: str) -> str | None:
    """``imagenet1k-train-0000.tar`` -> "train"; None when the name has no such form."""
    parts = posixpath.basename(name).removesuffix(".tar").rsplit("-", 2)
    return parts[1] if len(parts) == 3 and parts[2].isdigit() and parts[1] else None


@dataclass
class WebDatasetSource(Source):
    url: str
    label: str | None = None  # cls, or json:FIELD
    split_name: str | None = None  # the split of a brace pattern's shards

    def __post_init__(self) -> None:
        self.spec = f"webdataset:{self.url}"
        self.label_kind, self.label_field = parse_label(self.label)
        self.fs, _ = filesystem(self.url)

    def settings(self) -> dict[str, Any]:
        return {"source": self.spec, "label": f"{self.label_kind}:{self.label_field}" if self.label_field else "cls"}

    @cached_property
    def _layout(self) -> tuple[dict[str, list[str]], list[str] | None]:
        """split -> its shard URLs in order; the class names when the info file has them."""
        if "{" in self.url:
            from braceexpand import braceexpand

            urls = list(braceexpand(self.url))
            return {self._split_of_pattern(urls): urls}, None
        _, root = filesystem(self.url)
        try:
            entries = list_entries(self.fs, root)
        except FileNotFoundError:
            raise SourceError(f"{self.url}: source path does not exist") from None
        files = {posixpath.basename(e["name"].rstrip("/")) for e in entries if e["type"] != "directory"}
        info_name = next((n for n in INFO_FILES if n in files), None)
        if info_name is not None:
            return self._from_info(info_name, files)
        tars = sorted(n for n in files if n.endswith(".tar"))
        if not tars:
            raise SourceError(f"{self.url}: no .tar shards and no {' or '.join(INFO_FILES)}")
        splits: dict[str, list[str]] = {}
        for name in tars:
            split = self.split_name or split_of(name)
            if split is None:
                raise SourceError(
                    f"{join(self.url, name)}: cannot tell its split from its name (expected PREFIX-SPLIT-NNNN.tar); "
                    "add an info.json, or name the split with --source-split"
                )
            splits.setdefault(split, []).append(join(self.url, name))
        return splits, None

    def _split_of_pattern(self, urls: list[str]) -> str:
        if self.split_name:
            return self.split_name
        found = {split_of(u) for u in urls}
        if len(found) != 1 or None in found:
            raise SourceError(
                f"{self.url}: cannot tell the split from the shard names (expected PREFIX-SPLIT-NNNN.tar); "
                "name it with --source-split"
            )
        return found.pop()  # type: ignore[return-value]

    def _from_info(self, info_name: str, files: set[str]) -> tuple[dict[str, list[str]], list[str] | None]:
        path = join(self.url, info_name)
        try:
            info = json.loads(self.fs.cat_file(filesystem(path)[1]))
            splits = {
                str(name): [join(self.url, f) for f in split["filenames"]] for name, split in info["splits"].items()
            }
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise SourceError(
                f"{path}: not a webdataset info file ({type(exc).__name__}: {exc}); expected "
                '{"splits": {SPLIT: {"filenames": [...], ...}}}'
            ) from None
        for shards in splits.values():
            for shard in shards:
                if posixpath.basename(shard) not in files:
                    raise SourceError(f"{shard}: listed in {info_name} but not in {self.url}")
        names = next((info[k] for k in CLASS_NAME_KEYS if isinstance(info.get(k), list)), None)
        if self.split_name:
            if self.split_name not in splits:
                raise SourceError(f"{path}: no split {self.split_name!r} (has {', '.join(splits)})")
            splits = {self.split_name: splits[self.split_name]}
        return splits, [str(n) for n in names] if names else None

    @cached_property
    def _listing(self) -> dict[str, _WdsSplit]:
        layout, _ = self._layout
        return {split: self._list_split(urls) for split, urls in layout.items()}

    def _list_split(self, urls: list[str]) -> _WdsSplit:
        with ThreadPoolExecutor(LISTERS) as pool:
            listed = list(pool.map(self._list_shard, urls))
        count = sum(len(samples) for samples in listed)
        names: list[str] = []
        formats: list[str] = []
        labels = np.empty(count, np.int32)
        archive_of = np.empty(count, np.int32)
        offsets = np.empty(count, np.int64)
        sizes = np.empty(count, np.int64)
        k = 0
        for a, samples in enumerate(listed):
            for name, fmt, label, offset, size in samples:
                names.append(name)
                formats.append(fmt)
                labels[k], archive_of[k], offsets[k], sizes[k] = label, a, offset, size
                k += 1
        return _WdsSplit(urls, names, formats, labels, archive_of, offsets, sizes)

    def _list_shard(self, url: str) -> list[tuple[str, str, int, int, int]]:
        """(image member, format, label, offset, size) of each sample of one shard."""
        fs, path = filesystem(url)
        samples: list[tuple[str, str, int, int, int]] = []
        key: str | None = None
        members: dict[str, tarfile.TarInfo] = {}
        small: dict[str, bytes] = {}
        try:
            with (
                fs.open(path, "rb", block_size=(1 << 20) if is_local(fs) else TAR_BLOCK, cache_type="readahead") as f,
                tarfile.open(fileobj=f, mode="r:") as tar,
            ):
                while (member := tar.next()) is not None:
                    if not member.isfile():
                        continue
                    base = posixpath.basename(member.name)
                    folder = posixpath.dirname(member.name)
                    stem, dot, ext = base.partition(".")
                    this_key = posixpath.join(folder, stem)
                    if this_key != key:
                        if key is not None:
                            samples.append(self._sample(url, key, members, small))
                        key, members, small = this_key, {}, {}
                    if dot:
                        members[ext.lower()] = member
                        if ext.lower() in ("cls", "json"):
                            small[ext.lower()] = tar.extractfile(member).read()  # type: ignore[union-attr]
                    tar.members.clear()  # tarfile keeps every header it reads otherwise
                if key is not None:
                    samples.append(self._sample(url, key, members, small))
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise SourceError(f"{url}: cannot read shard ({type(exc).__name__}: {exc})") from None
        return samples

    def _sample(
        self, url: str, key: str, members: dict[str, tarfile.TarInfo], small: dict[str, bytes]
    ) -> tuple[str, str, int, int, int]:
        ext = next((e for e in IMAGE_MEMBERS if e in members), None)
        if ext is None:
            raise SourceError(
                f"{url}: sample {key}: no image ({', '.join(IMAGE_MEMBERS)}) among its members "
                f"({', '.join(sorted(members)) or 'none'})"
            )
        image = members[ext]
        return f"{key}.{ext}", IMAGE_MEMBERS[ext], self._label(url, key, small), image.offset_data, image.size

    def _label(self, url: str, key: str, small: dict[str, bytes]) -> int:
        if self.label_kind == "cls":
            if "cls" not in small:
                raise SourceError(
                    f"{url}: sample {key}: no .cls member (its label); for a label in its .json: --label json:FIELD"
                )
            text = small["cls"].decode("utf-8", "replace").strip()
            if not text.lstrip("-").isdigit():
                raise SourceError(f"{url}: sample {key}: .cls is not an integer label ({text[:40]!r})")
            return int(text)
        if "json" not in small:
            raise SourceError(f"{url}: sample {key}: no .json member (--label {self.label})")
        try:
            meta = json.loads(small["json"])
        except ValueError:
            raise SourceError(f"{url}: sample {key}: its .json is not JSON") from None
        if not isinstance(meta, dict) or self.label_field not in meta:
            fields = ", ".join(sorted(meta)) if isinstance(meta, dict) else "not an object"
            raise SourceError(f"{url}: sample {key}: its .json has no field {self.label_field!r} (has {fields})")
        value = meta[self.label_field]
        if not isinstance(value, int) or isinstance(value, bool):
            raise SourceError(f"{url}: sample {key}: .json field {self.label_field!r} is not an integer ({value!r})")
        return value

    def splits(self) -> list[str]:
        return sorted(self._layout[0])

    def classes(self, split: str) -> list[str]:
        names = self._layout[1]
        return names if names is not None else label_id_classes(part.labels for part in self._listing.values())

    def size(self, split: str) -> int:
        return len(self._listing[split].names)

    def listing_digest(self, split: str) -> str:
        part = self._listing[split]
        rows = zip(part.archive_of.tolist(), part.names, part.labels.tolist(), strict=True)
        return digest_lines(f"{posixpath.basename(part.archives[a])}\0{name}\0{label}" for a, name, label in rows)

    def slice(self, split: str, positions: np.ndarray) -> SourceSlice:
        part = self._listing[split]
        chosen = positions.tolist()
        return _ArchiveSlice.select(
            part.archives,
            part.archives,
            positions,
            [part.names[p] for p in chosen],
            [part.formats[p] for p in chosen],
            archive_of=part.archive_of,
            labels=part.labels,
            offsets=part.offsets,
            sizes=part.sizes,
        )
