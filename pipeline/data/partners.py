"""Mixing partners (MixUp, CutMix) from the data shard each sample belongs to (DESIGN
section 5): the cache build, the training loader and ``cache verify`` already hold that
shard's samples, so a partner costs a decode, never a read.

The CPU renderer takes its partners' decoded images from a ``MixSource``
(``shard_mix_source``). The device renderer mixes on the device, so a partner's image
must travel with the batch: ``pack_for_device`` packs the partners a batch does not
already hold after its own images, and ``device_render.render_packed`` finds every
partner among the images it was sent.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from pipeline.data import host_images
from pipeline.data.shard_format import Sample, decode_image
from pipeline.data.views import AugmentSpec, MixSource, mix_of, replay_params


def shard_ranges(shards: list[list[Sample]]) -> np.ndarray:
    """(n, 2) first id and sample count of each row's data shard: what mixing draws
    partners from (``view_params``'s ``shards``)."""
    return np.array([(shard[0].id, len(shard)) for shard in shards], np.int64).reshape(-1, 2)


def partner_samples(spec: AugmentSpec, shards: list[list[Sample]], params: np.ndarray) -> list[Sample]:
    """The partner of each row (params (n, P) of one view), looked up in its shard."""
    partner_ids, _ = mix_of(spec, params)
    return [shard[int(p) - shard[0].id] for shard, p in zip(shards, partner_ids, strict=True)]


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

    return MixSource(shard_ranges(shards), partners)


def pack_for_device(
    spec: AugmentSpec,
    samples: list[Sample],
    shards: list[list[Sample]] | None,
    view: int,
    image_shape: list[int] | None,
    source: str,
    stored: np.ndarray | None = None,
    partner_stored: Callable[[Sample], np.ndarray] | None = None,
    params_source: str = "",
) -> dict[str, np.ndarray]:
    """The device renderer's share of a batch: ``samples`` packed (``host_images.pack``),
    their ``ids`` and their ``params`` of view ``view`` (n, P), the ``stored`` ones
    (checked, errors naming ``params_source``) or drawn. For a mixing spec (row k of data shard
    ``shards[k]``) the partners the batch lacks are packed after its own images, their
    ids and parameters as ``partner_ids`` and ``partner_params``: a partner's are its
    stored ones (``partner_stored``, from a cache) or drawn, its own view of the same
    index as on the CPU renderer. ``device_render.batch_views`` renders and mixes it all."""
    packed = host_images.pack(samples, image_shape, source, spec.decoder)
    ids = np.array([s.id for s in samples], np.int64)
    ranges = shard_ranges(shards) if spec.mixes else None
    params_source = params_source or source
    params = replay_params(spec, ids, view, host_images.image_sizes(packed), stored, params_source, ranges)
    packed |= {"ids": ids, "params": params}
    if not spec.mixes:
        return packed
    held = set(ids.tolist())
    extra: dict[int, tuple[Sample, list[Sample]]] = {}
    for partner, shard in zip(partner_samples(spec, shards, params), shards, strict=True):
        if partner.id not in held and partner.id not in extra:
            extra[partner.id] = (partner, shard)
    if not extra:
        return packed
    found = [sample for sample, _ in extra.values()]
    partners = host_images.pack(found, image_shape, source, spec.decoder)
    partner_ids = np.array(list(extra), np.int64)
    partner_params = replay_params(
        spec,
        partner_ids,
        view,
        host_images.image_sizes(partners),
        np.stack([partner_stored(s) for s in found]) if partner_stored is not None else None,
        params_source,
        shard_ranges([shard for _, shard in extra.values()]),
    )
    packed |= host_images.concat(packed, partners) | {"partner_ids": partner_ids, "partner_params": partner_params}
    return packed
