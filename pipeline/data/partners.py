"""Mixing partners (MixUp, CutMix) from the data shard each sample belongs to (DESIGN
section 5): the cache build, the training loader and ``cache verify`` already hold that
shard's samples, so a partner costs a decode, never a read."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from pipeline.data.shard_format import Sample, decode_image
from pipeline.data.views import MixSource


def shard_mix_source(
    shards: list[list[Sample]],
    image_shape: list[int] | None,
    source: str,
    stored_params: Callable[[Sample], np.ndarray] | None = None,
) -> MixSource:
    """The MixSource of a batch whose row k belongs to the data shard ``shards[k]`` (its
    samples in id order, as ``load_shard`` gives them). ``stored_params`` gives a
    partner's cached view parameters (a student replaying a cache); without it the
    partners' parameters are drawn as the spec says. Decoded partners are kept for the
    source's life: a shard's views reuse them."""
    decoded: dict[int, np.ndarray] = {}

    def partners(ids: np.ndarray) -> tuple[list[np.ndarray], np.ndarray | None]:
        found = [shard[int(i) - shard[0].id] for shard, i in zip(shards, ids, strict=True)]
        for sample in found:
            if sample.id not in decoded:
                decoded[sample.id] = decode_image(sample, image_shape, source)
        images = [decoded[sample.id] for sample in found]
        stored = np.stack([stored_params(s) for s in found]) if stored_params is not None else None
        return images, stored

    ranges = np.array([(shard[0].id, len(shard)) for shard in shards], np.int64).reshape(-1, 2)
    return MixSource(ranges, partners)
