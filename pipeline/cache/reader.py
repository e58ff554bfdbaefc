"""Reading a teacher-target cache: identity checks, then one read per shard and view."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
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


class ShardRecords(Mapping):
    """The manifest's completion records by data shard, held as columns: ids, first ids
    and counts as arrays, paths as strings, the sha256 digests as raw bytes (32 per array),
    the array shapes rebuilt from the manifest's ``arrays`` and the shard's count. A
    record that does not fit that form is kept as it is. ``records[j]`` gives the dict the
    manifest holds, equal to it."""

    def __init__(self, records: list[dict[str, Any]], arrays: dict[str, Any]) -> None:
        self._shards = np.array([r["shard"] for r in records], np.int64)
        self._order = np.argsort(self._shards, kind="stable")
        self._sorted = self._shards[self._order]
        self._first = np.array([r["first_id"] for r in records], np.int64)
        self._count = np.array([r["count"] for r in records], np.int64)
        self._paths = [r["path"] for r in records]
        self._names = tuple(records[0]["checksums"]) if records else ()
        self._arrays = arrays
        self._raw: dict[int, dict[str, Any]] = {}
        digests = bytearray()
        for position, record in enumerate(records):
            if self._rebuild(position, record.get("checksums", {})) != record:
                self._raw[position] = record
                record = {"checksums": {}}
            digests += b"".join(bytes.fromhex(record["checksums"].get(n, "0" * 64)) for n in self._names)
        self._digests = bytes(digests)

    def _rebuild(self, position: int, checksums: dict[str, str]) -> dict[str, Any]:
        count = int(self._count[position])
        return {
            "shard": int(self._shards[position]),
            "first_id": int(self._first[position]),
            "count": count,
            "path": self._paths[position],
            "checksums": checksums,
            "arrays": {
                name: {"shape": [count, *spec["shape"][1:]], "dtype": spec["dtype"]}
                for name, spec in self._arrays.items()
                if name in checksums
            },
        }

    def _position(self, j: int) -> int:
        at = int(np.searchsorted(self._sorted, j))
        if at >= len(self._sorted) or self._sorted[at] != j:
            raise KeyError(j)
        return int(self._order[at])

    def __getitem__(self, j: int) -> dict[str, Any]:
        position = self._position(j)
        if position in self._raw:
            return self._raw[position]
        width = 32 * len(self._names)
        row = self._digests[position * width : (position + 1) * width]
        checksums = {name: row[32 * k : 32 * (k + 1)].hex() for k, name in enumerate(self._names)}
        return self._rebuild(position, checksums)

    def __contains__(self, j: object) -> bool:
        try:
            self._position(int(j))  # type: ignore[arg-type]
        except (KeyError, TypeError, ValueError):
            return False
        return True

    def __iter__(self) -> Iterator[int]:
        return iter(int(j) for j in self._shards)

    def __len__(self) -> int:
        return len(self._shards)


def read_manifest(url: str) -> dict[str, Any]:
    """The manifest of the complete cache at ``url``; a missing, partial or damaged one is
    one line naming the file and what to run."""
    fs, root = filesystem(url)
    path = join(root, MANIFEST)
    try:
        data = fs.cat_file(path)
    except FileNotFoundError:
        done = len(fs.ls(join(root, DONE_DIR))) if fs.exists(join(root, DONE_DIR)) else 0
        what = (
            f"a partial cache ({done} data shards done, no manifest)"
            if fs.exists(join(root, IDENTITY))
            else "not a catkd cache"
        )
        raise CacheMismatchError(
            f"{url}: {what}; rerun `catkd cache build` with the same arguments to finish it"
        ) from None
    try:
        manifest = json.loads(data)
        complete, shards = manifest.get("complete"), manifest["shards"]
    except (ValueError, KeyError, AttributeError):
        raise CacheDamagedError(
            f"{path}: damaged manifest (cut short or not catkd's JSON); delete it and rerun the `catkd cache build` "
            "that made this cache: it finds every shard's completion record and writes the manifest again, "
            "recomputing nothing"
        ) from None
    if not complete:
        raise CacheMismatchError(f"{path}: manifest is not marked complete")
    if not isinstance(shards, list):
        raise CacheDamagedError(f"{path}: damaged manifest (shards is not a list); delete it and rerun the build")
    return manifest


class TargetCache:
    """An opened, complete cache. ``read(j, view)`` returns that data shard's targets:
    ``ids`` (n,), ``params`` (n, P), ``cam`` (n, C, r, r) float32, ``logits`` (n, C)
    (a top-k cache: ``cam`` (n, K, r, r) and ``classes`` (n, K), see ``read_view``)."""

    def __init__(self, url: str, manifest: dict[str, Any] | None = None) -> None:
        """Open the cache at ``url``; a process that already holds its manifest (or the
        part of it it needs: a verify task gets the head and its own shard's record)
        passes it and reads nothing here."""
        self.url = url
        manifest = manifest if manifest is not None else read_manifest(url)
        # The head only: the shard list is held as compact columns (a training rank and each
        # of its DataLoader workers hold the records of 14,000 shards in a few MB, not 50).
        self.manifest: dict[str, Any] = {key: value for key, value in manifest.items() if key != "shards"}
        try:
            self.identity = CacheIdentity.from_dict(self.manifest["identity"])
        except CacheMismatchError as exc:
            raise CacheMismatchError(f"{url}: {exc}") from None
        self.records: Mapping[int, dict[str, Any]] = ShardRecords(manifest["shards"], self.manifest.get("arrays", {}))

    @property
    def served_resolutions(self) -> list[int]:
        """The CAT resolutions this cache serves, finest first: its own r and, where its
        r x r cells tile the teacher's CAMs evenly (the CAM's side divisible by r), every
        divisor of r, whose pooling of the stored average pools is then the average pool
        a build at that resolution stores. A cache that does not record its CAM size (one
        built before catkd recorded it) serves its own r only."""
        r = self.identity.resolution
        size = self.manifest.get("teacher_cam_size")
        if not size or any(side % r for side in size):
            return [r]
        return [d for d in range(r, 0, -1) if r % d == 0]

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

    @cached_property
    def _root_store(self):
        """One zarr store for the whole cache in this process: on an object store each
        store holds a filesystem client of its own (made on zarr's event loop), and making
        one per read cost ~100 ms, more than the read (verify's checkers, training's
        loaders read shard after shard)."""
        return zarr_store(self.url, read_only=True)

    def store(self, j: int) -> zarr.storage.StorePath:
        """Where data shard ``j``'s group is: a path inside the cache's one store."""
        if j not in self.records:
            raise CacheMismatchError(f"{self.url}: no targets for data shard {j}")
        return zarr.storage.StorePath(self._root_store, self.records[j]["path"])

    def with_records(self, records: list[dict[str, Any]]) -> TargetCache:
        """This cache holding only ``records`` (a verify checker's view of the shard it
        checks), sharing its store and head weight."""
        self._root_store, self.head_weight  # noqa: B018 -- made once, here, to be shared
        other = object.__new__(TargetCache)
        other.__dict__ = self.__dict__ | {"records": ShardRecords(records, self.manifest.get("arrays", {}))}
        return other

    def __getstate__(self) -> dict[str, Any]:
        # A process that receives the cache (a DataLoader worker, a Ray task) opens its own
        # store: a filesystem client belongs to the event loop of the process that made it.
        return {key: value for key, value in self.__dict__.items() if key != "_root_store"}

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
