"""Reading and writing files, local or on S3: the one I/O layer of the library and the pipeline.

Every image, annotation, checkpoint, cache and log read or write goes through here
(`pipeline.storage` adds what is specific to Ray and zarr on top), so that

- a URI (a local path, ``file://...``, ``s3://bucket/key``) becomes a filesystem in one
  place, with the same S3 options everywhere: the endpoint from ``AWS_ENDPOINT_URL``, and the
  S3 client's own retries and timeouts bounded, so that a throttled job never waits silently
  inside the client;
- whether an error is transient (throttling, a 5xx answer, a dropped connection, a timeout,
  a truncated body) or permanent (not found, denied, not what it should be) is decided in one
  function, `transient_reason`;
- a transient error is retried with exponential backoff and jitter, one visible line per
  retry, within a bounded budget (`RetryBudget`, from ``DISTILPOSE_IO_*``); when the budget
  is spent `TransientIOError` is raised. Callers let it fail their unit of work: it is never
  turned into a skipped record, so a rerun computes what a storage outage cost;
- there is one atomic write (`atomic_write_bytes`).

Credentials are never read, passed or logged here: botocore resolves them.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import posixpath
import random
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import fsspec
from fsspec import AbstractFileSystem

S3_PREFIX = "s3://"
FILE_PREFIX = "file://"

T = TypeVar("T")

# The retry budget of one operation; the environment overrides it (tests use short backoffs).
ATTEMPTS_ENV = "DISTILPOSE_IO_ATTEMPTS"
BACKOFF_ENV = "DISTILPOSE_IO_BACKOFF_S"
MAX_BACKOFF_ENV = "DISTILPOSE_IO_MAX_BACKOFF_S"
DEFAULT_ATTEMPTS = 8
DEFAULT_BACKOFF_S = 1.0
DEFAULT_MAX_BACKOFF_S = 30.0

# The S3 client's own retries and timeouts. Left at their defaults, botocore and s3fs
# retried a throttled GET up to 25 times with growing waits, without a word (a job measured
# stuck for 20 minutes); here the client tries a request at most S3_CLIENT_ATTEMPTS times and
# the visible loop of `retry` does the rest.
S3_CLIENT_ATTEMPTS_ENV = "DISTILPOSE_S3_CLIENT_ATTEMPTS"
DEFAULT_S3_CLIENT_ATTEMPTS = 3
S3_CONNECT_TIMEOUT_S = 10
S3_READ_TIMEOUT_S = 30

# S3 error codes and HTTP statuses that mean "try again", not "you asked for something wrong".
THROTTLING_CODES = frozenset({"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded"})
SERVER_CODES = frozenset(
    {"RequestTimeout", "RequestTimeoutException", "InternalError", "ServiceUnavailable", "500", "502", "503", "504"}
)
TRANSIENT_HTTP_STATUS = frozenset({500, 502, 503, 504})
# Errors that retrying can never fix (s3fs raises these for 404/403 too).
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


class TransientIOError(OSError):
    """A storage operation still failing with transient errors when its retry budget was
    spent. Never a skip: the unit of work that raised it must fail and be redone."""

    def __init__(self, what: str, reason: str, attempts: int):
        super().__init__(
            f"storage unavailable: {reason} on {what}, still failing after {attempts} attempts; "
            "nothing incomplete was committed: rerun the same command to redo it"
        )
        self.what, self.reason, self.attempts = what, reason, attempts

    def __reduce__(self):
        # Rebuilt from its fields when it crosses processes (a Ray task's error reaches the driver).
        return (type(self), (self.what, self.reason, self.attempts))


# ----------------------------------------------------------------------------- URIs


def is_s3(uri: str) -> bool:
    return uri.startswith(S3_PREFIX)


def is_local(uri: str) -> bool:
    return not is_s3(uri)


def local_path(uri: str) -> str:
    """Absolute local path of a local URI; raises for remote URIs."""
    if is_s3(uri):
        raise ValueError(f"{uri!r} is not a local path")
    if uri.startswith(FILE_PREFIX):
        uri = uri[len(FILE_PREFIX) :]
    return os.path.abspath(os.path.expanduser(uri))


def absolute(uri: str) -> str:
    """An s3:// URI unchanged; a local path made absolute (other processes have other cwds)."""
    return uri if is_s3(uri) else local_path(uri)


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


def _env_number(name: str, default: float) -> float:
    value = os.environ.get(name)
    return float(value) if value else default


def s3_storage_options(asynchronous: bool = False) -> dict[str, Any]:
    """s3fs constructor options. Read from the environment on every call so that a test
    or job that sets ``AWS_ENDPOINT_URL`` after import still gets it."""
    client_attempts = int(_env_number(S3_CLIENT_ATTEMPTS_ENV, DEFAULT_S3_CLIENT_ATTEMPTS))
    options: dict[str, Any] = {
        # Another process may commit a shard at any time; a cached listing would hide it.
        "use_listings_cache": False,
        "asynchronous": asynchronous,
        "config_kwargs": {
            "retries": {"mode": "standard", "total_max_attempts": max(1, client_attempts)},
            "connect_timeout": S3_CONNECT_TIMEOUT_S,
            "read_timeout": S3_READ_TIMEOUT_S,
        },
    }
    endpoint = os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        options["endpoint_url"] = endpoint
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        options["client_kwargs"] = {"region_name": region}
    return options


def s3_filesystem(asynchronous: bool = False) -> AbstractFileSystem:
    fs = fsspec.filesystem("s3", **s3_storage_options(asynchronous))
    # s3fs retries some errors itself (5 tries, silently); one try here, `retry` does the rest.
    fs.retries = 1
    return fs


def open_fs(uri: str) -> tuple[AbstractFileSystem, str]:
    """(filesystem, path inside it). For S3 the path is ``bucket/key`` without scheme."""
    if is_s3(uri):
        path = uri[len(S3_PREFIX) :].rstrip("/")
        if not path:
            raise ValueError(f"{uri!r}: an s3 URI needs a bucket (s3://bucket/prefix)")
        return s3_filesystem(), path
    return fsspec.filesystem("file"), local_path(uri)


# ----------------------------------------------------------------------------- transient or permanent


def transient_reason(exc: BaseException) -> str | None:
    """Why `exc` is worth retrying ("S3 throttling (SlowDown)", "connection reset", ...), or
    None when it is permanent. The one place that decides.

    s3fs translates botocore's ClientError into OSError subclasses and keeps the original as
    ``__cause__``, so the whole cause chain is inspected.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        reason = _own_reason(current)
        if reason is not None:
            return reason or None  # "" = decided permanent
        current = current.__cause__ or current.__context__
    return None


def is_transient_error(exc: BaseException) -> bool:
    return transient_reason(exc) is not None


def _own_reason(exc: BaseException) -> str | None:
    """The reason of `exc` itself: a label (transient), "" (permanent) or None (undecided:
    look at its cause)."""
    from botocore.exceptions import ClientError, ConnectionError, HTTPClientError, IncompleteReadError

    if isinstance(exc, TransientIOError):
        return exc.reason
    if isinstance(exc, ClientError):
        code = str(exc.response.get("Error", {}).get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in THROTTLING_CODES:
            return f"S3 throttling ({code})"
        if code in SERVER_CODES or status in TRANSIENT_HTTP_STATUS:
            return f"S3 server error ({status} {code})"
        return ""
    if isinstance(exc, (IncompleteReadError, *_truncated_body_errors())):
        return "truncated body"
    if isinstance(exc, (TimeoutError, asyncio.TimeoutError, *_timeout_errors())):
        return "timeout"
    if isinstance(exc, (ConnectionError, HTTPClientError, *_connection_errors_of_aiohttp())):
        return "connection error"
    if isinstance(exc, PERMANENT_ERRORS):
        return ""
    if isinstance(exc, CONNECTION_ERRORS):
        return "connection reset"
    if isinstance(exc, OSError) and exc.errno in (errno.ETIMEDOUT, errno.ECONNRESET):
        return "connection reset" if exc.errno == errno.ECONNRESET else "timeout"
    return None


def _truncated_body_errors() -> tuple[type[BaseException], ...]:
    import http.client

    from botocore.exceptions import ResponseStreamingError

    found: tuple[type[BaseException], ...] = (http.client.IncompleteRead, ResponseStreamingError)
    try:
        from aiohttp import ClientPayloadError

        found += (ClientPayloadError,)
    except ImportError:
        pass
    return found


def _timeout_errors() -> tuple[type[BaseException], ...]:
    from botocore.exceptions import ConnectTimeoutError, ReadTimeoutError
    from fsspec.exceptions import FSTimeoutError

    return (FSTimeoutError, ReadTimeoutError, ConnectTimeoutError)


def _connection_errors_of_aiohttp() -> tuple[type[BaseException], ...]:
    try:
        from aiohttp import ClientConnectionError

        return (ClientConnectionError,)
    except ImportError:
        return ()


# ----------------------------------------------------------------------------- retry


@dataclass(frozen=True)
class RetryBudget:
    attempts: int = DEFAULT_ATTEMPTS
    backoff_s: float = DEFAULT_BACKOFF_S  # the first wait; doubled each time
    max_backoff_s: float = DEFAULT_MAX_BACKOFF_S

    @classmethod
    def from_env(cls) -> RetryBudget:
        return cls(
            attempts=max(1, int(_env_number(ATTEMPTS_ENV, DEFAULT_ATTEMPTS))),
            backoff_s=_env_number(BACKOFF_ENV, DEFAULT_BACKOFF_S),
            max_backoff_s=_env_number(MAX_BACKOFF_ENV, DEFAULT_MAX_BACKOFF_S),
        )

    def delay_s(self, attempt: int) -> float:
        """Wait after failed attempt `attempt` (1-based): exponential, capped, with full
        jitter in its upper half so that many readers throttled together do not retry together."""
        base = min(self.max_backoff_s, self.backoff_s * 2 ** (attempt - 1))
        return base * (0.5 + 0.5 * random.random())


def retry(fn: Callable[..., T], *args: Any, what: str = "", budget: RetryBudget | None = None, **kwargs: Any) -> T:
    """Call ``fn(*args, **kwargs)``; retry transient errors within `budget` (default: from
    the environment), printing one line per retry; raise `TransientIOError` when it is spent.
    Permanent errors are raised at once, unchanged. `what` names the operation in the lines."""
    budget = budget or RetryBudget.from_env()
    for attempt in range(1, budget.attempts + 1):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            time.sleep(_delay_or_raise(exc, attempt, budget, what or getattr(fn, "__name__", "storage operation")))
    raise AssertionError("unreachable: the loop returns or raises")


async def retry_async(fn: Callable[..., Any], *args: Any, what: str = "", budget: RetryBudget | None = None) -> Any:
    """`retry` for a coroutine function (the requests zarr makes through async s3fs): the
    same budget, lines and errors, waiting with asyncio.sleep."""
    budget = budget or RetryBudget.from_env()
    for attempt in range(1, budget.attempts + 1):
        try:
            return await fn(*args)
        except Exception as exc:
            await asyncio.sleep(_delay_or_raise(exc, attempt, budget, what or getattr(fn, "__name__", "request")))
    raise AssertionError("unreachable: the loop returns or raises")


def _delay_or_raise(exc: Exception, attempt: int, budget: RetryBudget, what: str) -> float:
    """After failed attempt `attempt`: the wait before the next one, with its line printed;
    or raise (`exc` itself when permanent, `TransientIOError` when the budget is spent)."""
    reason = transient_reason(exc)
    if reason is None or isinstance(exc, TransientIOError):
        raise exc
    if attempt == budget.attempts:
        raise TransientIOError(what, reason, budget.attempts) from exc
    delay = budget.delay_s(attempt)
    # The exception text may contain a URL, never credentials; the reason is enough.
    print(
        f"[io] {reason}: retrying {what} ({attempt}/{budget.attempts - 1}) in {delay:.1f} s",
        file=sys.stderr,
        flush=True,
    )
    return delay


# ----------------------------------------------------------------------------- operations


def exists(uri: str) -> bool:
    fs, path = open_fs(uri)
    return retry(fs.exists, path, what=f"exists {uri}")


def read_bytes(uri: str, what: str = "") -> bytes:
    """The whole object; `what` names it in retry lines (default: the URI)."""
    fs, path = open_fs(uri)
    return retry(fs.cat_file, path, what=what or uri)


def sha256(uri: str) -> str:
    """Hex sha256 of an object's bytes (checkpoints and annotation files as fingerprints)."""
    return hashlib.sha256(read_bytes(uri)).hexdigest()


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
        retry(fs.pipe_file, path, data, what=f"write {uri}")
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


def atomic_torch_save(obj: Any, uri: str) -> None:
    """torch.save to a local path or S3 through `atomic_write_bytes` (serialised in memory
    first: a reader never sees half a checkpoint)."""
    import io

    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(uri, buffer.getvalue())


def listdir(uri: str) -> list[str]:
    """Sorted names (not paths) of the entries directly below ``uri``; [] if it is absent."""
    fs, path = open_fs(uri)
    try:
        entries = retry(fs.ls, path, detail=False, what=f"list {uri}")
    except FileNotFoundError:
        return []
    names = {posixpath.basename(str(entry).rstrip("/")) for entry in entries}
    names.discard("")
    return sorted(names)
