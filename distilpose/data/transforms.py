"""Crop views of a person instance: random view parameters, the affine warp, flips.

A view is fully described by `ViewParams`; everything random is drawn once into it
(`draw_view`), and `apply_view` is a pure function of (image, joints, view). The teacher
cache stores `view.to_array()`, and the student loader rebuilds the identical crop from it,
so the values a view holds are rounded to float32 when it is made: what is stored is
exactly what is applied.

Geometry follows mmpose v0.22 (docs/method.md#conventions and #student-recipe): pixel centres at integer
coordinates, `get_affine_transform` (rotation about the box centre, uniform scale
box width -> crop width), bilinear warp with black fill (OpenCV `warpAffine`, as mmpose:
`distilpose.data.fast_crop`). One deliberate difference: a
flipped view is the unflipped crop mirrored with x' = W - 1 - x (and left/right joints
swapped), instead of mirroring the whole image before cropping; this keeps the flip
exactly invertible in crop pixels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from distilpose.data.coco import Instance
from distilpose.data.fast_crop import warp_affine
from distilpose.keypoints import UPPER_BODY_JOINTS, flip_permutation

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF_BODY_PADDING = 1.5
HALF_BODY_NONE, HALF_BODY_UPPER, HALF_BODY_LOWER = 0, 1, 2


def _f32(value: float) -> float:
    return float(np.float32(value))


@dataclass(frozen=True)
class ViewParams:
    """One crop of an instance: centre (x, y) and size (w, h) in image px, rotation in
    degrees (mmpose sign), horizontal flip, half-body choice (0 none, 1 upper, 2 lower)."""

    center: tuple[float, float]
    scale: tuple[float, float]
    rotation: float = 0.0
    flip: bool = False
    half_body: int = HALF_BODY_NONE

    def __post_init__(self) -> None:
        # Round to float32 so that to_array()/from_array() reproduce the exact same view.
        object.__setattr__(self, "center", (_f32(self.center[0]), _f32(self.center[1])))
        object.__setattr__(self, "scale", (_f32(self.scale[0]), _f32(self.scale[1])))
        object.__setattr__(self, "rotation", _f32(self.rotation))
        object.__setattr__(self, "flip", bool(self.flip))
        object.__setattr__(self, "half_body", int(self.half_body))
        if self.half_body not in (HALF_BODY_NONE, HALF_BODY_UPPER, HALF_BODY_LOWER):
            raise ValueError(f"half_body must be 0, 1 or 2, got {self.half_body}")
        if not (self.scale[0] > 0 and self.scale[1] > 0):
            raise ValueError(f"view scale must be positive, got {self.scale}")

    def to_array(self) -> np.ndarray:
        """float32 (7,): cx, cy, w, h, rotation, flip, half_body."""
        return np.array(
            [*self.center, *self.scale, self.rotation, float(self.flip), float(self.half_body)],
            dtype=np.float32,
        )

    @classmethod
    def from_array(cls, a: np.ndarray) -> ViewParams:
        a = np.asarray(a, dtype=np.float32).reshape(7)
        return cls(
            center=(float(a[0]), float(a[1])),
            scale=(float(a[2]), float(a[3])),
            rotation=float(a[4]),
            flip=bool(a[5] > 0.5),
            half_body=int(round(float(a[6]))),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "center": list(self.center),
            "scale": list(self.scale),
            "rotation": self.rotation,
            "flip": self.flip,
            "half_body": self.half_body,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ViewParams:
        return cls(tuple(d["center"]), tuple(d["scale"]), d["rotation"], d["flip"], d["half_body"])


@dataclass(frozen=True)
class AugmentConfig:
    """Training augmentation of the student recipe (docs/method.md#student-recipe)."""

    flip_prob: float = 0.5
    half_body_prob: float = 0.3
    half_body_min_joints: int = 8  # half-body only when MORE than this many joints are labelled
    scale_factor: float = 0.35
    rot_factor: float = 45.0
    rot_prob: float = 0.6


def identity_view(instance: Instance) -> ViewParams:
    """The un-augmented view (view 0 of the cache; the only view at test time)."""
    return ViewParams(center=tuple(instance.center), scale=tuple(instance.scale))


def half_body_box(
    joints: np.ndarray, rng: np.random.Generator, input_size: tuple[int, int]
) -> tuple[int, np.ndarray, np.ndarray] | None:
    """mmpose HalfBody choice: (1 upper | 2 lower, centre, (w, h)) or None if too few joints.

    Upper body is picked when randn() < 0.5 and it has > 2 labelled joints, else the lower
    body if it has > 2, else the upper body; the box is the joints' extent fitted to the
    input aspect and padded by 1.5; the centre is the joints' mean.
    """
    labelled = joints[:, 2] > 0
    upper_mask = np.array([k in UPPER_BODY_JOINTS for k in range(len(joints))])
    upper = joints[labelled & upper_mask, :2]
    lower = joints[labelled & ~upper_mask, :2]
    if rng.standard_normal() < 0.5 and len(upper) > 2:
        part, selected = HALF_BODY_UPPER, upper
    elif len(lower) > 2:
        part, selected = HALF_BODY_LOWER, lower
    else:
        part, selected = HALF_BODY_UPPER, upper
    if len(selected) < 2:
        return None
    selected = selected.astype(np.float32)
    center = selected.mean(axis=0)
    w, h = (selected.max(axis=0) - selected.min(axis=0)).astype(np.float64)
    aspect = input_size[1] / input_size[0]
    if w > aspect * h:
        h = w / aspect
    elif w < aspect * h:
        w = h * aspect
    if w <= 0:
        return None  # all selected joints on one point: no box to crop
    return part, center, np.array([w, h]) * HALF_BODY_PADDING


def draw_view(
    instance: Instance,
    rng: np.random.Generator,
    aug: AugmentConfig | None = None,
    input_size: tuple[int, int] = (256, 192),
) -> ViewParams:
    """Draw one training view; the draws follow the mmpose pipeline order:
    flip -> half-body -> scale -> rotation."""
    aug = aug or AugmentConfig()
    flip = rng.random() <= aug.flip_prob
    center = np.asarray(instance.center, dtype=np.float64)
    scale = np.asarray(instance.scale, dtype=np.float64)
    half_body = HALF_BODY_NONE
    labelled = int((instance.joints[:, 2] > 0).sum())
    if labelled > aug.half_body_min_joints and rng.random() < aug.half_body_prob:
        picked = half_body_box(instance.joints, rng, input_size)
        if picked is not None:
            half_body, center, scale = picked
    s = aug.scale_factor
    scale = scale * np.clip(rng.standard_normal() * s + 1.0, 1.0 - s, 1.0 + s)
    rotation = 0.0
    if rng.random() <= aug.rot_prob:
        r = aug.rot_factor
        rotation = float(np.clip(rng.standard_normal() * r, -2.0 * r, 2.0 * r))
    return ViewParams(tuple(center), tuple(scale), rotation, flip, half_body)


def _unflipped_affine(view: ViewParams, input_size: tuple[int, int]) -> np.ndarray:
    """float64 (2,3) image px -> crop px without the mirror (mmpose get_affine_transform).

    mmpose builds it from three point pairs; that construction is a similarity, so the
    closed form is crop = s * R(-rot) (p - c) + (W/2, H/2) with s = W / box_w.
    """
    out_h, out_w = input_size
    s = out_w / view.scale[0]
    theta = np.deg2rad(view.rotation)
    cos, sin = np.cos(theta) * s, np.sin(theta) * s
    cx, cy = view.center
    return np.array(
        [
            [cos, sin, out_w * 0.5 - cos * cx - sin * cy],
            [-sin, cos, out_h * 0.5 + sin * cx - cos * cy],
        ]
    )


def _mirror(m: np.ndarray, out_w: int) -> np.ndarray:
    """Compose x' = W - 1 - x after an affine map."""
    mirrored = m.copy()
    mirrored[0] = -m[0]
    mirrored[0, 2] += out_w - 1
    return mirrored


def affine_matrix(view: ViewParams, input_size: tuple[int, int]) -> np.ndarray:
    """float32 (2,3) mapping image px -> crop px of `apply_view`'s crop, mirror included
    when `view.flip` (joint indices are swapped separately, see `distilpose.keypoints.flip_permutation`)."""
    m = _unflipped_affine(view, input_size)
    if view.flip:
        m = _mirror(m, input_size[1])
    return m.astype(np.float32)


def invert_affine(m: np.ndarray) -> np.ndarray:
    """Inverse of a (2,3) affine map, float64."""
    full = np.vstack([np.asarray(m, dtype=np.float64), [0.0, 0.0, 1.0]])
    return np.linalg.inv(full)[:2]


def warp_image(image: np.ndarray, view: ViewParams, input_size: tuple[int, int]) -> np.ndarray:
    """Bilinear crop (H, W, C) uint8 of `image`, unflipped; outside the image is black."""
    return warp_affine(image, invert_affine(_unflipped_affine(view, input_size)), input_size)


def transform_joints(joints: np.ndarray, view: ViewParams, input_size: tuple[int, int]) -> np.ndarray:
    """(K,3) image px + visibility -> (K,3) crop px + weight, flipped and swapped as the crop.

    Weight is 1 for a labelled joint inside [0, W-1] x [0, H-1] of the crop, else 0;
    unlabelled joints get coordinates 0.
    """
    out_h, out_w = input_size
    m = affine_matrix(view, input_size).astype(np.float64)
    labelled = joints[:, 2] > 0
    xy = joints[:, :2].astype(np.float64) @ m[:, :2].T + m[:, 2]
    xy[~labelled] = 0.0
    inside = (xy[:, 0] >= 0) & (xy[:, 0] <= out_w - 1) & (xy[:, 1] >= 0) & (xy[:, 1] <= out_h - 1)
    out = np.zeros((len(joints), 3), dtype=np.float32)
    out[:, :2] = xy
    out[:, 2] = labelled & inside
    if view.flip:
        out = out[flip_permutation(len(joints))]
    return out


def apply_view(
    image: np.ndarray, joints: np.ndarray, view: ViewParams, input_size: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Crop (H, W, 3) uint8 and joints (K, 3): x, y crop px + weight 0/1 for one view."""
    crop = warp_image(image, view, input_size)
    if view.flip:
        crop = crop[:, ::-1]
    return np.ascontiguousarray(crop), transform_joints(joints, view, input_size)


def crop_of_view(image: np.ndarray, view_params: np.ndarray, input_size: tuple[int, int]) -> np.ndarray:
    """The crop (H, W, 3) uint8 of a cached view, rebuilt from its source image and the
    stored view parameters (`ViewParams.to_array`): the pixels the teacher saw."""
    crop, _ = apply_view(image, np.zeros((0, 3), np.float32), ViewParams.from_array(view_params), input_size)
    return crop


def normalize(crop: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) -> float32 (3, H, W) scaled to [0, 1] and ImageNet-normalized."""
    return normalize_batch(np.asarray(crop)[None])[0]


def normalize_batch(crops: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float32 (N, 3, H, W); same arithmetic as `normalize`."""
    return normalize_images(channels_first(crops))


def channels_first(crops: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> a contiguous uint8 (N, 3, H, W) tensor: what a loader hands over
    when the images are normalized on the device (`normalize_images`), 4x fewer bytes."""
    crops = np.ascontiguousarray(crops)
    if not crops.flags.writeable:  # torch.from_numpy warns on read-only memory
        crops = crops.copy()
    return torch.from_numpy(crops).permute(0, 3, 1, 2).contiguous()


def normalize_images(x: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, H, W) on any device -> float32 ((x / 255) - mean) / std there.

    In place on one float32 buffer, on contiguous channels-first memory: 2.3x less CPU than
    the same arithmetic on the permuted (channels-last) view, with the same float32 results."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    return x.to(torch.float32).div_(255.0).sub_(mean).div_(std)
