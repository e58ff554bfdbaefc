"""``catkd cache info`` and ``catkd cache verify``."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import torch

from catkd.models import load_checkpoint
from pipeline.cache.identity import file_sha256
from pipeline.cache.reader import TargetCache
from pipeline.cache.teacher import TeacherRunner, TeacherSettings, array_checksums
from pipeline.data.shard_format import decode_image, load_shard, read_index, sample_key
from pipeline.data.views import AugmentSpec, ViewMismatchError, render_views
from pipeline.storage import filesystem, join

# Tolerances for recomputed targets, relative to the largest |value| of the sample's
# maps: the storage form's rounding plus what the compute precision lets a recompute
# differ by (another batch size runs other kernels; bf16 keeps 8 bits of mantissa).
# bench/cache.py measures both parts; docs/cache.md gives the figures.
TOLERANCE = {"float32": 1e-4, "float16": 2e-3, "features": 4e-3, "int8": 1.2e-2}
PRECISION_TOLERANCE = {"fp32": 0.0, "tf32": 1e-2, "bf16": 4e-2}


def cache_info(url: str) -> dict[str, Any]:
    cache = TargetCache(url)
    fs, root = filesystem(url)
    stored = fs.du(join(root, "data"), total=True)
    views = cache.manifest["num_samples"] * cache.identity.num_views
    return {
        "url": url,
        "cache_id": cache.manifest["cache_id"],
        "identity": cache.manifest["identity"],
        "arrays": cache.manifest["arrays"],
        "codecs": cache.manifest["codecs"],
        "shards_complete": f"{len(cache.records)}/{len(cache.records)}",
        "bytes_on_storage": stored,
        "bytes_per_view": stored / views,
        "created": cache.manifest["created"],
        "versions": cache.manifest["versions"],
    }


def verify_cache(url: str, *, sample_views: int = 16, weights: str | None = None, seed: int = 0) -> list[str]:
    """Problems found (empty when the cache is sound): completeness, checksums, finite
    values, and ``sample_views`` random (sample, view) pairs recomputed with the teacher."""
    cache = TargetCache(url)
    problems: list[str] = []
    for j, record in sorted(cache.records.items()):
        try:
            group = cache.group(j)
            arrays = {name: group[name][:] for name in record["checksums"]}
        except Exception as exc:  # zarr's own shard-index checksums, codec errors, missing objects
            problems.append(f"{url}: data shard {j} (samples from {sample_key(record['first_id'])}): unreadable ({exc})")
            continue
        for name, digest in array_checksums(arrays).items():
            if digest != record["checksums"][name]:
                problems.append(f"{url}: data shard {j}: array {name} does not match its checksum")
        for name, values in arrays.items():
            if values.dtype.kind == "f" and not np.isfinite(values).all():
                k = int(np.argwhere(~np.isfinite(values))[0][0])
                problems.append(f"{url}: data shard {j}: sample {sample_key(int(arrays['ids'][k]))}: non-finite {name}")
    if sample_views and not problems:
        problems += _recompute(cache, sample_views, weights or cache.manifest["teacher_weights"], seed)
    return problems


def _recompute(cache: TargetCache, count: int, weights_url: str, seed: int) -> list[str]:
    ident = cache.identity
    wfs, wpath = filesystem(weights_url)
    weights = wfs.cat_file(wpath)
    if file_sha256(weights) != ident.teacher_sha256:
        return [f"{weights_url}: not the teacher this cache was built with (sha256 differs)"]
    index = read_index(cache.manifest["data"], ident.split)
    teacher = load_checkpoint(io.BytesIO(weights), ident.teacher_arch, ident.num_classes)
    built_on = cache.manifest.get("build", {}).get("device", "cpu")
    device = torch.device("cuda" if built_on == "cuda" and torch.cuda.is_available() else "cpu")
    if built_on != device.type:
        print(f"[verify] the cache was built on {built_on} in {ident.precision}; no GPU here, so targets are recomputed "
              f"on the CPU in {ident.precision if ident.precision == 'bf16' else 'fp32'} and compared within the {ident.precision} tolerance")  # fmt: skip
    precision = ident.precision if device.type == "cuda" or ident.precision == "bf16" else "fp32"
    settings = TeacherSettings(ident.resolution, ident.target_kind == "binarized_cam", precision, batch_size=1)
    runner = TeacherRunner(teacher, AugmentSpec.from_dict(ident.spec), settings, device)
    tolerance = TOLERANCE[ident.storage] + PRECISION_TOLERANCE[ident.precision]
    logit_tolerance = TOLERANCE["float16"] + PRECISION_TOLERANCE[ident.precision]
    spec = runner.spec
    rng = np.random.default_rng(seed)
    problems = []
    for _ in range(count):
        j = int(rng.integers(len(index.shards)))
        view = int(rng.integers(ident.num_views))
        stored = cache.read(j, view)
        k = int(rng.integers(len(stored["ids"])))
        sample = load_shard(cache.manifest["data"], index, index.shards[j])[k]
        image = decode_image(sample, index.image_shape, index.shards[j].name)
        try:
            _, views = render_views(spec, [image], np.array([sample.id]), view, stored["params"][k : k + 1], f"{cache.url}: data shard {j}")
        except ViewMismatchError as exc:
            problems.append(str(exc))
            continue
        expected, logits, _ = runner.targets(views)
        expected, logits = expected[0], logits[0]
        error = float(np.abs(expected - stored["cam"][k]).max()) / max(float(np.abs(expected).max()), 1e-6)
        logit_error = float(np.abs(logits - stored["logits"][k]).max()) / max(float(np.abs(logits).max()), 1e-6)
        if error > tolerance or logit_error > logit_tolerance:
            problems.append(
                f"data shard {j}: sample {sample_key(sample.id)} view {view}: stored targets differ from the teacher's "
                f"(relative error {error:.2e} in CAMs, {logit_error:.2e} in logits; {ident.storage} in {ident.precision} allows {tolerance:.1e})"
            )
    return problems
