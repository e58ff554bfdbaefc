"""``manifest.json``: written last, it makes a cache complete (DESIGN section 6)."""

from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict
from typing import Any

import numpy as np
import torch

from pipeline.cache.config import CacheBuildConfig
from pipeline.cache.identity import CacheIdentity
from pipeline.cache.layout import MANIFEST
from pipeline.data.shard_format import ShardIndex
from pipeline.storage import join, write_atomic


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:  # run from a source tree without installing (bench/gpu_check.py)
        return "not installed"


def _versions() -> dict[str, str]:
    import numcodecs
    import torchvision
    import zarr

    return {
        "catkd": _version("catkd"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "zarr": zarr.__version__,
        "numcodecs": numcodecs.__version__,
        "ray": _version("ray"),
        "numpy": np.__version__,
    }


def write_manifest(
    fs, root: str, identity: CacheIdentity, index: ShardIndex, cfg: CacheBuildConfig, records: list[dict[str, Any]]
) -> None:
    manifest = {
        "identity": asdict(identity),
        "cache_id": identity.cache_id,
        "num_samples": index.num_samples,
        "shards": records,
        "arrays": records[0]["arrays"],
        "codecs": {
            "compressor": "blosc zstd clevel 5 bitshuffle, then crc32c per chunk",
            "layout": "one zarr shard per array, one inner chunk per view",
        },
        "teacher_weights": cfg.weights,
        "data": cfg.data,
        "build": {
            "precision": cfg.precision,
            "device": "cuda" if cfg.gpus_per_actor > 0 else "cpu",
            "channels_last": cfg.channels_last,
            "batch_size": cfg.batch_size,
        },
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "versions": _versions(),
        "complete": True,
    }
    write_atomic(fs, join(root, MANIFEST), json.dumps(manifest, indent=1).encode())
