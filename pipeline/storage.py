"""The one place that turns a URI into a filesystem.

A URI is either a local path (``/data/cache``, ``runs/x``, ``file:///data/cache``) or
``s3://bucket/prefix``. S3 goes through s3fs; the endpoint comes from ``AWS_ENDPOINT_URL``
(MinIO, moto, on-prem S3) and credentials from the standard AWS chain (env, profile,
instance role). Credentials are never read, passed or logged here: botocore resolves them.

Everything else in the code base calls these helpers instead of parsing URIs itself, so
that adding a scheme or changing S3 options happens in one file.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import logging
import os
import posixpath
import tempfile
import time
from collections.abc import Callable
from typing import Any, TypeVar

import fsspec
from fsspec import AbstractFileSystem

log = logging.getLogger(__name__)

S3_PREFIX = "s3://"
FILE_PREFIX = "file://"

T = TypeVar("T")

# S3 error codes that mean "try again", not "you asked for something wrong".
TRANSIENT_S3_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestTimeout",
        "RequestTimeoutException",
        "InternalError",
        "ServiceUnavailable",
        "503",
        "500",
        "502",
        "504",
    }
)
TRANSIENT_HTTP_STATUS = frozenset({500, 502, 503, 504})
# Errors that retrying can never fix (and that s3fs raises for 404/403).
PERMANENT_ERRORS = (
    FileNotFoundError,
    FileExistsError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
    ValueError,
    TypeError,
)
CONNECTION_ERRORS = (ConnectionResetError, ConnectionAbortedError, BrokenPipeError, ConnectionRefusedError)


def is_s3(uri: str) -> bool:
    return uri.startswith(S3_PREFIX)


def absolute(uri: str) -> str:
    """An s3:// URI unchanged; a local path made absolute (Ray workers have other cwds)."""
    return uri if is_s3(uri) else local_path(uri)


def is_local(uri: str) -> bool:
    return not is_s3(uri)


def local_path(uri: str) -> str:
    """Absolute local path of a local URI; raises for remote URIs."""
    if is_s3(uri):
        raise ValueError(f"{uri!r} is not a local path")
    if uri.startswith(FILE_PREFIX):
        uri = uri[len(FILE_PREFIX) :]
    return os.path.abspath(os.path.expanduser(uri))


def s3_storage_options(asynchronous: bool = False) -> dict[str, Any]:
    """s3fs constructor options. Read from the environment on every call so that a test
    or job that sets ``AWS_ENDPOINT_URL`` after import still gets it."""
    options: dict[str, Any] = {
        # Another process may commit a shard at any time; a cached listing would hide it.
        "use_listings_cache": False,
        "asynchronous": asynchronous,
    }
    endpoint = os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        options["endpoint_url"] = endpoint
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        options["client_kwargs"] = {"region_name": region}
    return options


def open_fs(uri: str) -> tuple[AbstractFileSystem, str]:
    """(filesystem, path inside it). For S3 the path is ``bucket/key`` without scheme."""
    if is_s3(uri):
        path = uri[len(S3_PREFIX) :].rstrip("/")
        if not path:
            raise ValueError(f"{uri!r}: an s3 URI needs a bucket (s3://bucket/prefix)")
        return fsspec.filesystem("s3", **s3_storage_options()), path
    return fsspec.filesystem("file"), local_path(uri)


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a URI with '/' (local paths are POSIX on our machines)."""
    joined = uri.rstrip("/")
    for part in parts:
        part = part.strip("/")
        if part:
            joined = f"{joined}/{part}"
    return joined


def basename(uri: str) -> str:
    return posixpath.basename(uri.rstrip("/"))


def is_transient_error(exc: BaseException) -> bool:
    """True for errors a retry can fix: throttling, 5xx, dropped connections, timeouts.

    s3fs translates botocore's ClientError into OSError subclasses and keeps the original
    as ``__cause__``, so the whole cause chain is inspected.
    """
    from botocore.exceptions import ClientError, ConnectionError, HTTPClientError

    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ClientError):
            error = current.response.get("Error", {})
            status = current.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            return error.get("Code") in TRANSIENT_S3_CODES or status in TRANSIENT_HTTP_STATUS
        if isinstance(current, ConnectionError | HTTPClientError | TimeoutError | asyncio.TimeoutError):
            return True
        if isinstance(current, PERMANENT_ERRORS):
            return False
        if isinstance(current, CONNECTION_ERRORS):
            return True
        if isinstance(current, OSError) and current.errno in (errno.ETIMEDOUT, errno.ECONNRESET):
            return True
        current = current.__cause__ or current.__context__
    return False


def retry(
    fn: Callable[..., T],
    *args: Any,
    attempts: int = 4,
    base_delay_s: float = 0.2,
    max_delay_s: float = 5.0,
    **kwargs: Any,
) -> T:
    """Call ``fn(*args, **kwargs)``, retrying transient S3/network errors with exponential
    backoff. s3fs already retries some errors per request; this covers whole operations
    (a multi-object upload, a listing) and errors s3fs gives up on."""
    for attempt in range(1, attempts):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            if not is_transient_error(exc):
                raise
            delay = min(max_delay_s, base_delay_s * 2 ** (attempt - 1))
            # The exception text may contain a URL, never credentials; the type is enough.
            log.warning(
                "transient storage error (%s), retry %d/%d in %.1fs",
                type(exc).__name__,
                attempt,
                attempts - 1,
                delay,
            )
            time.sleep(delay)
    return fn(*args, **kwargs)


def exists(uri: str) -> bool:
    fs, path = open_fs(uri)
    return retry(fs.exists, path)


def read_bytes(uri: str) -> bytes:
    fs, path = open_fs(uri)
    return retry(fs.cat_file, path)


def sha256(uri: str) -> str:
    """Hex sha256 of an object's bytes (checkpoints and annotation files as fingerprints)."""
    return hashlib.sha256(read_bytes(uri)).hexdigest()


def read_many_bytes(uris: list[str]) -> dict[str, bytes]:
    """Read several objects of one filesystem (concurrently on S3) -> {uri: bytes}."""
    if not uris:
        return {}
    fs, _ = open_fs(uris[0])
    by_path = {open_fs(uri)[1]: uri for uri in uris}
    blobs = retry(fs.cat, list(by_path))
    return {by_path[path]: data for path, data in blobs.items()}


_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write_bytes(uri: str, data: bytes) -> None:
    """Write ``data`` so that readers see either the old object or the whole new one.

    Local: a temp file in the same directory (same filesystem), fsync, ``os.replace``.
    S3: one PUT (s3fs switches to a multipart upload above 100 MB, which is equally
    invisible until it completes).
    """
    if is_s3(uri):
        fs, path = open_fs(uri)
        retry(fs.pipe_file, path, data)
        return
    path = local_path(uri)
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{os.path.basename(path)}-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file normal permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_many_bytes(uri: str, files: dict[str, bytes]) -> None:
    """Write several objects below ``uri`` (keys are relative paths). Not atomic as a
    group: callers make the group visible with a commit record written afterwards."""
    if is_s3(uri):
        fs, path = open_fs(uri)
        # One concurrent batch of PUTs instead of a round trip per object.
        retry(fs.pipe, {f"{path}/{name}": data for name, data in files.items()})
        return
    root = local_path(uri)
    for name, data in files.items():
        target = os.path.join(root, name)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(target, "wb") as f:
            f.write(data)
            # On disk before the caller's commit record is, even after a power cut.
            os.fsync(f.fileno())


def listdir(uri: str) -> list[str]:
    """Sorted names (not paths) of the entries directly below ``uri``; [] if it is absent."""
    fs, path = open_fs(uri)
    try:
        entries = retry(fs.ls, path, detail=False)
    except FileNotFoundError:
        return []
    names = {posixpath.basename(str(entry).rstrip("/")) for entry in entries}
    names.discard("")
    return sorted(names)


def find_files(uri: str) -> dict[str, int]:
    """All files below ``uri`` as {relative path: size in bytes}; {} if absent."""
    fs, path = open_fs(uri)
    try:
        found = retry(fs.find, path, detail=True)
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
    return int(retry(fs.size, path))


def remove(uri: str, recursive: bool = False) -> None:
    """Delete a file (or a whole prefix/directory with ``recursive``); absent is fine."""
    fs, path = open_fs(uri)
    try:
        retry(fs.rm, path, recursive=recursive)
    except FileNotFoundError:
        pass


def local_copy(uri: str, cache_dir: str | None = None) -> str:
    """A local path holding the content of ``uri`` (for APIs that need a file, e.g.
    torch.load). Local URIs are returned as they are; S3 objects are downloaded once per
    version (keyed by ETag) into ``cache_dir`` (default: <tmp>/distilpose-downloads)."""
    if is_local(uri):
        return local_path(uri)
    fs, path = open_fs(uri)
    info = retry(fs.info, path)
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
        return zarr.storage.FsspecStore.from_url(
            uri, storage_options=s3_storage_options(asynchronous=True), read_only=read_only
        )
    return zarr.storage.LocalStore(local_path(uri), read_only=read_only)


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
