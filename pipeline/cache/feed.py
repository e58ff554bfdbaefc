"""The CPU side of a cache build, free of Ray: shards -> rendered views, or images for
the device renderer.

``render_chunks`` reads one data shard and yields it in chunks of consecutive samples
with the view parameters of all S views. With the cpu renderer it decodes each sample
once and renders its S views here; with the device renderer it only decodes (or, for
nvJPEG, leaves the JPEG bytes as they are) and packs the images, which reach the
teacher's device once per sample and are rendered there: S times fewer pixels (or,
as JPEG bytes, about 20 times fewer still) through the object store.
The builder runs it as a Ray generator task per data shard, one CPU each, so as many
shards render in parallel as there are CPUs for it, streaming chunks to the teacher
actors while they work; ``bench/gpu_check.py`` runs it in a process pool.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from pipeline.data import host_images
from pipeline.data.partners import shard_mix_source, shard_ranges
from pipeline.data.shard_format import ShardIndex, decode_image, load_shard
from pipeline.data.views import AugmentSpec, MixSource, render_views, view_params
from pipeline.storage import join


@dataclass
class FeedChunk:
    j: int  # data shard
    ids: np.ndarray  # (m,) consecutive sample ids
    params: np.ndarray  # (m, S, P) int32 view parameters (P: the spec's num_params)
    views: np.ndarray | None = None  # (m, S, 3, H, W) uint8: the cpu renderer's views
    images: dict[str, np.ndarray] | None = None  # host_images.pack: for the device renderer


def render_chunks(
    data: str, index: ShardIndex, j: int, spec: AugmentSpec, num_views: int, chunk_samples: int
) -> Iterator[FeedChunk]:
    info = index.shards[j]
    source = join(data, info.name)
    samples = load_shard(data, index, info)
    if spec.renderer == "device" and spec.mixes:
        # The device mixes each view with its partner's, so the partner's image must be in
        # the chunk: a whole shard per chunk holds every partner, and no image travels twice.
        chunk_samples = len(samples)
    for start in range(0, len(samples), chunk_samples):
        part = samples[start : start + chunk_samples]
        ids = np.array([s.id for s in part], np.int64)
        if spec.renderer == "device":
            images = host_images.pack(part, index.image_shape, source, spec.decoder)
            hw = host_images.image_sizes(images)
            ranges = shard_ranges([samples] * len(part)) if spec.mixes else None
            params = np.stack([view_params(spec, ids, view, hw, ranges) for view in range(num_views)], axis=1)
            params = params.astype(np.int32)
            yield FeedChunk(j, ids, params, images=images)
        else:
            images = [decode_image(s, index.image_shape, source) for s in part]
            # a mixing spec's partners come from this same shard, which is in hand
            mixing = shard_mix_source([samples] * len(part), index.image_shape, source) if spec.mixes else None
            yield FeedChunk(j, ids, *_render_all(spec, images, ids, num_views, mixing))


def _render_all(
    spec: AugmentSpec, images: list[np.ndarray], ids: np.ndarray, num_views: int, mixing: MixSource | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(params (m, S, P) int32, views (m, S, 3, H, W) uint8) of images decoded once for all S views."""
    params = np.empty((len(images), num_views, spec.num_params), np.int32)
    views = None
    for view in range(num_views):
        p, batch = render_views(spec, images, ids, view, mixing=mixing)
        if views is None:
            views = np.empty((len(images), num_views, *batch.shape[1:]), np.uint8)
        params[:, view], views[:, view] = p, batch.numpy()
    return params, views
