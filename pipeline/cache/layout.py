"""On-storage layout of one data shard's targets, and the storage forms.

Per data shard ``j`` one zarr v3 group holds, for its ``n`` samples and ``S`` views:

    cam     (n, S, C, r, r)   pooled teacher CAMs (form-dependent encoding, below)
    logits  (n, S, C)         the teacher's real logits, bias included
    params  (n, S, P) int32   view parameters (x0, y0, w, h, flip, then the spec's stages)
    ids     (n,)      int64   sample ids

Each array is one zarr shard (one object on storage) whose inner chunks hold one view
index, so reading the targets of one view of one data shard is one range read per array.
The group's zarr.json also holds every array's metadata (zarr's consolidated metadata), so
opening a shard's group is one request.

Storage forms (``logits`` in float16, float32 for the float32 form):
  float16 / float32  the pooled CAMs as they are;
  int8               each (sample, view, class) map scaled by its max |value| / 127,
                     with the float16 scales in ``cam_scale`` (n, S, C);
  features           pooled features (n, S, D, r, r) in float16 plus the head weight W
                     (C, D) once per cache: ``P(cam) = W . P(features)`` exactly, smaller
                     whenever D < C (CIFAR-100 ResNets: D = 64 < C = 100);
  topk:K             per view only the K classes with the highest teacher logits, in
                     descending order (ties to the lower class index): ``classes``
                     (n, S, K) int16 (int32 beyond 32,767 classes), ``cam`` (n, S, K, r, r)
                     in float16, and ``logits`` (n, S, K + 1) in float16: the K classes'
                     logits, then the logit that spreads the leftover probability mass
                     evenly over the other C - K classes, logsumexp(rest) - log(C - K)
                     (in the same array: one read fewer per shard). Decoded, the C
                     logits are the K stored ones and that last one elsewhere, which
                     keeps the teacher's softmax over the K classes and the rest's total
                     at temperature 1 exactly (TinyViT's sparse soft labels spread the
                     leftover the same way); CAT needs nothing of the rest classes, since
                     it transfers only the K stored maps (the paper's top-n partial CAMs).
"""

from __future__ import annotations

import asyncio
import posixpath
import warnings
from typing import Any

import numpy as np
import torch
import zarr
import zarr.api.asynchronous
from zarr.codecs import BloscCodec, Crc32cCodec
from zarr.core.sync import sync

from pipeline.cache.identity import StorageForm, parse_storage
from pipeline.storage import filesystem, is_local


def compressors() -> list:
    """zstd with bit-shuffle (float16 maps compress far better bit-shuffled), then a
    crc32c of each compressed chunk: every read, training's included, detects a
    corrupted chunk for the price of a checksum."""
    return [BloscCodec(cname="zstd", clevel=5, shuffle="bitshuffle"), Crc32cCodec()]


def _array(group: zarr.Group, name: str, data: np.ndarray, view_axis: bool = True) -> None:
    chunks = (data.shape[0], 1, *data.shape[2:]) if view_axis else data.shape
    group.create_array(name, data=data, chunks=chunks, shards=data.shape, compressors=compressors())


def encode_targets(
    form: StorageForm,
    cam: np.ndarray,
    logits: np.ndarray,
    features: np.ndarray | None,
    classes: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """cam (n, S, C, r, r) and logits (n, S, C) float32 -> the arrays stored for ``form``.
    For topk:K, ``classes`` (n, S, K) says the maps in ``cam`` are already those of the
    kept classes (n, S, K, r, r), as a teacher computes them (``topk_classes``)."""
    kind, k = parse_storage(form)
    if kind == "topk":
        if classes is None:
            classes = topk_classes(torch.from_numpy(logits), k).numpy()
            cam = np.take_along_axis(cam, classes[..., None, None], axis=2)
        return _encode_topk(classes, cam, logits)
    stored_logits = {"logits": logits.astype(np.float32 if kind == "float32" else np.float16)}
    if kind == "float32":
        return stored_logits | {"cam": cam.astype(np.float32)}
    if kind == "float16":
        return stored_logits | {"cam": cam.astype(np.float16)}
    if kind == "int8":
        scale = np.abs(cam).max(axis=(3, 4)) / 127.0  # (n, S, C)
        safe = np.where(scale > 0, scale, 1.0)
        quantised = np.clip(np.rint(cam / safe[..., None, None]), -127, 127).astype(np.int8)
        return stored_logits | {"cam": quantised, "cam_scale": safe.astype(np.float16)}
    if features is None:
        raise ValueError("the features form needs pooled features")
    return stored_logits | {"features": features.astype(np.float16)}


def class_index_dtype(num_classes: int) -> np.dtype:
    return np.dtype(np.int16 if num_classes <= np.iinfo(np.int16).max else np.int32)


def topk_classes(logits: torch.Tensor, k: int) -> torch.Tensor:
    """The K classes kept of each view (..., C) -> (..., K) int64, in descending order of
    the float16-rounded logits, ties to the lower class index (a stable sort), as
    select_classes chooses on a float16 cache's logits: rounding is monotone, so both
    pick the same K classes and the two caches give the same CAT loss."""
    rounded = logits.to(torch.float16).float()
    return torch.sort(rounded, dim=-1, descending=True, stable=True).indices[..., :k]


def _encode_topk(classes: np.ndarray, top_cam: np.ndarray, logits: np.ndarray) -> dict[str, np.ndarray]:
    num_classes, k = logits.shape[-1], classes.shape[-1]
    top_logits = np.take_along_axis(logits.astype(np.float16), classes, axis=-1)
    if k < num_classes:
        rest = logits.astype(np.float64)
        np.put_along_axis(rest, classes, -np.inf, axis=-1)
        peak = rest.max(axis=-1, keepdims=True)
        logsumexp = peak[..., 0] + np.log(np.exp(rest - peak).sum(axis=-1))
        logit_rest = logsumexp - np.log(num_classes - k)
    else:  # nothing left over; the value is never used
        logit_rest = np.zeros(logits.shape[:-1])
    return {
        "classes": classes.astype(class_index_dtype(num_classes)),
        "cam": top_cam.astype(np.float16),
        "logits": np.concatenate([top_logits, logit_rest.astype(np.float16)[..., None]], axis=-1),
    }


def raw_bytes_per_view(
    form: StorageForm, num_classes: int, resolution: int, feature_dim: int | None = None, num_params: int = 5
) -> int:
    """Uncompressed bytes one view takes in ``form`` (targets, logits and the int32 view
    parameters: five, more with augmentation stages): the arithmetic behind
    docs/cache.md's size tables and ``catkd cache info``."""
    kind, k = parse_storage(form)
    maps = resolution * resolution
    params = num_params * 4
    if kind == "topk":
        index = class_index_dtype(num_classes).itemsize
        return k * (index + 2 * maps + 2) + 2 + params
    logit_bytes = 4 if kind == "float32" else 2
    per_class = {"float32": 4 * maps, "float16": 2 * maps, "int8": maps + 2}.get(kind)
    if kind == "features":
        if feature_dim is None:
            raise ValueError("the features form's size needs the feature width D")
        return 2 * feature_dim * maps + logit_bytes * num_classes + params
    return num_classes * (per_class + logit_bytes) + params


def write_group(url: str, arrays: dict[str, np.ndarray]) -> None:
    """One data shard's zarr group at ``url`` (a fresh folder: nothing is there to clear).
    On an object store the group is encoded in memory and its objects (metadata and one
    shard per array) uploaded in one batched ``pipe``, concurrent on s3fs: a handful of
    PUTs in one round, where zarr's own writes to the store checked, listed and wrote
    one request at a time (47 requests for 4 arrays)."""
    fs, path = filesystem(url)
    if is_local(fs):
        _write_arrays(zarr.storage.LocalStore(path), arrays)
        return
    objects: dict = {}
    _write_arrays(zarr.storage.MemoryStore(objects), arrays)
    fs.pipe({posixpath.join(path, key): buffer.to_bytes() for key, buffer in objects.items()})


def _write_arrays(store: Any, arrays: dict[str, np.ndarray]) -> None:
    group = zarr.open_group(store=store, mode="w", zarr_format=3)
    for name, data in arrays.items():
        _array(group, name, data, view_axis=name != "ids")
    # Every array's metadata copied into the group's zarr.json: a reader (verify, the
    # training loaders) opens a shard with one metadata request instead of one per array
    # plus the group's (verify's requests a shard: 7 from 11). Each array keeps its own
    # zarr.json, so readers that ignore the consolidated copy read the shard as before,
    # and shards written before this are read the old way.
    with warnings.catch_warnings():  # "not part of the Zarr format 3 specification" yet
        warnings.simplefilter("ignore", category=UserWarning)
        zarr.consolidate_metadata(store)


class ArrayReadError(Exception):
    """An array of a data shard's group that could not be read: its name and why."""

    def __init__(self, name: str, cause: BaseException) -> None:
        # the first sentence: zarr's checksum error goes on with the raw digests
        reason = (str(cause).splitlines() or [""])[0].split(". ")[0].rstrip(".")
        super().__init__(f"array {name}: {type(cause).__name__}: {reason}")
        self.name, self.cause = name, cause


def read_arrays(store: Any, selections: dict[str, Any]) -> dict[str, np.ndarray]:
    """The ``selections`` (array name -> index) of the zarr group in ``store``, read
    together in one call into zarr's event loop: each synchronous zarr call is a hand-off
    to that loop's thread, and on object storage the requests overlap instead of
    queueing one after another."""

    async def gather() -> list[np.ndarray]:
        try:
            group = await zarr.api.asynchronous.open_group(store=store, mode="r", zarr_format=3)
        except Exception as exc:  # the group's own metadata is missing or unreadable
            raise ArrayReadError("(group metadata)", exc) from exc

        async def one(name: str, selection: Any) -> np.ndarray:
            try:
                return await (await group.getitem(name)).getitem(selection)
            except Exception as exc:  # zarr's crc32c and shard-index checks, codec errors, missing objects
                raise ArrayReadError(name, exc) from exc

        return await asyncio.gather(*(one(name, sel) for name, sel in selections.items()))

    return dict(zip(selections, sync(gather()), strict=True))


def read_view(
    store: Any,
    form: StorageForm,
    view: int,
    head_weight: np.ndarray | None,
    decode: bool = True,
    num_classes: int | None = None,
) -> dict[str, np.ndarray]:
    """Targets of one view of the data shard whose group is in ``store``: ids, params,
    logits and, decoded, cam
    (n, C, r, r) float32 (topk:K: (n, K, r, r) with ``classes`` (n, K) and logits over
    all ``num_classes``). With ``decode=False`` the arrays stay as stored (float16 cam,
    int8 cam + cam_scale, features, or the top-k arrays): 2-4x fewer bytes to move,
    decoded on the training device by the same ``decode_stored``."""
    names = ("params", "logits", *stored_arrays(form))
    out = read_arrays(store, {"ids": slice(None)} | {name: (slice(None), view) for name in names})
    return decode_view(out, form, head_weight, num_classes) if decode else out


def decode_view(
    out: dict[str, np.ndarray], form: StorageForm, head_weight: np.ndarray | None, num_classes: int | None
) -> dict[str, np.ndarray]:
    """One view's arrays as stored (ids, params, logits and the form's arrays) -> decoded
    as ``read_view`` returns them."""
    out = dict(out)
    stored = {name: torch.from_numpy(out.pop(name)) for name in ("logits", *stored_arrays(form))}
    head = torch.from_numpy(head_weight) if head_weight is not None else None
    cam, logits, classes = decode_stored(stored, head, num_classes)
    out |= {"cam": cam.numpy(), "logits": logits.numpy()}
    return out | ({"classes": classes.numpy()} if classes is not None else {})


def stored_arrays(form: StorageForm) -> tuple[str, ...]:
    """The arrays a storage form keeps besides ids, params and logits."""
    return {
        "float16": ("cam",),
        "float32": ("cam",),
        "int8": ("cam", "cam_scale"),
        "features": ("features",),
        "topk": ("cam", "classes"),
    }[parse_storage(form)[0]]


def decode_stored(
    stored: dict[str, torch.Tensor], head_weight: torch.Tensor | None = None, num_classes: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(cam, logits (n, C), classes) in float32 (classes int64) from any storage form,
    computed on the tensors' device. Dense forms give cam (n, C, r, r) and classes None:
    maps as they are, int8 maps times their per-map scales, or pooled features projected
    through the head weight (C, D): P(cam) = W . P(features). topk:K gives the K stored
    maps (n, K, r, r), their class indices (n, K), and the C logits rebuilt from the K
    stored ones and the rest's logit stored after them (``num_classes`` is C)."""
    logits = stored["logits"].float()
    if "classes" in stored:
        if num_classes is None:
            raise ValueError("decoding top-k targets needs the class count")
        classes = stored["classes"].long()
        dense = logits[:, -1:].expand(len(logits), num_classes).clone()
        return stored["cam"].float(), dense.scatter_(1, classes, logits[:, :-1]), classes
    if "features" in stored:
        return torch.einsum("cd,ndhw->nchw", head_weight.float(), stored["features"].float()), logits, None
    cam = stored["cam"].float()
    if "cam_scale" in stored:
        cam = cam * stored["cam_scale"].float()[..., None, None]
    return cam, logits, None
