"""``parquet:URL``: a dataset in Hugging Face's parquet layout (``imagenet-1k``'s
``data/train-00000-of-00294.parquet``, ``validation-...``, ``test-...``).

URL is the folder of the parquet files (or one file); the split is the part of each
file name before its first ``-`` (``--source-split`` names it instead). Each row holds
the image (column ``image``: Hugging Face's ``{"bytes", "path"}`` struct, or plain
bytes) and the label (column ``label``); ``--image-column`` and ``--label`` name other
columns. Class names come from the dataset's metadata (the ``huggingface`` key of the
schema metadata: ``info.features[LABEL].names``) where present, else the label ids.

Why the files are staged: sample ids are a seeded permutation of the source order
(DESIGN section 4), so an output shard's rows are spread over every file, and a
compressed parquet column can only be read a whole column chunk (row group) at a time:
reading row groups per output shard would read the dataset once per shard. So each
file is read once, row group by row group, image column and label column only, by one
of 8 readers at a time, and its images are written as one plain tar in the shard job's
staging folder with their byte ranges beside it (``<file>.tar``, ``<file>.tar.json``);
output shard tasks then read their images by byte range, as for a tar source. A staged
file is reused on resume and the staging folder removed when the job completes.
"""

from __future__ import annotations

import io
import json
import posixpath
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np

from pipeline.data.sources import (
    Source,
    SourceError,
    SourceSlice,
    _ArchiveSlice,
    _format_of,
    digest_lines,
    label_id_classes,
)
from pipeline.storage import filesystem, join, list_entries, write_atomic

READERS = 8  # parquet files staged at once (each holds one row group's images)
_MAGIC = (
    (b"\xff\xd8\xff", "jpg"),
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"GIF8", "gif"),
    (b"BM", "bmp"),
)


def image_format(data: bytes, path: str | None) -> str | None:
    """The encoding of image bytes, from their magic number, else the path's extension."""
    for magic, fmt in _MAGIC:
        if data.startswith(magic):
            return fmt
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return _format_of(path) if path else None


def split_of_file(name: str) -> str:
    """``train-00000-of-00294.parquet`` -> "train"."""
    return posixpath.basename(name).split("-", 1)[0].removesuffix(".parquet")


@dataclass
class _Staged:
    """One parquet file's images in a plain tar, with what the listing needs."""

    tar: str  # URL of the staged tar
    labels: list[int]
    offsets: list[int]
    sizes: list[int]
    formats: list[str]


@dataclass
class _ParquetSplit:
    files: list[str]  # the source files, in order
    staged: list[str]  # their staged tars
    labels: np.ndarray
    file_of: np.ndarray
    rows: np.ndarray  # row within its file
    offsets: np.ndarray
    sizes: np.ndarray
    formats: list[str]


@dataclass
class ParquetSource(Source):
    url: str
    staging: str | None = None
    label: str | None = None  # the label column
    image: str | None = None  # the image column
    split_name: str | None = None

    def __post_init__(self) -> None:
        self.spec = f"parquet:{self.url}"
        self.label_column = self.label or "label"
        self.image_column = self.image or "image"
        self.fs, self.path = filesystem(self.url)

    def settings(self) -> dict[str, Any]:
        return {"source": self.spec, "label": self.label_column, "image": self.image_column}

    @cached_property
    def _files(self) -> dict[str, list[str]]:
        try:
            if self.fs.isfile(self.path):
                return {self.split_name or split_of_file(self.path): [self.url]}
            entries = list_entries(self.fs, self.path)
        except FileNotFoundError:
            raise SourceError(f"{self.url}: source path does not exist") from None
        names = sorted(
            posixpath.basename(e["name"])
            for e in entries
            if e["type"] != "directory" and e["name"].endswith(".parquet")
        )
        if not names:
            raise SourceError(f"{self.url}: no .parquet files")
        splits: dict[str, list[str]] = {}
        for name in names:
            splits.setdefault(self.split_name or split_of_file(name), []).append(join(self.url, name))
        return splits

    def _open(self, url: str):
        import pyarrow.parquet as pq

        fs, path = filesystem(url)
        try:
            return pq.ParquetFile(fs.open(path, "rb"))
        except Exception as exc:  # pyarrow raises its own error types for a damaged file
            raise SourceError(f"{url}: cannot be read as parquet ({type(exc).__name__}: {str(exc)[:200]})") from None

    @cached_property
    def _class_names(self) -> list[str] | None:
        first = next(iter(self._files.values()))[0]
        metadata = self._open(first).schema_arrow.metadata or {}
        try:
            features = json.loads(metadata[b"huggingface"])["info"]["features"]
            names = features[self.label_column]["names"]
        except (KeyError, TypeError, ValueError):
            return None
        return [str(n) for n in names] if isinstance(names, list) else None

    @cached_property
    def _listing(self) -> dict[str, _ParquetSplit]:
        if self.staging is None:
            raise SourceError(f"{self.url}: a parquet source needs a staging folder to stage its images into")
        return {split: self._list_split(split, files) for split, files in self._files.items()}

    def _list_split(self, split: str, files: list[str]) -> _ParquetSplit:
        with ThreadPoolExecutor(READERS) as pool:
            staged = list(pool.map(lambda f: self._stage(split, f), files))
        counts = [len(s.labels) for s in staged]
        return _ParquetSplit(
            files=files,
            staged=[s.tar for s in staged],
            labels=np.concatenate([np.asarray(s.labels, np.int32) for s in staged]),
            file_of=np.repeat(np.arange(len(files), dtype=np.int32), counts),
            rows=np.concatenate([np.arange(n, dtype=np.int64) for n in counts]),
            offsets=np.concatenate([np.asarray(s.offsets, np.int64) for s in staged]),
            sizes=np.concatenate([np.asarray(s.sizes, np.int64) for s in staged]),
            formats=[f for s in staged for f in s.formats],
        )

    def _stage(self, split: str, url: str) -> _Staged:
        """Write ``url``'s images to a plain tar in the staging folder (or find it there,
        complete, from an earlier run) and return its listing."""
        tar_url = join(self.staging, split, posixpath.basename(url) + ".tar")  # type: ignore[arg-type]
        sfs, tar_path = filesystem(tar_url)
        listing_path = tar_path + ".json"
        if sfs.exists(listing_path):
            listed = json.loads(sfs.cat_file(listing_path))
            if listed.get("source") == url and listed.get("columns") == [self.image_column, self.label_column]:
                return _Staged(tar_url, listed["labels"], listed["offsets"], listed["sizes"], listed["formats"])
        labels: list[int] = []
        formats: list[str] = []
        sfs.makedirs(posixpath.dirname(tar_path), exist_ok=True)
        # Streamed to storage (a multipart upload on an object store): a file's images
        # are never held at once. The listing written after it is what marks it complete.
        with sfs.open(tar_path, "wb") as out, tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            offsets, sizes = self._write_rows(url, tar, labels, formats)
        listed = {
            "source": url,
            "columns": [self.image_column, self.label_column],
            "labels": labels,
            "offsets": offsets,
            "sizes": sizes,
            "formats": formats,
        }
        write_atomic(sfs, listing_path, json.dumps(listed).encode())  # last: the staged file is complete
        return _Staged(tar_url, labels, offsets, sizes, formats)

    def _write_rows(self, url: str, tar: tarfile.TarFile, labels: list[int], formats: list[str]):
        parquet = self._open(url)
        names = parquet.schema_arrow.names
        for column, flag in ((self.image_column, "--image-column"), (self.label_column, "--label")):
            if column not in names:
                raise SourceError(f"{url}: no column {column!r} (has {', '.join(names)}); name it with {flag}")
        offsets: list[int] = []
        sizes: list[int] = []
        row = 0
        for group in range(parquet.num_row_groups):
            table = parquet.read_row_group(group, columns=[self.image_column, self.label_column])
            for image, label in zip(
                table.column(self.image_column).to_pylist(), table.column(self.label_column).to_pylist(), strict=True
            ):
                data, path = (image.get("bytes"), image.get("path")) if isinstance(image, dict) else (image, None)
                if not data:
                    raise SourceError(f"{url}: row {row}: no image bytes in column {self.image_column!r}")
                if not isinstance(label, int) or isinstance(label, bool):
                    raise SourceError(
                        f"{url}: row {row}: label {label!r} in column {self.label_column!r} is not an integer"
                    )
                fmt = image_format(data, path)
                if fmt is None:
                    raise SourceError(
                        f"{url}: row {row}: cannot tell the image's format (neither its bytes nor its path)"
                    )
                info = tarfile.TarInfo(f"{row:09d}.{fmt}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
                offsets.append(tar.offset - _padded(len(data)))
                sizes.append(len(data))
                labels.append(label)
                formats.append(fmt)
                row += 1
        return offsets, sizes

    def splits(self) -> list[str]:
        return sorted(self._files)

    def classes(self, split: str) -> list[str]:
        if self._class_names is not None:
            return self._class_names
        return label_id_classes(part.labels for part in self._listing.values())

    def size(self, split: str) -> int:
        return len(self._listing[split].labels)

    def listing_digest(self, split: str) -> str:
        part = self._listing[split]
        rows = zip(part.file_of.tolist(), part.rows.tolist(), part.labels.tolist(), strict=True)
        return digest_lines(f"{posixpath.basename(part.files[f])}\0{row}\0{label}" for f, row, label in rows)

    def slice(self, split: str, positions: np.ndarray) -> SourceSlice:
        part = self._listing[split]
        return _ArchiveSlice.select(
            part.staged,
            part.files,
            positions,
            [f"row {row}" for row in part.rows[positions].tolist()],
            [part.formats[p] for p in positions.tolist()],
            archive_of=part.file_of,
            labels=part.labels,
            offsets=part.offsets,
            sizes=part.sizes,
        )


def _padded(size: int) -> int:
    """A member's data size rounded up to tar's 512-byte blocks."""
    return -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
