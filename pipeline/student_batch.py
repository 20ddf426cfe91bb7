"""The student's training batch, assembled in one place for both streams (the cached views,
pipeline.cache_loader, and the fresh ones, pipeline.fresh_views), so a cached run and an
online-fresh run feed the loss the same tensors."""

from __future__ import annotations

import numpy as np
import torch

from distilpose.data.transforms import normalize_batch
from distilpose.device import pin_batch
from distilpose.losses import TOKEN_WEIGHT


def student_batch(
    crops: np.ndarray,
    joints: np.ndarray,
    weights: np.ndarray,
    instance_ids: np.ndarray,
    input_size: tuple[int, int],
    teacher_fields: dict[str, np.ndarray] | None = None,
    token_weight: np.ndarray | None = None,
    pin_memory: bool = False,
) -> dict[str, torch.Tensor]:
    """crops (N, H, W, 3) uint8, joints (N, K, 2) crop px, weights (N, K) -> the batch dict:
    normalized `image`, `target` in [0, 1] of the crop, `target_weight`, `instance_id`, the
    teacher's fields as given, and `token_weight` (the token losses' per-sample mask) when given."""
    h, w = input_size
    batch = {
        "image": normalize_batch(crops),
        "target": torch.from_numpy(np.ascontiguousarray(joints)) / torch.tensor([w, h], dtype=torch.float32),
        "target_weight": torch.from_numpy(np.ascontiguousarray(weights)),
        "instance_id": torch.from_numpy(np.asarray(instance_ids).astype(np.int64)),
    }
    for key, value in (teacher_fields or {}).items():
        batch[key] = torch.from_numpy(np.ascontiguousarray(value))
    if token_weight is not None:
        batch[TOKEN_WEIGHT] = torch.from_numpy(np.ascontiguousarray(token_weight))
    # Pinned here, in the loader's prefetch thread, so the step's non_blocking copy is asynchronous.
    return pin_batch(batch) if pin_memory else batch
