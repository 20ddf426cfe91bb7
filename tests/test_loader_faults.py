"""A student epoch read from a cache on a real S3 server (moto over HTTP) through a loopback
proxy that injects faults into the cache's GETs (503 SlowDown, connection resets, truncated
bodies; seeded). A burst within the retry budget gives the same batches as the clean epoch;
an outage fails the epoch (the training worker, which Ray Train restarts from its last
checkpoint) instead of dropping samples, and the same epoch read again once S3 is healthy
equals the clean one. In process, no Ray: the loader is what a worker runs; the cache is
written by the real store (teacher-like rows, tests/cache_rows.py). Heavy: minutes on a busy
machine; tests/test_fileio.py keeps the storage layer's fault tests in the default suite."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from cache_rows import SMALL_SPEC, base_manifest, teacher_like_rows
from local_services import FaultyS3Proxy

from distilpose import fileio
from pipeline.cache import open_reader, open_writer
from pipeline.cache.encodings import encode_crop_jpeg
from pipeline.cache.schema import CROP_FIELD
from pipeline.cache_loader import CachedViewStream

FAST = {fileio.ATTEMPTS_ENV: "5", fileio.BACKOFF_ENV: "0.01", fileio.S3_CLIENT_ATTEMPTS_ENV: "1"}
FIELDS = ("heatmaps", "gauss", "confidence")
SHARDS = ("/cache/shards/",)
VIEWS, SHARD_ROWS, CROP_SIZE = 4, (24, 24, 24), (16, 12)


@pytest.fixture
def local_cache(tmp_path) -> str:
    """A small finalized cache written by the real store (teacher-like rows, stored JPEG crops)."""
    uri = str(tmp_path / "cache")
    writer = open_writer(uri, SMALL_SPEC, "zarr")
    start = 0
    for index, n in enumerate(SHARD_ROWS):
        rows = teacher_like_rows(SMALL_SPEC, n, seed=index, first_instance=start, views=VIEWS)
        rng = np.random.default_rng(index)
        rows[CROP_FIELD] = [encode_crop_jpeg(rng.integers(0, 255, (*CROP_SIZE, 3), dtype=np.uint8)) for _ in range(n)]
        writer.write_shard(index, rows)
        start += n
    writer.finalize(base_manifest(VIEWS), expected_shards=len(SHARD_ROWS))
    return uri


@pytest.fixture
def s3_cache(local_cache, s3_bucket, monkeypatch) -> str:
    for key, value in FAST.items():
        monkeypatch.setenv(key, value)
    root = Path(local_cache)
    for path in sorted(root.rglob("*")):
        if path.is_file():
            fileio.atomic_write_bytes(f"{s3_bucket}/cache/{path.relative_to(root)}", path.read_bytes())
    return f"{s3_bucket}/cache"


def _epoch(cache: str, epoch: int = 1) -> list[dict]:
    stream = CachedViewStream(
        open_reader(cache),
        image_root=None,
        image_files={},
        input_size=CROP_SIZE,
        teacher_fields=FIELDS,
        rank=0,
        world_size=1,
        batch_size=4,
        seed=0,
    )
    return list(stream.epoch(epoch))


def _assert_same_batches(got: list[dict], expected: list[dict]) -> None:
    assert len(got) == len(expected) > 0
    for a, b in zip(got, expected):
        torch.testing.assert_close(a["instance_id"], b["instance_id"], rtol=0, atol=0)
        torch.testing.assert_close(a["image"], b["image"], rtol=0, atol=0)
        for name in FIELDS:
            torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)


@pytest.mark.heavy  # 3 epochs through the proxy, 2 with faults on every object: 335 s on a loaded 2-core machine
def test_an_epoch_from_s3_survives_bursts_and_fails_on_an_outage(
    local_cache, s3_cache, s3_server, monkeypatch, capsys
) -> None:
    clean = _epoch(local_cache)
    assert len(clean) == sum(SHARD_ROWS) // VIEWS // 4  # every instance once
    kinds = ("503", "reset", "truncate")
    with FaultyS3Proxy(s3_server, SHARDS, failures_per_key=2, methods=("GET",), kinds=kinds, seed=3) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        _assert_same_batches(_epoch(s3_cache), clean)
        assert proxy.injected and set(proxy.injected.values()) == {2}
        assert all(proxy.kinds_injected[kind] > 0 for kind in kinds), proxy.kinds_injected
        assert "[io] " in capsys.readouterr().err  # the retries were said

        proxy.injected.clear()
        proxy.failures_per_key = 10**6  # an outage longer than the budget
        with pytest.raises(fileio.TransientIOError, match="storage unavailable: .* on s3://.*/cache/shards/"):
            _epoch(s3_cache, epoch=2)
        proxy.failures_per_key = 0  # healthy again: the same epoch, every sample
        _assert_same_batches(_epoch(s3_cache, epoch=2), _epoch(local_cache, epoch=2))
