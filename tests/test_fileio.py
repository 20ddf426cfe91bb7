"""distilpose.fileio against a real S3 server (moto over HTTP) behind a loopback proxy that
injects faults: what is retried, what fails, how long it takes, what the user sees."""

from __future__ import annotations

import time

import numpy as np
import pytest
from local_services import FaultyS3Proxy
from PIL import Image

from distilpose import fileio
from distilpose.data.coco import ImageError, read_image

FAST = {fileio.ATTEMPTS_ENV: "4", fileio.BACKOFF_ENV: "0.01", fileio.S3_CLIENT_ATTEMPTS_ENV: "1"}
OUTAGE = 10**6  # faults per key: more than any budget


@pytest.fixture
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in FAST.items():
        monkeypatch.setenv(key, value)


def _put(bucket: str, key: str, data: bytes) -> str:
    uri = f"{bucket}/{key}"
    fileio.atomic_write_bytes(uri, data)
    return uri


def _png(seed: int) -> bytes:
    import io

    pixels = np.random.default_rng(seed).integers(0, 255, (16, 12, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("kind", ["503", "reset", "truncate"])
def test_a_burst_is_retried_visibly_and_an_outage_fails_in_bounded_time(
    kind, s3_server, s3_bucket, fast_retries, monkeypatch, capsys
) -> None:
    data = _png(0)
    burst, outage = _put(s3_bucket, "img/burst.png", data), _put(s3_bucket, "img/outage.png", data)
    with FaultyS3Proxy(s3_server, match=("/img/",), failures_per_key=2, methods=("GET",), kinds=(kind,)) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        assert fileio.read_bytes(burst) == data
        assert proxy.injected == {burst[len("s3:/") :]: 2}
        lines = capsys.readouterr().err.splitlines()
        # One line per retry of ours (aiohttp itself retries a reset on a reused connection once).
        assert 1 <= len(lines) <= 2 and all(burst in line and "retrying" in line for line in lines), lines

        proxy.failures_per_key = OUTAGE
        t0 = time.perf_counter()
        with pytest.raises(fileio.TransientIOError, match="still failing after 4 attempts") as info:
            fileio.read_bytes(outage)
        took = time.perf_counter() - t0
        err = capsys.readouterr().err
        assert all(f"retrying {outage} ({n}/3)" in err for n in (1, 2, 3)), err
        assert info.value.reason == {"503": "S3 throttling (SlowDown)", "reset": "connection error"}.get(
            kind, "truncated body"
        )
        assert took < 20, took  # the client's own retries are bounded too
        # An image read in an outage is not a bad image: never an ImageError a caller would skip.
        with pytest.raises(fileio.TransientIOError):
            read_image(s3_bucket, "img/outage.png")


def test_the_s3_client_absorbs_a_short_burst_silently(s3_server, s3_bucket, monkeypatch, capsys) -> None:
    monkeypatch.setenv(fileio.S3_CLIENT_ATTEMPTS_ENV, "2")
    uri = _put(s3_bucket, "img/a.png", b"abc")
    with FaultyS3Proxy(s3_server, match=("/img/",), failures_per_key=1, methods=("GET",), kinds=("503",)) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        assert fileio.read_bytes(uri) == b"abc"
    assert sum(proxy.injected.values()) == 1 and capsys.readouterr().err == ""


def test_permanent_errors_are_not_retried(s3_bucket, fast_retries, capsys) -> None:
    _put(s3_bucket, "img/bad.png", b"not an image")
    with pytest.raises(ImageError, match="cannot decode"):
        read_image(s3_bucket, "img/bad.png")
    with pytest.raises(ImageError, match="file not found"):
        read_image(s3_bucket, "img/absent.png")
    assert "retrying" not in capsys.readouterr().err


def test_retry_budget_from_env_and_backoff(monkeypatch) -> None:
    monkeypatch.setenv(fileio.ATTEMPTS_ENV, "5")
    monkeypatch.setenv(fileio.BACKOFF_ENV, "2")
    monkeypatch.setenv(fileio.MAX_BACKOFF_ENV, "5")
    budget = fileio.RetryBudget.from_env()
    assert (budget.attempts, budget.backoff_s, budget.max_backoff_s) == (5, 2.0, 5.0)
    delays = [budget.delay_s(attempt) for attempt in (1, 2, 3, 4)]
    # Exponential, capped, jittered in the upper half of each step.
    for delay, step in zip(delays, (2, 4, 5, 5)):
        assert step / 2 <= delay <= step
    default = fileio.RetryBudget()
    assert default.attempts == fileio.DEFAULT_ATTEMPTS


def test_atomic_torch_save_local_and_s3(tmp_path, s3_bucket) -> None:
    import io

    import torch

    for uri in (str(tmp_path / "sub" / "x.pt"), f"{s3_bucket}/ckpt/x.pt"):
        fileio.atomic_torch_save({"w": torch.arange(3)}, uri)
        loaded = torch.load(io.BytesIO(fileio.read_bytes(uri)), weights_only=True)
        assert torch.equal(loaded["w"], torch.arange(3))
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["x.pt"]  # no temp file left
