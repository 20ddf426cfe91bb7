"""Growing V in place: rerunning the caching job with a larger --views computes only the
missing (shard, view) units and ends with the manifest a fresh build with the final V has.

Real teacher (tokenpose-tiny), local files and S3 (moto), both formats; six instances in two
shards, so each job takes seconds. The heavy test builds and grows through the Ray Data stage;
the others use the job's in-process engine (the same units: tests/test_teacher_stage.py).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from distilpose.data.synthetic import make_synthetic_coco
from pipeline import storage
from pipeline.cache import open_reader
from pipeline.cache.verify import verify_cache
from pipeline.teacher_stage import CacheJobConfig, run_cache_job

ROOT = Path(__file__).resolve().parents[1]
LIMIT, SHARD_INSTANCES = 6, 4  # at most 6 instances: two shards


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("grow-data")
    make_synthetic_coco(root, num_train=4, num_val=0, seed=3)
    return root


def _job(synth: Path, out: str, fmt: str, views: int, engine: str = "in-process"):
    cfg = CacheJobConfig(
        data=str(synth),
        teacher="tokenpose-tiny",
        out=out,
        format=fmt,
        views=views,
        shard_instances=SHARD_INSTANCES,
        limit=LIMIT,
        batch_size=4,
        store_crops="none",  # S3 and local caches alike (auto would store crops on S3)
        engine=engine,
    )
    return run_cache_job(cfg)


def _unit_hashes(uri: str) -> dict[tuple[int, int], str]:
    return {(u.shard, u.view): u.sha256 for u in open_reader(uri).manifest.units()}


@pytest.fixture(scope="module")
def fresh(synth, tmp_path_factory):
    """fresh(fmt): the unit checksums of a fresh V=4 build, built on first use per format."""
    built: dict[str, dict] = {}

    def hashes(fmt: str) -> dict:
        if fmt not in built:
            uri = str(tmp_path_factory.mktemp(f"fresh-{fmt}") / "cache")
            _job(synth, uri, fmt, views=4)
            built[fmt] = _unit_hashes(uri)
        return built[fmt]

    return hashes


# The partial S3 Zarr cache in the default suite (one fresh reference build); the complete
# local cache (three more jobs) and WebDataset under heavy.
@pytest.mark.heavy
@pytest.mark.parametrize("fmt", ["zarr", "wds"])
def test_growing_a_complete_local_cache_equals_a_fresh_build(synth, fresh, local_ray, tmp_path, fmt, capsys):
    # Built and grown by the Ray Data stage; the fresh reference is in-process: the same units.
    uri = str(tmp_path / "cache")
    small = _job(synth, uri, fmt, views=2, engine="ray")
    n = small.instances
    assert SHARD_INSTANCES < n <= LIMIT and small.views_computed == n * 2 and small.units_total == 4
    commits_before = {n: storage.read_bytes(storage.join(uri, "commits", n)) for n in storage.listdir(f"{uri}/commits")}
    capsys.readouterr()

    grown = _job(synth, uri, fmt, views=4, engine="ray")
    log = capsys.readouterr().out
    assert "[cache] growing V 2 -> 4: reusing 4 shard-views, computing 4 (views 2-3)" in log
    # Only the new views went through the crop task and the teacher.
    assert grown.views_computed == n * 2 and grown.units_reused == 4 and grown.units_total == 8
    assert f"views computed this run {n * 2}" in grown.table()
    for name, record in commits_before.items():  # the old units were not rewritten
        assert storage.read_bytes(storage.join(uri, "commits", name)) == record, name
    assert _unit_hashes(uri) == fresh(fmt)
    manifest = open_reader(uri).manifest
    assert manifest.views == 4 and manifest.complete and verify_cache(uri).ok

    again = _job(synth, uri, fmt, views=4)  # nothing left to do
    assert again.views_computed == 0 and again.units_reused == 8


@pytest.mark.parametrize("fmt", ["zarr", pytest.param("wds", marks=pytest.mark.heavy)])
def test_growing_a_partial_s3_cache_equals_a_fresh_build(synth, fresh, s3_bucket, fmt, capsys):
    uri = f"{s3_bucket}/cache-{fmt}"
    _job(synth, uri, fmt, views=2)
    # A partial cache: a unit lost its commit (a crash between data and commit), and the
    # manifest is gone (as after any write).
    storage.remove(storage.join(uri, "commits", "shard-00001.view-001.json"))
    storage.remove(storage.join(uri, "manifest.json"))
    capsys.readouterr()

    grown = _job(synth, uri, fmt, views=4)
    log = capsys.readouterr().out
    assert "[cache] growing V 2 -> 4: reusing 3 shard-views, computing 5 (views 1-3)" in log
    n = grown.instances
    assert grown.views_computed == (n - SHARD_INSTANCES) + n * 2  # shard 1's view 1, and views 2-3
    assert _unit_hashes(uri) == fresh(fmt)
    assert verify_cache(uri).ok


def test_a_smaller_views_is_refused_in_one_line(synth, tmp_path):
    uri = str(tmp_path / "cache")
    _job(synth, uri, "wds", views=2)
    job = [sys.executable, str(ROOT / "jobs" / "cache_teacher.py"), "--data", str(synth), "--out", uri]
    job += ["--teacher", "tokenpose-tiny", "--format", "wds", "--views", "1", "--shard-instances", str(SHARD_INSTANCES)]
    job += ["--limit", str(LIMIT), "--batch-size", "4"]
    result = subprocess.run(job, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    errors = result.stderr.strip().splitlines()
    assert len(errors) == 1 and "--views 1 would shrink it" in errors[0] and "--cache-views 1" in errors[0]
    assert open_reader(uri).manifest.views == 2  # untouched
