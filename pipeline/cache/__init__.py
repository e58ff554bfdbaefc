"""Teacher targets in zarr: config and identity, layout, commit protocol, feed, teacher,
builder, reader, verification.

The builder needs Ray; everything else here works without it (``bench/gpu_check.py``
drives the feed and the teacher in-process), so the builder is imported on first use.
"""

from typing import Any

from pipeline.cache.config import CacheBuildConfig, expected_identity
from pipeline.cache.identity import CacheIdentity, CacheMismatchError
from pipeline.cache.reader import TargetCache
from pipeline.cache.teacher import CacheBuildError

__all__ = [
    "CacheBuildConfig",
    "CacheBuildError",
    "CacheIdentity",
    "CacheMismatchError",
    "TargetCache",
    "build_cache",
    "expected_identity",
]


def __getattr__(name: str) -> Any:
    if name == "build_cache":
        from pipeline.cache.builder import build_cache

        return build_cache
    raise AttributeError(name)
