"""Rebuilt crops of a shuffle pool: the crops a decode per row gives, one decode per image."""

from __future__ import annotations

import numpy as np

from distilpose.data.pool_crops import PoolCrops
from distilpose.data.transforms import ViewParams, crop_of_view

SIZE = (32, 24)


def pool(seed: int = 0, images: int = 5, rows: int = 12):
    rng = np.random.default_rng(seed)
    pictures = {i: rng.integers(0, 255, (60, 80, 3), dtype=np.uint8) for i in range(images)}
    image_ids = rng.integers(0, images, rows)
    views = []
    for i in range(rows):
        center = (rng.uniform(20, 60), rng.uniform(15, 45))
        views.append(ViewParams(center, (30.0, 40.0), rng.uniform(-30, 30), bool(i % 2)).to_array())
    views = np.stack(views)
    return pictures, np.arange(100, 100 + rows), image_ids, views


def test_same_crops_as_one_decode_per_row_and_one_decode_per_image() -> None:
    pictures, ids, image_ids, views = pool()
    crops = PoolCrops(lambda i: pictures[i], SIZE)
    crops.set_pool(ids, image_ids, views)
    for i in np.random.default_rng(1).permutation(len(ids)):  # any order the batches ask in
        np.testing.assert_array_equal(
            crops.crop(ids[i], image_ids[i], views[i]), crop_of_view(pictures[image_ids[i]], views[i], SIZE)
        )
    assert crops.decodes == len(set(image_ids.tolist()))
    assert not crops._ready  # nothing left waiting


def test_rows_carried_into_the_next_pool_keep_their_crops_and_an_epoch_starts_afresh() -> None:
    pictures, ids, image_ids, views = pool(images=3)
    crops = PoolCrops(lambda i: pictures[i], SIZE)
    crops.set_pool(ids, image_ids, views)
    first = crops.crop(ids[0], image_ids[0], views[0])  # warps its image's other rows ahead
    waiting = dict(crops._ready)
    crops.set_pool(ids[1:], image_ids[1:], views[1:])  # the leftover goes on in the next pool
    for i in range(1, len(ids)):
        np.testing.assert_array_equal(
            crops.crop(ids[i], image_ids[i], views[i]), crop_of_view(pictures[image_ids[i]], views[i], SIZE)
        )
    assert crops.decodes == len(set(image_ids.tolist()))
    np.testing.assert_array_equal(first, crop_of_view(pictures[image_ids[0]], views[0], SIZE))
    assert waiting  # some crops did wait
    # Another view of the same instance (next epoch) is never served a stale crop.
    crops.set_pool(ids, image_ids, views)
    crops.crop(ids[0], image_ids[0], views[0])
    crops.reset()
    other = views[1].copy()
    other[4] += 10.0
    np.testing.assert_array_equal(
        crops.crop(ids[1], image_ids[1], other), crop_of_view(pictures[image_ids[1]], other, SIZE)
    )
