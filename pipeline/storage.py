"""fsspec helpers: every location is a URL (plain path, file://, s3://, ...).

Writes go through a temporary name and a move, so readers never see half a file.
Credentials come from the environment or fsspec's own configuration, never from here.
"""

from __future__ import annotations

import posixpath
import uuid

import fsspec
from fsspec import AbstractFileSystem


def filesystem(url: str) -> tuple[AbstractFileSystem, str]:
    """(filesystem, path inside it) for ``url``."""
    fs, path = fsspec.core.url_to_fs(url)
    return fs, path.rstrip("/") or path


def join(base: str, *parts: str) -> str:
    return posixpath.join(base, *parts)


def write_atomic(fs: AbstractFileSystem, path: str, data: bytes) -> None:
    """Write ``data`` under a temporary name in the same folder, then move it to ``path``."""
    parent = posixpath.dirname(path)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    tmp = posixpath.join(parent, f".tmp-{uuid.uuid4().hex}-{posixpath.basename(path)}")
    with fs.open(tmp, "wb") as f:
        f.write(data)
    try:
        fs.mv(tmp, path)
    finally:
        if fs.exists(tmp):
            fs.rm(tmp)


def create_exclusive(fs: AbstractFileSystem, path: str, data: bytes) -> bool:
    """Create ``path`` only if it does not exist; True when this call created it.

    Local files use O_EXCL, so of two racing writers exactly one wins. Object stores
    without conditional writes get check-then-write: racing writers there store the
    same deterministic content, so either record is correct.
    """
    parent = posixpath.dirname(path)
    fs.makedirs(parent, exist_ok=True)
    if fs.protocol in ("file", "local") or "file" in fs.protocol:
        import os

        tmp = posixpath.join(parent, f".tmp-{uuid.uuid4().hex}")
        with open(tmp, "wb") as f:
            f.write(data)
        try:
            os.link(tmp, path)  # atomic, fails if path exists
            return True
        except FileExistsError:
            return False
        finally:
            os.remove(tmp)
    if fs.exists(path):
        return False
    write_atomic(fs, path, data)
    return True


def zarr_store(url: str, *, read_only: bool = False):
    """A zarr v3 store for ``url``: a LocalStore for local paths, else an fsspec store."""
    import zarr

    fs, path = filesystem(url)
    if "file" in fs.protocol or fs.protocol == "local":
        return zarr.storage.LocalStore(path, read_only=read_only)
    return zarr.storage.FsspecStore(fs=_async_fs(fs), path=path, read_only=read_only)


def _async_fs(fs: AbstractFileSystem) -> AbstractFileSystem:
    """zarr's FsspecStore needs an async filesystem (s3fs is one)."""
    if getattr(fs, "async_impl", False):
        return fs
    from fsspec.implementations.asyn_wrapper import AsyncFileSystemWrapper

    return AsyncFileSystemWrapper(fs)
