"""On-storage layout of one data shard's targets, and the storage forms.

Per data shard ``j`` one zarr v3 group holds, for its ``n`` samples and ``S`` views:

    cam     (n, S, C, r, r)   pooled teacher CAMs (form-dependent encoding, below)
    logits  (n, S, C)         the teacher's real logits, bias included
    params  (n, S, 5) int32   view parameters (x0, y0, w, h, flip)
    ids     (n,)      int64   sample ids

Each array is one zarr shard (one object on storage) whose inner chunks hold one view
index, so reading the targets of one view of one data shard is one range read per array.

Storage forms of ``cam``:
  float16 / float32  the pooled CAMs as they are;
  int8               each (sample, view, class) map scaled by its max |value| / 127,
                     with the float16 scales in ``cam_scale`` (n, S, C);
  features           pooled features (n, S, D, r, r) in float16 plus the head weight W
                     (C, D) once per cache: ``P(cam) = W . P(features)`` exactly, smaller
                     whenever D < C (CIFAR-100 ResNets: D = 64 < C = 100).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec

from pipeline.cache.identity import StorageForm


def compressors() -> list:
    """zstd with bit-shuffle (float16 maps compress far better bit-shuffled), then a
    crc32c of each compressed chunk: every read, training's included, detects a
    corrupted chunk for the price of a checksum."""
    return [BloscCodec(cname="zstd", clevel=5, shuffle="bitshuffle"), Crc32cCodec()]


def _array(group: zarr.Group, name: str, data: np.ndarray, view_axis: bool = True) -> None:
    chunks = (data.shape[0], 1, *data.shape[2:]) if view_axis else data.shape
    group.create_array(name, data=data, chunks=chunks, shards=data.shape, compressors=compressors())


def encode_targets(form: StorageForm, cam: np.ndarray, features: np.ndarray | None) -> dict[str, np.ndarray]:
    """cam (n, S, C, r, r) float32 -> the arrays stored for ``form``."""
    if form == "float32":
        return {"cam": cam.astype(np.float32)}
    if form == "float16":
        return {"cam": cam.astype(np.float16)}
    if form == "int8":
        scale = np.abs(cam).max(axis=(3, 4)) / 127.0  # (n, S, C)
        safe = np.where(scale > 0, scale, 1.0)
        quantised = np.clip(np.rint(cam / safe[..., None, None]), -127, 127).astype(np.int8)
        return {"cam": quantised, "cam_scale": safe.astype(np.float16)}
    if form == "features":
        if features is None:
            raise ValueError("the features form needs pooled features")
        return {"features": features.astype(np.float16)}
    raise ValueError(f"unknown storage form {form!r}")


def write_group(store: Any, arrays: dict[str, np.ndarray]) -> None:
    group = zarr.open_group(store=store, mode="w", zarr_format=3)
    for name, data in arrays.items():
        _array(group, name, data, view_axis=name != "ids")


def read_view(
    group: zarr.Group, form: StorageForm, view: int, head_weight: np.ndarray | None, decode: bool = True
) -> dict[str, np.ndarray]:
    """Targets of one view of one data shard: ids, params, logits and, decoded, cam
    (n, C, r, r) float32. With ``decode=False`` the arrays stay as stored (float16 cam,
    int8 cam + cam_scale, or features): 2-4x fewer bytes to move, decoded on the
    training device by the same ``decode_stored``."""
    out = {"ids": group["ids"][:], "params": group["params"][:, view], "logits": group["logits"][:, view]}
    out |= {name: group[name][:, view] for name in STORED[form]}
    if not decode:
        return out
    stored = {name: torch.from_numpy(out.pop(name)) for name in ("logits", *STORED[form])}
    cam, logits = decode_stored(stored, torch.from_numpy(head_weight) if head_weight is not None else None)
    return out | {"cam": cam.numpy(), "logits": logits.numpy()}


# The arrays each storage form keeps besides ids, params and logits.
STORED: dict[str, tuple[str, ...]] = {
    "float16": ("cam",),
    "float32": ("cam",),
    "int8": ("cam", "cam_scale"),
    "features": ("features",),
}


def decode_stored(
    stored: dict[str, torch.Tensor], head_weight: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(cam (n, C, r, r), logits (n, C)) in float32 from any storage form, computed on
    the tensors' device: maps as they are, int8 maps times their per-map scales, or
    pooled features projected through the head weight (C, D): P(cam) = W . P(features)."""
    logits = stored["logits"].float()
    if "features" in stored:
        return torch.einsum("cd,ndhw->nchw", head_weight.float(), stored["features"].float()), logits
    cam = stored["cam"].float()
    if "cam_scale" in stored:
        cam = cam * stored["cam_scale"].float()[..., None, None]
    return cam, logits
