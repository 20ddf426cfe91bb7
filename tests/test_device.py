"""distilpose.device: the GPU-path helpers give the CPU path's values (on any machine)."""

from __future__ import annotations

import numpy as np
import torch

from distilpose.data.transforms import normalize_batch
from distilpose.device import normalize_on_device, to_device


def test_normalize_on_device_matches_the_loader_normalize() -> None:
    crops = np.random.default_rng(0).integers(0, 256, (3, 16, 12, 3), dtype=np.uint8)
    crops.flags.writeable = False  # the loader hands over read-only arrays at times
    got = normalize_on_device(crops, torch.device("cpu"))
    assert got.shape == (3, 3, 16, 12) and got.dtype == torch.float32
    torch.testing.assert_close(got, normalize_batch(crops), rtol=1e-6, atol=1e-6)


def test_to_device_moves_every_tensor_unchanged() -> None:
    batch = {"image": torch.randn(2, 3, 8, 6), "target": torch.rand(2, 17, 2)}
    moved = to_device(batch, torch.device("cpu"), channels_last=True)
    assert set(moved) == set(batch)
    for key, value in batch.items():
        torch.testing.assert_close(moved[key], value)
