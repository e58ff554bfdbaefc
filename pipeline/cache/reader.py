"""Reading a teacher-target cache: identity checks, then one read per shard and view."""

from __future__ import annotations

import json
from functools import cached_property
from typing import Any

import numpy as np
import zarr

from pipeline.cache.commit import DONE_DIR, IDENTITY, MANIFEST, read_head
from pipeline.cache.identity import CacheIdentity, CacheMismatchError, first_difference
from pipeline.cache.layout import ArrayReadError, read_view
from pipeline.data.shard_format import sample_key
from pipeline.storage import filesystem, join, zarr_store


class CacheDamagedError(CacheMismatchError):
    """Stored targets that cannot be read back as written (checksum, decompression,
    shape or a missing object): names the cache, the data shard and the repair."""


class TargetCache:
    """An opened, complete cache. ``read(j, view)`` returns that data shard's targets:
    ``ids`` (n,), ``params`` (n, P), ``cam`` (n, C, r, r) float32, ``logits`` (n, C)
    (a top-k cache: ``cam`` (n, K, r, r) and ``classes`` (n, K), see ``read_view``)."""

    def __init__(self, url: str) -> None:
        self.url = url
        fs, root = filesystem(url)
        path = join(root, MANIFEST)
        if not fs.exists(path):
            done = len(fs.ls(join(root, DONE_DIR))) if fs.exists(join(root, DONE_DIR)) else 0
            what = (
                f"a partial cache ({done} data shards done, no manifest)"
                if fs.exists(join(root, IDENTITY))
                else "not a catkd cache"
            )
            raise CacheMismatchError(f"{url}: {what}; rerun `catkd cache build` with the same arguments to finish it")
        self.manifest: dict[str, Any] = json.loads(fs.cat_file(path))
        if not self.manifest.get("complete"):
            raise CacheMismatchError(f"{path}: manifest is not marked complete")
        try:
            self.identity = CacheIdentity.from_dict(self.manifest["identity"])
        except CacheMismatchError as exc:
            raise CacheMismatchError(f"{url}: {exc}") from None
        self.records = {r["shard"]: r for r in self.manifest["shards"]}

    def check(self, expected: CacheIdentity, *, ignore: tuple[str, ...] = ()) -> None:
        """Refuse a cache made for another teacher, dataset, split, spec, S, r or classes."""
        difference = first_difference(expected, self.identity, ignore=ignore)
        if difference:
            raise CacheMismatchError(f"{self.url}: cache does not match this run: {difference}")

    @cached_property
    def head_weight(self) -> np.ndarray | None:
        if self.identity.storage != "features":
            return None
        return read_head(*filesystem(self.url))

    def store(self, j: int):
        """The zarr store of data shard ``j``'s group."""
        if j not in self.records:
            raise CacheMismatchError(f"{self.url}: no targets for data shard {j}")
        return zarr_store(join(self.url, self.records[j]["path"]), read_only=True)

    def group(self, j: int) -> zarr.Group:
        return zarr.open_group(store=self.store(j), mode="r")

    def read(self, j: int, view: int, decode: bool = True) -> dict[str, np.ndarray]:
        """One view of data shard ``j``; ``decode=False`` keeps the stored form (see ``read_view``)."""
        if not 0 <= view < self.identity.num_views:
            raise ValueError(f"{self.url}: view {view} outside 0..{self.identity.num_views - 1}")
        try:
            out = read_view(
                self.store(j), self.identity.storage, view, self.head_weight, decode, self.identity.num_classes
            )
        except ArrayReadError as exc:
            raise self.damaged(j, str(exc)) from None
        count = self.records[j]["count"]
        wrong = next((name for name, a in out.items() if len(a) != count), None)
        if wrong:
            raise self.damaged(j, f"array {wrong}: {len(out[wrong])} rows where the record says {count}")
        return out

    def damaged(self, j: int, what: str) -> CacheDamagedError:
        first = self.records[j]["first_id"]
        return CacheDamagedError(
            f"{self.url}: data shard {j} (samples from {sample_key(first)}) is damaged: {what}; repair it with "
            f"`catkd cache verify {self.url} --repair`, then rerun the `catkd cache build` that made it (verify "
            "prints it): only the damaged shards are rebuilt"
        )
