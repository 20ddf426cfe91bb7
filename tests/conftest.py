"""Shared pytest fixtures.

S3: a real HTTP endpoint (moto's server) on 127.0.0.1, started once per session in its own
process, so that multi-process writers can reach it and it does not compete with the
tests for the GIL.
"""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Iterator

import pytest
from local_services import S3_TEST_ENV, moto_server

# Ray reads these at import/init time; set them before any test module imports ray.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """Endpoint URL of a moto S3 server; AWS_* variables point at it for the session."""
    with moto_server() as (endpoint, _):
        yield endpoint


def _s3_client(endpoint: str):
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=S3_TEST_ENV["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=S3_TEST_ENV["AWS_SECRET_ACCESS_KEY"],
        region_name=S3_TEST_ENV["AWS_DEFAULT_REGION"],
    )


@pytest.fixture
def s3_bucket(s3_server: str) -> Iterator[str]:
    """A fresh, empty bucket as ``s3://<bucket>``; emptied and deleted afterwards."""
    client = _s3_client(s3_server)
    bucket = f"test-{uuid.uuid4().hex[:16]}"
    client.create_bucket(Bucket=bucket)
    try:
        yield f"s3://{bucket}"
    finally:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            keys = [{"Key": obj["Key"]} for obj in page.get("Contents", [])]
            if keys:
                client.delete_objects(Bucket=bucket, Delete={"Objects": keys})
        client.delete_bucket(Bucket=bucket)


@pytest.fixture(params=["local", "s3"])
def cache_root(request: pytest.FixtureRequest, tmp_path) -> str:
    """Where a cache store test writes its cache: a local folder, then an S3 prefix."""
    if request.param == "local":
        return str(tmp_path / "cache")
    return request.getfixturevalue("s3_bucket") + "/cache"


# ----------------------------------------------------------------------------- distillation
# Session fixtures of the Ray tests (tests/pipeline_fixtures.py), defined here so that all
# their modules share one local Ray, one tiny data set, one tiny teacher and one tiny cache.
from pipeline_fixtures import local_ray, tiny_cache, tiny_data, tiny_teacher  # noqa: E402, F401


@pytest.fixture(scope="session", autouse=True)
def _shutdown_ray_at_the_end() -> Iterator[None]:
    """The local Ray that `local_ray` keeps across modules stops with the session."""
    yield
    ray = sys.modules.get("ray")  # not imported: nothing started
    if ray is not None and ray.is_initialized():
        ray.shutdown()
