"""Teacher targets in zarr: identity, layout, builder, reader, verification."""

from pipeline.cache.builder import CacheBuildConfig, CacheBuildError, build_cache, expected_identity
from pipeline.cache.identity import CacheIdentity, CacheMismatchError
from pipeline.cache.reader import TargetCache

__all__ = ["CacheBuildConfig", "CacheBuildError", "CacheIdentity", "CacheMismatchError", "TargetCache", "build_cache", "expected_identity"]
