"""Rebuilt crops of a shuffle pool with each source image decoded once.

A loader that shuffles a pool of rows (pipeline.cache_loader: a few shards' instances) asks
for the persons of one image in scattered batches, so a small cache of recent images misses
nearly every time: ~0.9 decodes per sample where the data has 2-3 persons per image (see
`bench/bench_loader_cost.py`). Here the first row of an image that a batch asks for decodes
it and warps the crops of all the pool's rows from that image; the others wait, as crops (a
256x192 crop is 1/6 of a 640x480 image), until their batch asks. The crops are the ones a
decode per row gives (`crop_of_view` of the same image and view), so the batches do not change.

Memory: the crops waiting, at most one per pool row (typically about a third of them).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from distilpose.data.transforms import crop_of_view


class PoolCrops:
    """`crop(instance_id, image_id, view_params)` for the rows of the current pool."""

    def __init__(self, read_image: Callable[[int], np.ndarray], input_size: tuple[int, int]):
        self.read_image = read_image  # image id -> RGB uint8 (H, W, 3)
        self.input_size = tuple(input_size)
        self.decodes = 0  # source images decoded so far (for benchmarks and tests)
        self._ready: dict[tuple, np.ndarray] = {}  # warped ahead, waiting for their batch
        self._todo: dict[int, list[tuple[tuple, np.ndarray]]] = {}  # image id -> rows not warped yet

    def reset(self) -> None:
        """Forget everything (a new epoch: the same instance gets another view)."""
        self._ready.clear()
        self._todo.clear()

    def set_pool(self, instance_ids: np.ndarray, image_ids: np.ndarray, view_params: np.ndarray) -> None:
        """The rows the next batches draw from (rows of the previous pool carried over included)."""
        self._todo = {}
        for instance_id, image_id, params in zip(instance_ids, image_ids, view_params):
            key = _key(instance_id, params)
            if key not in self._ready:
                self._todo.setdefault(int(image_id), []).append((key, params))

    def crop(self, instance_id: int, image_id: int, view_params: np.ndarray) -> np.ndarray:
        key = _key(instance_id, view_params)
        if key in self._ready:
            return self._ready.pop(key)
        image = self.read_image(int(image_id))
        self.decodes += 1
        for other, params in self._todo.pop(int(image_id), ()):
            if other != key:
                self._ready[other] = crop_of_view(image, params, self.input_size)
        return crop_of_view(image, view_params, self.input_size)


def _key(instance_id, view_params: np.ndarray) -> tuple:
    # The view is part of the key: a crop is never handed to a row with another view.
    return int(instance_id), np.asarray(view_params, dtype=np.float32).tobytes()
