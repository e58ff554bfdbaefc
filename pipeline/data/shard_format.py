"""WebDataset shards and their index (DESIGN section 4).

A shard ``<split>-<j:06d>.tar`` holds a contiguous id range; each sample is a group of
tar members ``<key>.<field>`` with ``key`` the zero-padded id: the image (``jpg``,
``png``, ... as the source had it, or ``rgb`` raw uint8 pixels for small images),
``cls`` (the class index as text) and, for synthetic data, ``box`` (x0,y0,x1,y1).
Shards are written by webdataset's ``TarWriter`` with fixed member metadata (mtime 0,
no owner), so the same samples always give the same bytes and the same sha256, and
the dataset fingerprint is stable across reruns. They are read by a direct header
walk (``_tar_members``): ``bench/scale.py`` measures it against webdataset's tar
iterator (docs/data.md gives the figures).

``<split>.index.json`` is written last, through a temporary name and a move.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import tarfile
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from catkd.errors import CatkdError
from pipeline.storage import cat_sized, filesystem, join, write_atomic

# torchvision 0.29 marks its image codecs deprecated in favour of TorchCodec; they still
# work and are the fastest decoders we have, so the per-call warning is silenced here.
warnings.filterwarnings(
    "ignore", message="The image decoding and encoding capabilities of TorchVision", category=DeprecationWarning
)

INDEX_FORMAT = "catkd.shards"
# 2: ids are positions in a seeded permutation of the sorted source order (class-mixed
# shards); version 1 shards were class-sorted and are refused with a message to reshard.
INDEX_VERSION = 2
KEY_DIGITS = 9
RAW_FORMAT = "rgb"
PROGRESS_DIR = "_progress"  # the shard job's completion records (and each shard's sample offsets)
_TORCHVISION_FORMATS = {"jpg", "png", "gif", "webp"}


class ShardError(CatkdError, ValueError):
    """Bad shard data; the message names the file and, where known, the sample key."""


def sample_key(sample_id: int) -> str:
    return f"{sample_id:0{KEY_DIGITS}d}"


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


@dataclass
class Sample:
    id: int
    label: int
    image: bytes  # encoded bytes, or raw HxWx3 uint8 bytes when fmt == "rgb"
    fmt: str
    box: tuple[int, int, int, int] | None = None
    # Cached teacher targets joined by the reader: {"params", "cam", "logits"} rows.
    target: dict[str, np.ndarray] | None = None
    # Its data shard's samples in id order, kept by a reader whose views mix (partners).
    shard: list[Sample] | None = field(default=None, repr=False)


def encode_shard(samples: list[Sample]) -> bytes:
    """A WebDataset tar with deterministic bytes."""
    import webdataset as wds

    buf = io.BytesIO()
    with wds.TarWriter(buf, user="", group="", mtime=0, encoder=False, format=tarfile.USTAR_FORMAT) as writer:
        for s in samples:
            fields = {"__key__": sample_key(s.id), s.fmt: s.image, "cls": str(s.label).encode()}
            if s.box is not None:
                fields["box"] = ",".join(map(str, s.box)).encode()
            writer.write(fields)
    return buf.getvalue()


def _tar_members(data: bytes, source: str) -> Iterator[tuple[str, bytes, int]]:
    """(name, payload, header offset) of each regular file in a ustar archive, without
    tarfile's per-member overhead (a few microseconds a member instead of ~50). Checks
    each header's checksum and that the archive ends with its end-of-archive block."""
    view = memoryview(data)
    pos, last = 0, "(none)"
    while pos + 512 <= len(data):
        header = bytes(view[pos : pos + 512])
        if header.count(0) == 512:
            return  # end-of-archive block
        try:
            checksum = int(header[148:156].strip(b"\0 ") or b"-1", 8)
            size = int(header[124:136].strip(b"\0 ") or b"0", 8)
        except ValueError:
            checksum, size = -1, 0
        if checksum != sum(header[:148]) + 256 + sum(header[156:]):
            raise ShardError(f"{source}: corrupt tar header after member {last}")
        name = header[:100].split(b"\0", 1)[0].decode()
        prefix = header[345:500].split(b"\0", 1)[0].decode()
        name = f"{prefix}/{name}" if prefix else name
        start = pos + 512
        if start + size > len(data):
            raise ShardError(f"{source}: truncated in member {name}")
        if header[156:157] in (b"0", b"\0"):
            yield name, bytes(view[start : start + size]), pos
        last = name
        pos = start + (size + 511) // 512 * 512
    raise ShardError(f"{source}: truncated after member {last} (no end-of-archive block)")


def sample_offsets(data: bytes, source: str) -> np.ndarray:
    """(count + 1,) int64: where each sample's first header starts in a shard's tar, then
    where its last sample ends (the end-of-archive blocks): sample k is the bytes
    ``[offsets[k], offsets[k + 1])``, a reader of a few samples reads only theirs."""
    starts, key, end = [], None, 0
    for name, payload, at in _tar_members(data, source):
        if name.partition(".")[0] != key:
            key = name.partition(".")[0]
            starts.append(at)
        end = at + 512 + (len(payload) + 511) // 512 * 512
    return np.array([*starts, end], np.int64)


def offsets_path(root: str, info: ShardInfo) -> str:
    """Where the shard job stores ``sample_offsets`` of a shard (raw little-endian int64)."""
    return join(root, PROGRESS_DIR, f"{info.name}.offsets")


def read_samples(url: str, index: ShardIndex, info: ShardInfo, positions: list[int]) -> dict[int, Sample] | None:
    """Samples at ``positions`` of one shard, reading only their bytes (two rounds of
    ranged reads: the offsets from the first position's to the last's in one read, 8
    bytes a sample, then the samples' members concurrently), checked against the index
    (id and label); None for a shard written without offsets (an older catkd), which the
    caller reads whole with ``load_shard``."""
    fs, root = filesystem(url)
    path = join(root, info.name)
    if not positions:
        return {}
    low, high = min(positions), max(positions)
    try:
        raw = fs.cat_file(offsets_path(root, info), start=8 * low, end=8 * high + 16)
    except FileNotFoundError:
        return None
    offsets = np.frombuffer(raw, "<i8")
    if len(offsets) != high - low + 2:
        raise ShardError(f"{offsets_path(root, info)}: cut short (expected {info.count + 1} offsets)")
    out = {}
    spans = [offsets[k - low : k - low + 2] for k in positions]
    chunks = fs.cat_ranges([path] * len(positions), [int(s[0]) for s in spans], [int(s[1]) for s in spans])
    for k, chunk in zip(positions, chunks, strict=True):
        if isinstance(chunk, BaseException):
            raise ShardError(f"{path}: cannot read sample {sample_key(info.first_id + k)} ({type(chunk).__name__})")
        found = list(decode_shard(chunk + b"\0" * 1024, f"{path} (sample {k})"))
        expected = info.first_id + k
        if len(found) != 1 or found[0].id != expected:
            raise ShardError(
                f"{path}: the bytes its offsets give for sample {sample_key(expected)} hold "
                f"{[sample_key(s.id) for s in found]}; the offsets are stale (reshard, or read the shard whole)"
            )
        if not 0 <= found[0].label < index.num_classes:
            raise ShardError(
                f"{path}: sample {sample_key(expected)}: label {found[0].label} outside 0..{index.num_classes - 1}"
            )
        out[k] = found[0]
    return out


def decode_shard(data: bytes, source: str) -> Iterator[Sample]:
    """Samples of one shard's bytes, in order; a damaged tar raises ``ShardError``."""
    current: dict[str, Any] = {}
    for name, payload, _ in _tar_members(data, source):
        key, _, ext = name.partition(".")
        if current and key != current["key"]:
            yield _to_sample(current, source)
            current = {}
        current["key"] = key
        current[ext] = payload
    if current:
        yield _to_sample(current, source)


def _to_sample(fields: dict[str, Any], source: str) -> Sample:
    key = fields.pop("key")
    try:
        label = int(fields.pop("cls"))
    except (KeyError, ValueError):
        raise ShardError(f"{source}: sample {key}: missing or malformed class label") from None
    box = tuple(int(v) for v in fields.pop("box").decode().split(",")) if "box" in fields else None
    if len(fields) != 1:
        raise ShardError(f"{source}: sample {key}: expected one image field, found {sorted(fields)}")
    ((fmt, image),) = fields.items()
    if not key.isdigit():
        raise ShardError(f"{source}: sample {key}: key is not a decimal id")
    return Sample(int(key), label, image, fmt, box)


@dataclass
class ShardInfo:
    name: str
    first_id: int
    count: int
    bytes: int
    sha256: str


@dataclass
class ShardIndex:
    split: str
    classes: list[str]
    image_format: str  # "rgb" for raw pixels, else the source encoding ("jpg", "png", ... or "mixed")
    image_shape: list[int] | None  # [H, W] when every image has the same size
    has_boxes: bool
    shards: list[ShardInfo]
    order_seed: int = 0  # id i is position permutation(order_seed)[i] of the sorted source order
    settings: dict[str, Any] = field(default_factory=dict)
    fingerprint: str = ""
    format: str = INDEX_FORMAT
    version: int = INDEX_VERSION

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def num_samples(self) -> int:
        return sum(s.count for s in self.shards)

    def to_json(self) -> str:
        data = asdict(self)
        data["num_samples"] = self.num_samples
        data["num_classes"] = self.num_classes
        return json.dumps(data, indent=1)


def fingerprint(shards: list[ShardInfo]) -> str:
    """sha256 over the shards' sha256 digests, in order."""
    h = hashlib.sha256()
    for s in shards:
        h.update(bytes.fromhex(s.sha256))
    return h.hexdigest()


def index_name(split: str) -> str:
    return f"{split}.index.json"


def write_index(url: str, index: ShardIndex) -> None:
    fs, root = filesystem(url)
    index.fingerprint = fingerprint(index.shards)
    write_atomic(fs, join(root, index_name(index.split)), index.to_json().encode())


def read_index(url: str, split: str) -> ShardIndex:
    fs, root = filesystem(url)
    path = join(root, index_name(split))
    if not fs.exists(path):
        raise ShardError(f"{path}: no index for split {split!r} (was the dataset sharded into {url}?)")
    try:
        data = json.loads(fs.cat_file(path))
    except ValueError as exc:
        raise ShardError(f"{path}: not valid JSON ({exc})") from exc
    if data.get("format") == INDEX_FORMAT and data.get("version") == 1:
        raise ShardError(
            f"{path}: written by an older catkd (index version 1: ids in sorted source order, so shards of an image "
            "folder hold one class each); reshard the source with `catkd shard` into a new folder "
            f"(index version {INDEX_VERSION})"
        )
    if data.get("format") != INDEX_FORMAT or data.get("version") != INDEX_VERSION:
        raise ShardError(
            f"{path}: format {data.get('format')!r} version {data.get('version')!r}, expected {INDEX_FORMAT!r} "
            f"{INDEX_VERSION}"
        )
    data.pop("num_samples", None)
    data.pop("num_classes", None)
    data["shards"] = [ShardInfo(**s) for s in data["shards"]]
    index = ShardIndex(**data)
    if fingerprint(index.shards) != index.fingerprint:
        raise ShardError(f"{path}: fingerprint does not match the shard hashes it lists")
    return index


def load_shard(url: str, index: ShardIndex, info: ShardInfo) -> list[Sample]:
    """Read one shard whole, check it against its index entry, and return its samples."""
    fs, root = filesystem(url)
    path = join(root, info.name)
    try:
        data = cat_sized(fs, path, info.bytes)
    except FileNotFoundError:
        raise ShardError(f"{path}: shard listed in {index_name(index.split)} is missing") from None
    samples = list(decode_shard(data, path))  # a damaged tar names its sample here
    if len(data) != info.bytes or hashlib.sha256(data).hexdigest() != info.sha256:
        raise ShardError(
            f"{path}: size or sha256 does not match {index_name(index.split)} "
            f"({len(data)} bytes, index says {info.bytes}); the shard is corrupt or the index is stale "
            f"(samples {sample_key(info.first_id)}..{sample_key(info.first_id + info.count - 1)})"
        )
    expected = list(range(info.first_id, info.first_id + info.count))
    got = [s.id for s in samples]
    if got != expected:
        first_bad = next(
            (sample_key(e) for e, g in zip(expected, got, strict=False) if e != g),
            sample_key(expected[min(len(got), len(expected) - 1)]),
        )
        raise ShardError(
            f"{path}: holds {len(got)} samples, index says ids {info.first_id}..{info.first_id + info.count - 1}; "
            f"first mismatch at sample {first_bad}"
        )
    for s in samples:
        if not 0 <= s.label < index.num_classes:
            raise ShardError(f"{path}: sample {sample_key(s.id)}: label {s.label} outside 0..{index.num_classes - 1}")
    return samples


@functools.cache
def _torchvision_decoder() -> Callable[[bytes], np.ndarray]:
    """Encoded bytes -> (H, W, 3) uint8 RGB. Imported on first use, once: a process that
    only writes or checks shards (catkd shard's driver and tasks) never loads torch and
    torchvision (2.5-5 s each), and the loader's per-image call pays no import lookup."""
    import torch
    from torchvision.io import ImageReadMode
    from torchvision.io import decode_image as decode_image_tensor

    def decode(encoded: bytes) -> np.ndarray:
        data = torch.frombuffer(bytearray(encoded), dtype=torch.uint8)
        return decode_image_tensor(data, mode=ImageReadMode.RGB).permute(1, 2, 0).numpy()

    return decode


def decode_image(sample: Sample, shape: list[int] | None, source: str) -> np.ndarray:
    """(H, W, 3) uint8 RGB; grayscale, palette and RGBA images are converted."""
    if sample.fmt == RAW_FORMAT:
        if shape is None:
            raise ShardError(f"{source}: sample {sample_key(sample.id)}: raw pixels but the index has no image shape")
        expected = shape[0] * shape[1] * 3
        if len(sample.image) != expected:
            raise ShardError(
                f"{source}: sample {sample_key(sample.id)}: {len(sample.image)} raw bytes, expected {expected}"
            )
        return np.frombuffer(sample.image, np.uint8).reshape(shape[0], shape[1], 3)
    try:
        if sample.fmt in _TORCHVISION_FORMATS:
            # libjpeg-turbo / libpng through torchvision: faster than PIL for small images.
            return _torchvision_decoder()(sample.image)
        from PIL import Image

        with Image.open(io.BytesIO(sample.image)) as img:
            return np.asarray(img.convert("RGB"))
    except Exception as exc:  # decoders raise many types for bad data
        raise ShardError(f"{source}: sample {sample_key(sample.id)}: undecodable {sample.fmt} image ({exc})") from exc
