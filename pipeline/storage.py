"""fsspec helpers: every location is a URL (plain path, file://, s3://, ...).

Writes go through a temporary name and a move, so readers never see half a file.
Credentials come from the environment or fsspec's own configuration, never from here.
"""

from __future__ import annotations

import posixpath
import uuid

import fsspec
from fsspec import AbstractFileSystem

from catkd.errors import CatkdError


def filesystem(url: str) -> tuple[AbstractFileSystem, str]:
    """(filesystem, path inside it) for ``url``."""
    fs, path = fsspec.core.url_to_fs(url)
    return fs, path.rstrip("/") or path


def is_local(fs: AbstractFileSystem) -> bool:
    """True for the local disk (fsspec names its protocol "file" or "local")."""
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    return any(p in ("file", "local") for p in protocols)


def absolute(url: str) -> str:
    """A local relative path made absolute (Ray workers run in other folders); URLs as they are."""
    import os

    return url if "://" in url or os.path.isabs(url) else os.path.abspath(url)


def join(base: str, *parts: str) -> str:
    return posixpath.join(base, *parts)


def write_atomic(fs: AbstractFileSystem, path: str, data: bytes) -> None:
    """Write ``data`` under a temporary name in the same folder, then move it to ``path``.
    On an object store one PUT is already atomic (a reader sees the old object or the new
    one, never half), and a move is a copy, a delete and their checks: 6-8 requests
    instead of 1, so the object is written in place."""
    if not is_local(fs):
        fs.pipe_file(path, data)
        return
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


def list_entries(fs: AbstractFileSystem, folder: str) -> list[dict]:
    """What is directly in ``folder`` (files and folders, with their info), from one
    listing (one request per 1,000 keys on S3); [] when the folder does not exist. Read
    fresh, and not kept: a listing fsspec cached earlier in this process may predate
    another writer's files, and a job-long listing cache grows with the file count."""
    fs.invalidate_cache(folder)
    try:
        return fs.ls(folder, detail=True)
    except FileNotFoundError:
        return []
    finally:
        fs.invalidate_cache(folder)


def list_folder(fs: AbstractFileSystem, folder: str) -> dict[str, dict]:
    """The files directly in ``folder`` by base name, with their info (size, and on S3
    the ETag): one listing instead of a request per file."""
    entries = list_entries(fs, folder)
    return {posixpath.basename(e["name"].rstrip("/")): e for e in entries if e.get("type") == "file"}


def whole_object_reads(fs: AbstractFileSystem) -> dict:
    """Options that read a small object in one request. s3fs asks for an object's size
    (a HEAD) before each whole-object read, to split a large one into concurrent ranges;
    for small objects (records, images, zarr chunks) that only doubles the requests."""
    return {"max_concurrency": 1} if hasattr(fs, "max_concurrency") else {}


def cat_sized(fs: AbstractFileSystem, path: str, size: int) -> bytes:
    """The whole object at ``path`` whose size an index already gives: in one GET where
    s3fs would read it in one range anyway (up to its block size, 50 MiB), without the
    size request s3fs makes first; a larger one in s3fs's concurrent ranges."""
    if size <= getattr(fs, "default_block_size", size):
        return fs.cat_file(path, **whole_object_reads(fs))
    return fs.cat_file(path)


def cat_small(fs: AbstractFileSystem, paths: list[str]) -> list[bytes | BaseException]:
    """The contents of small objects (records, images) in ``paths``' order, or the error
    of each that failed, through one batched ``cat`` (``whole_object_reads``)."""
    if not paths:
        return []
    found = fs.cat(list(paths), on_error="return", **whole_object_reads(fs))
    return [found.get(fs._strip_protocol(path), FileNotFoundError(path)) for path in paths]


def read_many(fs: AbstractFileSystem, paths: list[str]) -> list[bytes | None]:
    """The contents of ``paths`` (None for a missing one), in their order, through one
    batched ``cat``: s3fs and the other async filesystems run the requests concurrently,
    so N small objects cost about one round trip of latency, not N. Any error other than
    a missing file is raised."""
    out: list[bytes | None] = []
    for value in cat_small(fs, paths):
        if isinstance(value, FileNotFoundError):
            out.append(None)
        elif isinstance(value, BaseException):
            raise value
        else:
            out.append(value)
    return out


def create_exclusive(fs: AbstractFileSystem, path: str, data: bytes) -> bool:
    """Create ``path`` only if it does not exist; True when this call created it.

    Of two racing writers exactly one wins, through the store's own conditional write:
    O_EXCL (a hard link) on local disk, ``If-None-Match: *`` on S3 (s3fs's
    ``pipe_file(mode="create")``). A filesystem that offers no conditional write at
    all falls back to check-then-write, which two concurrent writers can both pass.
    """
    parent = posixpath.dirname(path)
    fs.makedirs(parent, exist_ok=True)
    if is_local(fs):
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
    try:
        fs.pipe_file(path, data, mode="create")
        return True
    except FileExistsError:
        return False
    except TypeError:  # no conditional write on this filesystem
        if fs.exists(path):
            return False
        write_atomic(fs, path, data)
        return True


def zarr_store(url: str, *, read_only: bool = False):
    """A zarr v3 store for ``url``: a LocalStore for local paths, else an fsspec store
    whose async filesystem zarr creates on its own event loop (a filesystem instance
    cached by fsspec belongs to another loop and cannot be shared)."""
    import zarr

    fs, path = filesystem(url)
    if is_local(fs):
        return zarr.storage.LocalStore(path, read_only=read_only)
    options = {"skip_instance_cache": True} | whole_object_reads(fs)
    return zarr.storage.FsspecStore.from_url(url, read_only=read_only, storage_options=options)


class StorageError(CatkdError, OSError):
    """A location that cannot be used: missing bucket, refused credentials, ..."""


def check_location(url: str) -> None:
    """Fail early and clearly on object stores: the bucket must exist and be reachable
    with the credentials in the environment (they are never printed). Writing into a
    missing bucket would otherwise create it, or fail deep inside a task."""
    fs, path = filesystem(url)
    if is_local(fs):
        return
    bucket = path.split("/", 1)[0]
    try:
        exists = fs.exists(bucket)
    except PermissionError as exc:
        raise StorageError(
            f"{url}: access denied to bucket {bucket!r}; check the credentials in the environment "
            f"({type(exc).__name__})"
        ) from None
    except Exception as exc:  # botocore and aiohttp raise many types
        raise StorageError(f"{url}: cannot reach the object store ({type(exc).__name__}: {str(exc)[:200]})") from None
    if not exists:
        raise StorageError(f"{url}: bucket {bucket!r} does not exist (or these credentials cannot see it)")
