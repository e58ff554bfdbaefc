"""Completion records gathered into batch files, so that a resume reads a few objects
instead of one per shard.

The shard job and the cache build each write one small completion record per shard, the
moment the shard is complete (that write is what makes the shard count as done). A resume
must learn every record: one read per shard, concurrent, is still a request per shard
(14,000 at ImageNet-21k). So the driver also appends each record it receives to a batch
and writes the batch as one object every ``every`` records or ``every_s`` seconds, and a
resume reads the batches (one request per ``every`` shards) and only the loose records no
batch holds (those of the last seconds before a stop).

A batch is only an accelerator: the loose records stay the truth. A caller trusts a
batched record only for a shard whose loose record is still listed, and checks it as it
would a loose one; a damaged batch is skipped (its shards' loose records are read
instead). Each batch has a name of its own, so concurrent drivers never overwrite one
another's.
"""

from __future__ import annotations

import json
import posixpath
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from fsspec import AbstractFileSystem

from pipeline.storage import join, list_folder, read_many, write_atomic

BATCH_PREFIX = "batch-"


@dataclass
class RecordBatcher:
    """Collects records in the driver and writes them to ``folder`` in batches."""

    fs: AbstractFileSystem
    folder: str
    every: int = 256
    every_s: float = 30.0
    pending: list[dict[str, Any]] = field(default_factory=list)
    last_write: float = field(default_factory=time.monotonic)

    def add(self, record: dict[str, Any]) -> None:
        self.pending.append(record)
        if len(self.pending) >= self.every or time.monotonic() - self.last_write >= self.every_s:
            self.flush()

    def flush(self) -> None:
        """Write what is pending as one batch (nothing when nothing is)."""
        self.last_write = time.monotonic()
        if not self.pending:
            return
        name = f"{BATCH_PREFIX}{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:12]}.json"
        write_atomic(self.fs, join(self.folder, name), json.dumps(self.pending).encode())
        self.pending = []


def read_batched(fs: AbstractFileSystem, folder: str) -> list[dict[str, Any]]:
    """Every record in the batches in ``folder``: one listing and one batched read of the
    batch files. A batch that is not a JSON list is skipped."""
    names = sorted(name for name in list_folder(fs, folder) if name.startswith(BATCH_PREFIX))
    records: list[dict[str, Any]] = []
    for data in read_many(fs, [posixpath.join(folder, name) for name in names]):
        try:
            batch = json.loads(data) if data is not None else None
        except ValueError:
            continue
        if isinstance(batch, list):
            records.extend(r for r in batch if isinstance(r, dict))
    return records


def remove_batches(fs: AbstractFileSystem, folder: str) -> None:
    """Delete every batch in ``folder``: for a caller about to delete or replace loose
    records, after which a batch could hold a record no longer true."""
    names = [name for name in list_folder(fs, folder) if name.startswith(BATCH_PREFIX)]
    if names:
        fs.rm([posixpath.join(folder, name) for name in names])
