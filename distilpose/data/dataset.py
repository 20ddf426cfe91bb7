"""Torch Dataset of top-down person crops: one sample per `Instance`.

Training samples are augmented views drawn from a generator seeded by (seed, epoch, index),
so a run is reproducible regardless of DataLoader worker count or process restarts
(`set_epoch` must be called at the start of every epoch, also in resumed runs). Evaluation
samples use the identity view (the un-augmented, box-centred crop).

Sample dict (tensors; DataLoader default collation stacks them):
    image          float32 (3, H, W)  ImageNet-normalized crop
    target         float32 (K, 2)     joint (x / W, y / H) in crop px (student regression target)
    target_weight  float32 (K,)       1 for a labelled joint inside the crop, else 0
    heatmap        float32 (K, Hh, Wh) unit-peak Gaussians (only when `heatmap_size` is given)
    affine         float32 (2, 3)     image px -> crop px (what `inference.predict` inverts)
    image_id, instance_id (int64), box_score, area (float32), valid (bool, see below)

Bad images: by default a missing or undecodable image raises `ImageError` naming the file
(evaluation must never silently drop a person). With `skip_bad_images=True` (training) the
sample comes back all-zero with `target_weight` 0 and `valid` False, so it contributes
nothing to a weighted loss; the trainer counts invalid samples and reports them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from distilpose.data.coco import ImageError, Instance, read_image
from distilpose.data.transforms import AugmentConfig, ViewParams, affine_matrix, apply_view, draw_view, identity_view
from distilpose.data.transforms import normalize as normalize_crop
from distilpose.heatmaps import render_gaussian_heatmaps


@dataclass(frozen=True)
class SampleSpec:
    """Sizes of what a sample holds; `heatmap_size` None means no heatmap target."""

    input_size: tuple[int, int]  # (H, W)
    heatmap_size: tuple[int, int] | None = None  # (H, W)
    sigma: float = 2.0  # Gaussian sigma in heatmap px


def crop_to_heatmap_px(joints_crop: np.ndarray, input_size: Sequence[int], heatmap_size: Sequence[int]) -> np.ndarray:
    """Crop px -> heatmap px, the inverse of `coco_metrics.heatmap_to_crop` (x * Wh / W, no offset)."""
    scale = np.array([heatmap_size[1] / input_size[1], heatmap_size[0] / input_size[0]], dtype=np.float64)
    return np.asarray(joints_crop, dtype=np.float64)[..., :2] * scale


def heatmap_target(joints_crop: np.ndarray, spec: SampleSpec) -> torch.Tensor:
    """(K, 3) crop px + weight -> (K, Hh, Wh) Gaussians; zero maps for weight-0 joints."""
    assert spec.heatmap_size is not None
    centers = torch.from_numpy(crop_to_heatmap_px(joints_crop, spec.input_size, spec.heatmap_size)).float()
    weights = torch.from_numpy(np.asarray(joints_crop[:, 2], dtype=np.float32))
    maps = render_gaussian_heatmaps(centers[None], tuple(spec.heatmap_size), spec.sigma, weights[None])
    return maps[0]


def build_sample(
    image: np.ndarray, instance: Instance, view: ViewParams, spec: SampleSpec
) -> dict[str, torch.Tensor | int | float | bool]:
    """One crop of `instance` from its decoded image, with targets (no file access)."""
    crop, joints_crop = apply_view(image, instance.joints, view, spec.input_size)
    height, width = spec.input_size
    sample = {
        "image": normalize_crop(crop),
        "target": torch.from_numpy((joints_crop[:, :2] / np.array([width, height], np.float32)).astype(np.float32)),
        "target_weight": torch.from_numpy(joints_crop[:, 2].astype(np.float32)),
        "affine": torch.from_numpy(affine_matrix(view, spec.input_size)),
    }
    if spec.heatmap_size is not None:
        sample["heatmap"] = heatmap_target(joints_crop, spec)
    return sample


def blank_sample(instance: Instance, view: ViewParams, spec: SampleSpec) -> dict[str, torch.Tensor]:
    """Stand-in for a sample whose image could not be read: same shapes, zero weight."""
    num_joints = len(instance.joints)
    height, width = spec.input_size
    sample = {
        "image": torch.zeros(3, height, width),
        "target": torch.zeros(num_joints, 2),
        "target_weight": torch.zeros(num_joints),
        "affine": torch.from_numpy(affine_matrix(view, spec.input_size)),
    }
    if spec.heatmap_size is not None:
        sample["heatmap"] = torch.zeros(num_joints, *spec.heatmap_size)
    return sample


class TopDownDataset(Dataset):
    """Person crops of `instances`, read from `image_root` (local folder or s3:// prefix)."""

    def __init__(
        self,
        instances: Sequence[Instance],
        image_root: str,
        input_size: Sequence[int],
        train: bool,
        aug: AugmentConfig | None = None,
        seed: int = 0,
        heatmap_size: Sequence[int] | None = None,
        sigma: float = 2.0,
        skip_bad_images: bool = False,
    ) -> None:
        self.instances = list(instances)
        self.image_root = str(image_root)
        self.spec = SampleSpec(
            input_size=(int(input_size[0]), int(input_size[1])),
            heatmap_size=None if heatmap_size is None else (int(heatmap_size[0]), int(heatmap_size[1])),
            sigma=float(sigma),
        )
        self.train = bool(train)
        self.aug = aug or AugmentConfig()
        self.seed = int(seed)
        self.skip_bad_images = skip_bad_images
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.instances)

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation draws of `epoch`. DataLoader workers copy the dataset when
        an iterator is created, so call this before iterating the loader for that epoch."""
        self.epoch = int(epoch)

    def view(self, index: int) -> ViewParams:
        """The crop sample `index` uses in the current epoch."""
        instance = self.instances[index]
        if not self.train:
            return identity_view(instance)
        rng = np.random.default_rng([self.seed, self.epoch, index])
        return draw_view(instance, rng, self.aug, self.spec.input_size)

    def __getitem__(self, index: int) -> dict:
        instance = self.instances[index]
        view = self.view(index)
        try:
            image = read_image(self.image_root, instance.image_file)
            sample, valid = build_sample(image, instance, view, self.spec), True
        except ImageError:
            if not self.skip_bad_images:
                raise
            sample, valid = blank_sample(instance, view, self.spec), False
        sample.update(
            image_id=int(instance.image_id),
            instance_id=int(instance.instance_id),
            box_score=float(instance.box_score),
            area=float(instance.area),
            valid=valid,
        )
        return sample
