"""The cache job reading its images from a real S3 server (moto over HTTP) through a loopback
proxy that injects faults (503 SlowDown, connection resets, truncated bodies) on a seeded
schedule. Whatever the schedule, after at most one rerun (as a user would do) every instance
is present and every unit's sha256 equals the clean cache's (`tiny_cache`, the same job on
the same images read from disk): a fault is retried or fails the job, never a skipped row.

Each case runs the real job (`jobs/cache_teacher.py`) in a subprocess with its own local
Ray, one to two minutes on a busy 2-core machine: heavy (`make test-heavy`). The storage
layer's own fault tests (tests/test_fileio.py) are in the default suite.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from local_services import FaultyS3Proxy
from pipeline_fixtures import CACHE_SHARD_INSTANCES, CACHE_VIEWS, TEACHER, run_job

from distilpose import fileio
from pipeline.cache import open_reader
from pipeline.cli import STORAGE_UNAVAILABLE

pytestmark = pytest.mark.heavy
JOB_TIMEOUT_S = 420
INSTANCES = 47  # tiny_data's train split
# Short backoffs and no silent retries inside the S3 client: a test budget of seconds.
FAST_RETRIES = {fileio.ATTEMPTS_ENV: "5", fileio.BACKOFF_ENV: "0.05", fileio.S3_CLIENT_ATTEMPTS_ENV: "1"}


@pytest.fixture
def s3_data(tiny_data, s3_bucket) -> str:
    """tiny_data's annotations and images, uploaded to the bucket."""
    root = Path(tiny_data)
    for path in sorted(root.rglob("*")):
        if path.is_file():
            fileio.atomic_write_bytes(f"{s3_bucket}/data/{path.relative_to(root)}", path.read_bytes())
    return f"{s3_bucket}/data"


@pytest.fixture
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in FAST_RETRIES.items():
        monkeypatch.setenv(key, value)


def _cache_job(data: str, out: str, tiny_teacher: str) -> tuple[int, str, float]:
    args = ["--data", data, "--teacher", TEACHER, "--checkpoint", tiny_teacher, "--out", out]
    args += ["--views", str(CACHE_VIEWS), "--shard-instances", str(CACHE_SHARD_INSTANCES)]
    # `--store-crops auto` stores JPEG crops for images on S3; the clean cache it is compared
    # with read local images (no crops), so pin the choice: the bytes must match.
    args += ["--store-crops", "none"]
    t0 = time.perf_counter()
    result = run_job("cache_teacher.py", args, timeout_s=JOB_TIMEOUT_S)
    return result.returncode, result.stdout, time.perf_counter() - t0


def _unit_hashes(uri: str) -> dict[str, str]:
    return {unit.name: unit.sha256 for unit in open_reader(uri).manifest.units()}


def _assert_equals_clean_cache(out: str, clean: str) -> None:
    reader = open_reader(out)
    assert reader.manifest.complete
    assert reader.manifest.num_rows == INSTANCES * CACHE_VIEWS  # every instance, every view
    assert _unit_hashes(out) == _unit_hashes(clean)


def test_bursts_of_faults_are_retried_not_skipped(
    s3_data, s3_server, tiny_cache, tiny_teacher, fast_retries, monkeypatch, tmp_path
) -> None:
    """Every image GET fails twice (503, reset or truncated body, seeded per key), which the
    budget (5 attempts) absorbs: one run, exit 0, the clean cache's bytes."""
    match = ("/data/images/",)
    kinds = ("503", "reset", "truncate")
    with FaultyS3Proxy(s3_server, match, failures_per_key=2, methods=("GET",), kinds=kinds, seed=7) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        code, out, wall = _cache_job(s3_data, str(tmp_path / "cache"), tiny_teacher)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    assert code == 0, out[-4000:]
    assert "image:" not in out, out[-2000:]  # no row skipped for an image (crowd regions are)
    images = {key for key in proxy.injected if "/images/" in key}
    assert images and set(proxy.injected.values()) == {2}  # every image read met its two faults
    assert all(proxy.kinds_injected[kind] > 0 for kind in kinds), proxy.kinds_injected
    _assert_equals_clean_cache(str(tmp_path / "cache"), tiny_cache)
    injected = dict(proxy.kinds_injected)
    print(f"\n[cache faults] burst: {injected} injected on {len(images)} images; exit 0 in {wall:.0f} s")


def test_an_outage_fails_the_job_and_a_rerun_completes_it(
    s3_data, s3_server, tiny_cache, tiny_teacher, fast_retries, monkeypatch, tmp_path
) -> None:
    """Images answer 503 SlowDown for longer than the budget: the job ends non-zero with one
    line naming the throttling, commits nothing it could not compute, and the same command
    rerun once S3 is healthy again computes the rest."""
    out = str(tmp_path / "cache")
    with FaultyS3Proxy(
        s3_server, ("/data/images/",), failures_per_key=10**6, methods=("GET",), kinds=("503",)
    ) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        code, log, wall = _cache_job(s3_data, out, tiny_teacher)
        assert code == STORAGE_UNAVAILABLE, log[-4000:]
        error_lines = [line for line in log.splitlines() if line.startswith("error: ")]
        assert len(error_lines) == 1, log[-4000:]
        assert "storage unavailable: S3 throttling (SlowDown) on image s3://" in error_lines[0]
        # The job's last word is that one line (Ray Data logs the task's error above it).
        assert "rerun the same command" in error_lines[0] and log.strip().splitlines()[-1] == error_lines[0]
        print("\n[cache faults] outage log tail:\n" + log[-3000:])
        committed_before = len(_committed_units(out))
        proxy.failures_per_key = 0  # S3 is healthy again
        code, rerun_log, rerun_wall = _cache_job(s3_data, out, tiny_teacher)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    assert code == 0, rerun_log[-4000:]
    assert "image:" not in rerun_log
    _assert_equals_clean_cache(out, tiny_cache)
    print(
        f"\n[cache faults] outage: exit {STORAGE_UNAVAILABLE} after {wall:.0f} s ({committed_before} units committed); "
        f"rerun: exit 0 in {rerun_wall:.0f} s, every unit equal to the clean cache"
    )


def _committed_units(uri: str) -> list[str]:
    """Names of the units committed under `uri` (the commit records), [] when there are none."""
    return fileio.listdir(os.path.join(uri, "commits"))
