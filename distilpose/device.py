"""Moving batches and models onto the training device without stalling it.

A host->GPU copy is asynchronous only from page-locked (pinned) memory: `non_blocking=True`
on an ordinary tensor still blocks the Python thread for the whole copy. So batches are
pinned first - ideally in the loader's background thread (`pin_batch`), so the step only
queues the copy (`to_device`). On the CPU both are plain no-ops.

Crops are uploaded as uint8 and normalized on the GPU (`normalize_on_device`): a quarter of
the bytes of a float32 upload, and the arithmetic runs where it is cheap.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from distilpose.data.transforms import channels_first, normalize_images


def pin_batch(batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The batch in pinned host memory (unchanged when no GPU is present)."""
    if not torch.cuda.is_available():
        return dict(batch)
    return {k: v if v.is_pinned() else v.pin_memory() for k, v in batch.items()}


def to_device(
    batch: Mapping[str, torch.Tensor], device: torch.device, channels_last: bool = False
) -> dict[str, torch.Tensor]:
    """Every tensor of `batch` on `device`: pinned + non_blocking on a GPU, so the copy
    overlaps the work already queued; 4-D image tensors optionally channels_last."""
    if device.type != "cuda":
        return {k: v.to(device) for k, v in batch.items()}
    moved = {k: v.to(device, non_blocking=True) for k, v in pin_batch(batch).items()}
    if channels_last:
        moved = {k: v.contiguous(memory_format=torch.channels_last) if v.dim() == 4 else v for k, v in moved.items()}
    return moved


def prepare_model(model: torch.nn.Module, device: torch.device, channels_last: bool = False) -> torch.nn.Module:
    """`model` on `device`; with `channels_last` its conv weights in NHWC (tensor-core friendly
    under AMP; only applied on a GPU, where it is measured by bench/bench_gpu.py)."""
    model = model.to(device)
    if channels_last and device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model


def normalize_on_device(crops: np.ndarray, device: torch.device, channels_last: bool = False) -> torch.Tensor:
    """uint8 crops (N, H, W, 3) -> normalized float32 (N, 3, H, W) on `device`, computed
    there: the upload is uint8 (pinned, non_blocking), the same values as
    `distilpose.data.transforms.normalize_batch`."""
    x = channels_first(crops)
    if device.type == "cuda":
        x = x.pin_memory().to(device, non_blocking=True)
    x = normalize_images(x)
    return x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (timing needs it on a GPU; no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_bytes(device: torch.device) -> int | None:
    """Peak bytes allocated on the GPU since the last `reset_peak_memory`; None on the CPU."""
    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
