"""The training loader's view choice: one unit (view) per shard per epoch, uniform over the
first K views, and only that unit read."""

from __future__ import annotations

import dataclasses
from collections import Counter

import numpy as np
import pytest
from cache_rows import SMALL_SPEC, base_manifest, teacher_like_rows

from distilpose.errors import UserError
from pipeline.cache import open_reader, open_writer
from pipeline.cache.encodings import encode_crop_jpeg
from pipeline.cache.schema import CROP_FIELD
from pipeline.cache_loader import CachedViewStream, resolve_cache_views, shard_view
from pipeline.distill.checks import check_cache_views
from pipeline.distill.config import DistillConfig

VIEWS = 4
SHARDS = 6


class UnitCounter:
    """A cache reader that records every unit (shard, view) it opens."""

    def __init__(self, reader):
        self._reader, self.units = reader, []
        real = reader._read_raw

        def counted(unit, arrays, rows):
            self.units.append((unit.shard, unit.view))
            return real(unit, arrays, rows)

        reader._read_raw = counted

    def __getattr__(self, name):
        return getattr(self._reader, name)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> str:
    """SHARDS shards of 2 instances x VIEWS views (ids 8 * shard + 0/1), with real JPEG crops."""
    uri = str(tmp_path_factory.mktemp("loader-cache") / "cache")
    writer = open_writer(uri, SMALL_SPEC, "zarr")
    rng = np.random.default_rng(0)
    for shard in range(SHARDS):
        rows = teacher_like_rows(SMALL_SPEC, 2 * VIEWS, seed=shard, first_instance=8 * shard, views=VIEWS)
        rows[CROP_FIELD] = [encode_crop_jpeg(rng.integers(0, 255, (64, 48, 3), dtype=np.uint8)) for _ in range(8)]
        writer.write_shard(shard, rows)
    writer.finalize(base_manifest(VIEWS), expected_shards=SHARDS)
    return uri


def _stream(reader, cache_views=None, exclude_view0=False) -> CachedViewStream:
    return CachedViewStream(
        reader,
        None,
        None,
        (64, 48),
        ("gauss",),
        rank=0,
        world_size=1,
        batch_size=2,
        seed=3,
        cache_views=cache_views,
        exclude_view0=exclude_view0,
    )


def test_shard_view_is_uniform_and_differs_between_shards() -> None:
    draws = Counter(shard_view(0, epoch, 5, VIEWS) for epoch in range(4000))
    assert set(draws) == set(range(VIEWS)) and all(abs(n / 4000 - 1 / VIEWS) < 0.03 for n in draws.values())
    # In one epoch, the shards' choices are independent: not one view for all.
    assert len({shard_view(0, 7, shard, VIEWS) for shard in range(32)}) == VIEWS
    assert shard_view(0, 7, 3, VIEWS) == shard_view(0, 7, 3, VIEWS)  # seeded: any rank, any rerun


@pytest.mark.parametrize("cache_views", [None, 2, 1])
def test_an_epoch_reads_one_unit_per_shard_among_the_first_k(cache, cache_views) -> None:
    spy = UnitCounter(open_reader(cache))
    stream = _stream(spy, cache_views)
    k = cache_views or VIEWS
    seen = set()
    for epoch in range(8):
        spy.units.clear()
        for shard in range(SHARDS):
            rows = stream._load_shard(shard, ("instance_id", "view", "gauss"), epoch)
            view = shard_view(3, epoch, shard, k)
            # Every instance of the shard, each once, all in the chosen view.
            assert sorted(rows["instance_id"].tolist()) == [8 * shard, 8 * shard + 1]
            assert (rows["view"] == view).all()
            seen.add(view)
        assert sorted(spy.units) == [(shard, shard_view(3, epoch, shard, k)) for shard in range(SHARDS)]
    assert seen == set(range(k))


def test_epoch_bytes_are_one_view_of_the_cache(cache) -> None:
    reader = open_reader(cache)
    opened = UnitCounter(reader)
    stream = _stream(opened)
    batches = list(stream.epoch(0))
    assert len(batches) == stream.steps == SHARDS * 2 // 2
    read = sum(reader.shard_info(s).unit(v).total_bytes for s, v in opened.units)
    total = sum(s.total_bytes for s in reader.manifest.shards)
    assert len(opened.units) == SHARDS and read / total == pytest.approx(1 / VIEWS, rel=0.1)


def test_more_cache_views_than_cached_are_refused(cache) -> None:
    assert resolve_cache_views(VIEWS, None) == VIEWS and resolve_cache_views(VIEWS, 3) == 3
    with pytest.raises(UserError, match="holds 4 views"):
        resolve_cache_views(VIEWS, 5)
    manifest = open_reader(cache).manifest
    cfg = DistillConfig(cache=cache, cache_views=5)
    with pytest.raises(UserError, match="--cache-views 5.*holds 4 views per instance; choose 1..4") as err:
        check_cache_views(cfg, manifest)
    assert "\n" not in str(err.value)
    check_cache_views(dataclasses.replace(cfg, cache_views=4), manifest)


@pytest.mark.parametrize("cache_views", [None, 2])
def test_exclude_view0_draws_only_augmented_views(cache, cache_views) -> None:
    """--exclude-view0: views 1..K (K augmented views; default all but view 0), uniformly;
    the un-augmented view 0 never comes."""
    stream = _stream(open_reader(cache), cache_views, exclude_view0=True)
    k = cache_views or VIEWS - 1
    assert (stream.first_view, stream.views) == (1, k)
    views = Counter()
    for epoch in range(300):
        for shard in range(SHARDS):
            rows = stream._load_shard(shard, ("instance_id", "view"), epoch) if epoch < 3 else None
            view = shard_view(3, epoch, shard, stream.views, stream.first_view)
            if rows is not None:
                assert (rows["view"] == view).all()
            views[view] += 1
    assert set(views) == set(range(1, k + 1))
    assert all(abs(n / (300 * SHARDS) - 1 / k) < 0.04 for n in views.values())
    # The same draw as without the exclusion, shifted by one: K=2 excluded reads 1..2, not 0..1.
    assert shard_view(3, 5, 2, 2, 1) == shard_view(3, 5, 2, 2) + 1


def test_exclude_view0_bounds(cache) -> None:
    assert resolve_cache_views(VIEWS, None, first_view=1) == VIEWS - 1
    with pytest.raises(UserError, match="holds 3 views per instance from view 1 on"):
        resolve_cache_views(VIEWS, VIEWS, first_view=1)
    manifest = open_reader(cache).manifest
    cfg = DistillConfig(cache=cache, cache_views=4, exclude_view0=True)
    with pytest.raises(UserError, match=r"holds 3 augmented views \(1..V-1\) per instance.*--views 5"):
        check_cache_views(cfg, manifest)
    check_cache_views(dataclasses.replace(cfg, cache_views=3), manifest)
