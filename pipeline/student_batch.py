"""The student's training batch, assembled in one place for both streams (the cached views,
pipeline.cache_loader, and the fresh ones, pipeline.fresh_views), so a cached run and an
online-fresh run feed the loss the same tensors.

On a GPU worker the images stay uint8 in the loader (`normalize=False`) and are normalized
on the device by `on_device`: the loader's CPU per sample drops by the normalization (the
largest piece after the JPEG decode) and the host-to-device copy is 4x smaller. The values
are the ones `normalize_batch` computes on the CPU."""

from __future__ import annotations

import numpy as np
import torch

from distilpose.data.transforms import channels_first, normalize_batch, normalize_images
from distilpose.device import pin_batch, to_device
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
    normalize: bool = True,
) -> dict[str, torch.Tensor]:
    """crops (N, H, W, 3) uint8, joints (N, K, 2) crop px, weights (N, K) -> the batch dict:
    normalized `image`, `target` in [0, 1] of the crop, `target_weight`, `instance_id`, the
    teacher's fields as given, and `token_weight` (the token losses' per-sample mask) when given.
    `normalize` False: `image` is uint8 (N, 3, H, W), for `on_device` to normalize."""
    h, w = input_size
    batch = {
        "image": normalize_batch(crops) if normalize else channels_first(crops),
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


def on_device(
    batch: dict[str, torch.Tensor], device: torch.device, channels_last: bool = False
) -> dict[str, torch.Tensor]:
    """The batch on `device` (`distilpose.device.to_device`), its images normalized there if
    the loader left them uint8."""
    batch = to_device(batch, device, channels_last)
    if batch["image"].dtype == torch.uint8:
        batch["image"] = normalize_images(batch["image"])
    return batch
