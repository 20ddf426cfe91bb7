"""The teacher's forward pass as the cache sees it: build the teacher, run it over uint8
crops and fit a Gaussian to every heatmap.

Shared by the teacher-cache stage, the cache spot check, the online-teacher baseline of
distillation and the benchmarks, so all of them get the same teacher and the same outputs.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from distilpose.data.transforms import normalize_batch
from distilpose.device import normalize_on_device
from distilpose.heatmaps import fit_gaussians
from distilpose.models.checkpoints import load_teacher

TEACHER_FIELDS = ("heatmaps", "kpt_tokens", "vis_tokens", "gauss", "confidence")
TOKEN_FIELDS = ("kpt_tokens", "vis_tokens")
# Precisions the teacher can run in: float32 by default, autocast only when asked for (the
# cache records which one; bf16 moves outputs by a few % of their peak).
AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def build_teacher(preset: str, checkpoint: str | Path | None) -> nn.Module:
    """The teacher in eval mode, from a local checkpoint file. Without a checkpoint (smoke
    tests, benchmarks) the random init is seeded, so every actor - and a later spot check -
    builds the same weights."""
    if checkpoint is None:
        torch.manual_seed(0)
    return load_teacher(preset, checkpoint).eval()


def run_teacher(
    model: nn.Module,
    images: np.ndarray,
    batch_size: int,
    device: torch.device,
    timings: dict[str, float] | None = None,
    precision: str = "fp32",
) -> dict[str, np.ndarray]:
    """Teacher forward + Gaussian fit on uint8 crops (N,H,W,3) -> fp32 numpy fields: heatmaps,
    gauss and confidence, plus kpt_tokens and vis_tokens for a teacher with tokens (a heatmap
    teacher such as SimpleBaseline has none; its fields are not made up as empty arrays).

    `precision`: "fp32" (TF32 matmuls allowed on a GPU), or "bf16" / "fp16" autocast.
    `timings`, when given, accumulates seconds of "forward" (normalize + forward) and "fit"
    (Gaussian fit + copies to numpy) - the benchmark's breakdown of the actor's work.
    """
    if precision not in AUTOCAST_DTYPES:
        raise ValueError(f"teacher precision {precision!r}: choose one of {list(AUTOCAST_DTYPES)}")
    amp_dtype = AUTOCAST_DTYPES[precision]
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # ~fp16-level input rounding, well within the fp32 tolerance
    has_tokens = getattr(getattr(model, "config", None), "has_tokens", True)
    fields = TEACHER_FIELDS if has_tokens else tuple(n for n in TEACHER_FIELDS if n not in TOKEN_FIELDS)
    parts: dict[str, list[np.ndarray]] = {name: [] for name in fields}
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            t0 = time.perf_counter()
            chunk = images[start : start + batch_size]
            # On a GPU the uint8 crops are uploaded and normalized there (a quarter of the bytes);
            # the CPU keeps the loader's arithmetic and memory layout exactly.
            x = normalize_on_device(chunk, device) if device.type == "cuda" else normalize_batch(chunk)
            autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
            with autocast:
                out = model(x)
            heatmaps = out.heatmaps.float()
            if timings is not None:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                t1 = time.perf_counter()
                timings["forward"] = timings.get("forward", 0.0) + t1 - t0
            gauss, conf = fit_gaussians(heatmaps)
            parts["heatmaps"].append(heatmaps.cpu().numpy())
            if has_tokens:
                parts["kpt_tokens"].append(out.kpt_tokens.float().cpu().numpy())
                parts["vis_tokens"].append(out.vis_tokens.float().cpu().numpy())
            parts["gauss"].append(gauss.float().cpu().numpy())
            parts["confidence"].append(conf.float().cpu().numpy())
            if timings is not None:
                timings["fit"] = timings.get("fit", 0.0) + time.perf_counter() - t1
    return {k: np.concatenate(v) if v else np.zeros((0,), np.float32) for k, v in parts.items()}
