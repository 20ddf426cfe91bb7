"""How accurate a heatmap teacher is on the crops it labels: PCK on the cached views.

A cache holds the teacher's outputs for view 0 (the un-augmented crop) and V-1 augmented
views, and an online teacher labels a fresh augmentation every step: a student distilled
either way learns from the teacher's answers on augmented crops. A teacher trained without
augmentation is good on view 0 only, and every augmented crop then hands the student wrong
targets, which makes any comparison of cached and online distillation meaningless. The
premise studies measure this before a student runs.

PCK here: the fraction of labelled joints inside the crop whose decoded teacher location
(DARK, no flip test: the cache stores the plain forward) lies within ``threshold`` x the crop
height of the ground truth, in crop pixels. Views are the cache's own (``view_for`` with the
cache's seed), so the numbers are about exactly the crops a cache of that seed holds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from distilpose.coco_metrics import heatmap_to_crop
from distilpose.data.coco import Instance, read_image
from distilpose.data.transforms import HALF_BODY_NONE, AugmentConfig, apply_view, normalize_batch
from distilpose.data.views import view_for
from distilpose.heatmaps import decode_heatmaps

PCK_THRESHOLD = 0.05  # x crop height: 12.8 px of a 256-px crop, 6.4 px of the tiny presets' 128


@dataclass
class ViewAccuracy:
    """PCK of one teacher on view 0, on the augmented views, and on the half-body ones."""

    view0: float
    augmented: float
    half_body: float | None  # None when no augmented view was a half-body crop
    joints_view0: int
    joints_augmented: int
    instances: int
    views: int  # cached views per instance measured (view 0 included)
    threshold: float = PCK_THRESHOLD

    @property
    def ratio(self) -> float:
        """Augmented-view PCK over view-0 PCK (1.0: as good on augmented crops)."""
        return self.augmented / self.view0 if self.view0 > 0 else 0.0

    def line(self) -> str:
        half = f", half-body {self.half_body:.2f}" if self.half_body is not None else ""
        return (
            f"teacher PCK@{self.threshold:g} x crop height on {self.instances} train instances: view 0 "
            f"{self.view0:.2f}, augmented views 1..{self.views - 1} {self.augmented:.2f}{half} "
            f"(ratio {self.ratio:.2f})"
        )

    def to_dict(self) -> dict:
        return {**self.__dict__, "ratio": self.ratio}


def teacher_view_accuracy(
    model: nn.Module,
    instances: Sequence[Instance],
    image_root: str,
    views: int = 8,
    seed: int = 0,
    input_size: tuple[int, int] | None = None,
    aug: AugmentConfig | None = None,
    threshold: float = PCK_THRESHOLD,
    batch_size: int = 64,
) -> ViewAccuracy:
    """PCK of `model` (a heatmap teacher) on views 0..views-1 of `instances` (those a cache of
    this `seed` stores)."""
    if views < 2:
        raise ValueError("views must be >= 2: view 0 and at least one augmented view")
    size = tuple(input_size or model.config.input_size)
    hits: dict[str, int] = {"view0": 0, "augmented": 0, "half_body": 0}
    counts: dict[str, int] = {"view0": 0, "augmented": 0, "half_body": 0}
    crops, joints, kinds = [], [], []

    def flush() -> None:
        if not crops:
            return
        found = _teacher_crop_coords(model, np.stack(crops), size)
        for pred, truth, kind in zip(found, joints, kinds):
            valid = truth[:, 2] > 0
            close = np.linalg.norm(pred[valid] - truth[valid, :2], axis=1) <= threshold * size[0]
            for k in kind:
                hits[k] += int(close.sum())
                counts[k] += int(valid.sum())
        crops.clear(), joints.clear(), kinds.clear()

    for inst in instances:
        image = read_image(image_root, inst.image_file)
        for v in range(views):
            params = view_for(inst, v, seed, aug)
            crop, crop_joints = apply_view(image, inst.joints, params, size)
            crops.append(crop)
            joints.append(crop_joints)
            kinds.append(_kinds(v, params.half_body))
            if len(crops) == batch_size:
                flush()
    flush()

    def pck(kind: str) -> float | None:
        return hits[kind] / counts[kind] if counts[kind] else None

    return ViewAccuracy(
        view0=pck("view0") or 0.0,
        augmented=pck("augmented") or 0.0,
        half_body=pck("half_body"),
        joints_view0=counts["view0"],
        joints_augmented=counts["augmented"],
        instances=len(instances),
        views=views,
        threshold=threshold,
    )


def _kinds(view: int, half_body: int) -> tuple[str, ...]:
    if view == 0:
        return ("view0",)
    return ("augmented", "half_body") if half_body != HALF_BODY_NONE else ("augmented",)


def _teacher_crop_coords(model: nn.Module, crops: np.ndarray, input_size: tuple[int, int]) -> np.ndarray:
    """Decoded teacher joints (N, K, 2) in crop px."""
    device = next(model.parameters()).device
    with torch.inference_mode():
        heatmaps = model.eval()(normalize_batch(crops).to(device)).heatmaps.float()
    coords_hm, _ = decode_heatmaps(heatmaps)
    return heatmap_to_crop(coords_hm.cpu().numpy(), heatmaps.shape[-2:], input_size)
