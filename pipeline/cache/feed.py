"""The CPU side of a cache build, free of Ray: shards -> rendered views.

``render_chunks`` reads one data shard, decodes each sample once, and yields it in
chunks of consecutive samples with all S views rendered by the one view renderer.
The builder runs it as a Ray generator task per data shard, one CPU each, so as many
shards render in parallel as there are CPUs for it, streaming chunks to the teacher
actors while they work; ``bench/gpu_check.py`` runs it in a process pool.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from pipeline.data.shard_format import ShardIndex, decode_image, load_shard
from pipeline.data.views import AugmentSpec, render_views
from pipeline.storage import join


@dataclass
class FeedChunk:
    j: int  # data shard
    ids: np.ndarray  # (m,) consecutive sample ids
    params: np.ndarray  # (m, S, 5) int32 view parameters
    views: np.ndarray  # (m, S, 3, H, W) uint8


def render_chunks(data: str, index: ShardIndex, j: int, spec: AugmentSpec, num_views: int, chunk_samples: int) -> Iterator[FeedChunk]:
    info = index.shards[j]
    source = join(data, info.name)
    samples = load_shard(data, index, info)
    for start in range(0, len(samples), chunk_samples):
        part = samples[start : start + chunk_samples]
        images = [decode_image(s, index.image_shape, source) for s in part]  # once, for all S views
        ids = np.array([s.id for s in part], np.int64)
        params = np.empty((len(part), num_views, 5), np.int32)
        views = None
        for view in range(num_views):
            p, batch = render_views(spec, images, ids, view)
            if views is None:
                views = np.empty((len(part), num_views, *batch.shape[1:]), np.uint8)
            params[:, view], views[:, view] = p, batch.numpy()
        yield FeedChunk(j, ids, params, views)
