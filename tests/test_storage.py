"""pipeline.storage on a local directory and on S3 (moto server over HTTP)."""

from __future__ import annotations

import errno
import os

import pytest
import zarr.storage
from botocore.exceptions import ClientError, EndpointConnectionError

from pipeline import storage


@pytest.fixture(params=["local", "s3"])
def root(request: pytest.FixtureRequest, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "root")
    return request.getfixturevalue("s3_bucket") + "/root"


def test_join_and_scheme() -> None:
    assert storage.join("s3://b/p/", "shards", "/x.tar") == "s3://b/p/shards/x.tar"
    assert storage.join("/data/c", "", "a/") == "/data/c/a"
    assert storage.is_s3("s3://b") and storage.is_local("/tmp/x") and storage.is_local("file:///tmp/x")
    assert storage.local_path("file:///tmp/x") == "/tmp/x"
    with pytest.raises(ValueError, match="needs a bucket"):
        storage.open_fs("s3://")


def test_bytes_roundtrip_list_and_remove(root: str) -> None:
    target = storage.join(root, "dir", "a.bin")
    assert not storage.exists(target)
    storage.atomic_write_bytes(target, b"first")
    storage.atomic_write_bytes(target, b"second")  # overwrite is atomic too
    storage.atomic_write_bytes(storage.join(root, "dir", "b.bin"), b"")
    storage.write_many_bytes(storage.join(root, "many"), {"x/1": b"1", "y": b"22"})

    assert storage.read_bytes(target) == b"second"
    assert storage.exists(target)
    # No temp files are left next to atomically written ones.
    assert storage.listdir(storage.join(root, "dir")) == ["a.bin", "b.bin"]
    assert storage.listdir(root) == ["dir", "many"]
    assert storage.listdir(storage.join(root, "absent")) == []
    assert storage.find_files(storage.join(root, "many")) == {"x/1": 1, "y": 2}
    assert storage.size(target) == 6
    blobs = storage.read_many_bytes([target, storage.join(root, "many", "y")])
    assert blobs == {target: b"second", storage.join(root, "many", "y"): b"22"}
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(storage.join(root, "dir", "nope"))

    storage.remove(target)
    storage.remove(target)  # absent is fine
    storage.remove(storage.join(root, "many"), recursive=True)
    assert storage.listdir(root) == ["dir"]
    assert storage.listdir(storage.join(root, "dir")) == ["b.bin"]


def test_s3_endpoint_comes_from_env(s3_server: str, s3_bucket: str) -> None:
    fs, path = storage.open_fs(s3_bucket + "/k")
    assert path == s3_bucket[len("s3://") :] + "/k"
    assert fs.client_kwargs["region_name"] == "us-east-1"
    assert storage.s3_storage_options()["endpoint_url"] == s3_server
    store = storage.zarr_store(s3_bucket + "/g.zarr", read_only=False)
    assert isinstance(store, zarr.storage.FsspecStore) and not store.read_only


def test_zarr_store_local(tmp_path) -> None:
    store = storage.zarr_store(str(tmp_path / "g.zarr"))
    assert isinstance(store, zarr.storage.LocalStore) and store.read_only


def _client_error(code: str, status: int) -> ClientError:
    return ClientError({"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "PutObject")


def test_transient_error_classification() -> None:
    wrapped = OSError(errno.EIO, "slow down")  # what s3fs raises, with the ClientError as cause
    wrapped.__cause__ = _client_error("SlowDown", 503)
    assert storage.is_transient_error(wrapped)
    assert storage.is_transient_error(_client_error("InternalError", 500))
    assert storage.is_transient_error(EndpointConnectionError(endpoint_url="http://x"))
    assert storage.is_transient_error(ConnectionResetError())
    missing = FileNotFoundError("no such key")
    missing.__cause__ = _client_error("NoSuchKey", 404)
    assert not storage.is_transient_error(missing)
    assert not storage.is_transient_error(_client_error("AccessDenied", 403))


def test_retry_retries_transient_only(capsys) -> None:
    calls = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise _client_error("SlowDown", 503)
        return "done"

    fast = storage.RetryBudget(attempts=4, backoff_s=0.001)
    assert storage.retry(flaky, budget=fast) == "done"
    assert len(calls) == 3

    def missing() -> None:
        calls.append(1)
        raise FileNotFoundError("gone")

    calls.clear()
    with pytest.raises(FileNotFoundError):
        storage.retry(missing, budget=fast)
    assert len(calls) == 1

    def always_throttled() -> None:
        raise _client_error("SlowDown", 503)

    # A spent budget is its own error (never a permanent one a caller could count as a skip),
    # naming the operation and the reason; one line per retry says what is going on.
    with pytest.raises(storage.TransientIOError, match=r"S3 throttling \(SlowDown\) on image x.jpg") as info:
        storage.retry(always_throttled, what="image x.jpg", budget=storage.RetryBudget(attempts=3, backoff_s=0.001))
    assert isinstance(info.value.__cause__, ClientError) and info.value.attempts == 3
    err = capsys.readouterr().err
    assert "[io] S3 throttling (SlowDown): retrying image x.jpg (1/2)" in err and "(2/2)" in err and "(3/2)" not in err


def test_atomic_write_cleans_up_on_failure(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = str(tmp_path / "a.bin")
    storage.atomic_write_bytes(target, b"old")

    def failing_replace(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        storage.atomic_write_bytes(target, b"new")
    monkeypatch.undo()
    assert storage.read_bytes(target) == b"old"
    assert os.listdir(tmp_path) == ["a.bin"]


def test_local_copy(root: str, tmp_path) -> None:
    source = storage.join(root, "ckpt", "teacher.pth")
    storage.atomic_write_bytes(source, b"weights-v1")
    cache_dir = str(tmp_path / "downloads")
    path = storage.local_copy(source, cache_dir=cache_dir)
    assert open(path, "rb").read() == b"weights-v1"
    if storage.is_s3(source):
        assert path.startswith(cache_dir) and storage.local_copy(source, cache_dir=cache_dir) == path
        storage.atomic_write_bytes(source, b"weights-v2")  # a new version is downloaded again
        assert open(storage.local_copy(source, cache_dir=cache_dir), "rb").read() == b"weights-v2"
    else:
        assert path == source
