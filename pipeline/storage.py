"""URIs to filesystems for the pipeline: `distilpose.fileio` plus what is S3-, zarr- and
Ray-specific.

A URI is either a local path (``/data/cache``, ``runs/x``, ``file:///data/cache``) or
``s3://bucket/prefix``. The basic operations (open, read, exists, list, join, the one atomic
write, the transient-or-permanent decision and the retry loop) live in `distilpose.fileio`,
below both the library and the pipeline, and are re-exported here for the pipeline's callers;
this module adds batched reads and writes, listings with sizes, local copies of remote files,
zarr stores and Ray Train's storage filesystem, all through the same retry loop.
"""

from __future__ import annotations

import functools
import hashlib
import os
import tempfile
from typing import Any

from distilpose.fileio import (  # noqa: F401  (re-exported: the pipeline's I/O goes through here)
    FILE_PREFIX,
    S3_PREFIX,
    RetryBudget,
    TransientIOError,
    absolute,
    atomic_write_bytes,
    basename,
    exists,
    is_local,
    is_s3,
    is_transient_error,
    join,
    listdir,
    local_path,
    open_fs,
    read_bytes,
    retry,
    retry_async,
    s3_filesystem,
    s3_storage_options,
    sha256,
    transient_reason,
)


def failure_cause(exc: BaseException, types: tuple[type[BaseException], ...]) -> BaseException | None:
    """The first exception of `types` among `exc` and what it was raised from, looking
    through Ray's wrappers (a task error keeps the original as ``cause``, a failed training
    run its workers' errors), or None. The driver uses it to report a worker's storage outage
    or a user mistake raised in a task as one line."""
    seen: set[int] = set()
    pending: list[BaseException | None] = [exc]
    while pending:
        current = pending.pop(0)
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        # Ray's task error is an instance of its cause's type too, but its text is Ray's
        # traceback: the cause itself is the one to report.
        if isinstance(current, types) and not isinstance(getattr(current, "cause", None), types):
            return current
        # Explicit causes only (`raise ... from`), never __context__: an error raised while
        # handling another is not that error.
        pending += [getattr(current, "cause", None), current.__cause__]
        pending += list((getattr(current, "worker_failures", None) or {}).values())
    return None


def read_many_bytes(uris: list[str]) -> dict[str, bytes]:
    """Read several objects of one filesystem (concurrently on S3) -> {uri: bytes}."""
    if not uris:
        return {}
    fs, _ = open_fs(uris[0])
    by_path = {open_fs(uri)[1]: uri for uri in uris}
    blobs = retry(fs.cat, list(by_path), what=f"read {len(by_path)} objects below {uris[0].rsplit('/', 1)[0]}")
    return {by_path[path]: data for path, data in blobs.items()}


def write_many_bytes(uri: str, files: dict[str, bytes]) -> None:
    """Write several objects below ``uri`` (keys are relative paths). Not atomic as a
    group: callers make the group visible with a commit record written afterwards."""
    if is_s3(uri):
        fs, path = open_fs(uri)
        # One concurrent batch of PUTs instead of a round trip per object.
        retry(
            fs.pipe,
            {f"{path}/{name}": data for name, data in files.items()},
            what=f"write {len(files)} objects below {uri}",
        )
        return
    root = local_path(uri)
    for name, data in files.items():
        target = os.path.join(root, name)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(target, "wb") as f:
            f.write(data)
            # On disk before the caller's commit record is, even after a power cut.
            os.fsync(f.fileno())


def find_files(uri: str) -> dict[str, int]:
    """All files below ``uri`` as {relative path: size in bytes}; {} if absent."""
    fs, path = open_fs(uri)
    try:
        found = retry(fs.find, path, detail=True, what=f"list {uri}")
    except FileNotFoundError:
        return {}
    prefix = path.rstrip("/") + "/"
    return {
        name[len(prefix) :]: int(info["size"])
        for name, info in found.items()
        if name.startswith(prefix) and info.get("type", "file") == "file"
    }


def size(uri: str) -> int:
    fs, path = open_fs(uri)
    return int(retry(fs.size, path, what=f"size of {uri}"))


def remove(uri: str, recursive: bool = False) -> None:
    """Delete a file (or a whole prefix/directory with ``recursive``); absent is fine."""
    fs, path = open_fs(uri)
    try:
        retry(fs.rm, path, recursive=recursive, what=f"remove {uri}")
    except FileNotFoundError:
        pass


def local_copy(uri: str, cache_dir: str | None = None) -> str:
    """A local path holding the content of ``uri`` (for APIs that need a file, e.g.
    torch.load). Local URIs are returned as they are; S3 objects are downloaded once per
    version (keyed by ETag) into ``cache_dir`` (default: <tmp>/distilpose-downloads)."""
    if is_local(uri):
        return local_path(uri)
    fs, path = open_fs(uri)
    info = retry(fs.info, path, what=f"stat {uri}")
    version = str(info.get("ETag") or info.get("size")).strip('"')
    key = hashlib.sha256(f"{uri}|{version}".encode()).hexdigest()[:16]
    directory = cache_dir or os.path.join(tempfile.gettempdir(), "distilpose-downloads")
    target = os.path.join(directory, f"{key}-{basename(uri)}")
    if not os.path.exists(target):
        atomic_write_bytes(target, read_bytes(uri))
    return target


def zarr_store(uri: str, read_only: bool = True) -> Any:
    """A zarr v3 store rooted at ``uri``: LocalStore on disk, FsspecStore (async s3fs) on S3.

    (obstore's ObjectStore is ~2x faster on S3, docs/platform-notes.md#zarr-on-s3, but is not a project
    dependency; switching is a change here only.)
    """
    import zarr.storage

    if is_s3(uri):
        # The same bounded S3 client as every other read (s3_filesystem), not from_url's own,
        # and every request retried on its own: an array read is several requests, and
        # retrying the whole read would spend the budget on faults of different objects.
        store_class = _retrying_fsspec_store()
        return store_class(s3_filesystem(asynchronous=True), path=open_fs(uri)[1], read_only=read_only)
    return zarr.storage.LocalStore(local_path(uri), read_only=read_only)


@functools.cache
def _retrying_fsspec_store() -> type:
    """zarr's FsspecStore with each read request under `fileio.retry_async` (built on first
    use: zarr is imported lazily)."""
    from zarr.storage import FsspecStore

    class RetryingFsspecStore(FsspecStore):
        async def get(self, key, prototype, byte_range=None):
            return await retry_async(super().get, key, prototype, byte_range, what=f"s3://{self.path}/{key}")

        async def get_partial_values(self, prototype, key_ranges):
            key_ranges = list(key_ranges)
            what = f"s3://{self.path} ({len(key_ranges)} ranges)"
            return await retry_async(super().get_partial_values, prototype, key_ranges, what=what)

        async def exists(self, key):
            return await retry_async(super().exists, key, what=f"exists s3://{self.path}/{key}")

    return RetryingFsspecStore


S3_RETRY_ATTEMPTS = 10  # per S3 request of Ray's checkpoint uploads (the SDK default is 3)


def ray_storage(uri: str) -> tuple[str, Any]:
    """(storage_path, storage_filesystem) for Ray Train's RunConfig.

    Local: an absolute path. S3: ``bucket/prefix`` plus a pyarrow S3FileSystem with a stronger
    per-request retry strategy for checkpoint uploads; endpoint and region come from the same
    environment as s3fs above, credentials from the AWS chain on each node (the filesystem is
    pickled to the workers without them).
    """
    if is_local(uri):
        return local_path(uri), None
    import pyarrow.fs

    options = {"retry_strategy": pyarrow.fs.AwsStandardS3RetryStrategy(max_attempts=S3_RETRY_ATTEMPTS)}
    endpoint = os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        scheme, _, host = endpoint.rpartition("://")
        options.update(endpoint_override=host.rstrip("/"), scheme=scheme or "https")
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        options["region"] = region
    _, path = open_fs(uri)
    return path, pyarrow.fs.S3FileSystem(**options)
