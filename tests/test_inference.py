"""distilpose.inference.predict with small real torch modules (student and heatmap teacher)."""

from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from distilpose.coco_metrics import crop_to_image, heatmap_to_crop, normalized_to_crop
from distilpose.inference import flip_heatmaps_back, predict

H, W = 16, 12
PAIRS = [(1, 2)]  # joint 0 is central; joints 1 (left half) and 2 (right half) swap under a flip


@dataclass
class CoordsOutput:
    coords: torch.Tensor
    score: torch.Tensor


@dataclass
class HeatmapOutput:
    heatmaps: torch.Tensor


def half_masks(x: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) -> (N, 3, H, W) maps: whole image, left half only, right half only (channel 0)."""
    mass = x[:, 0].clamp(min=0)
    left = torch.zeros(x.shape[-1], dtype=x.dtype)
    left[: x.shape[-1] // 2] = 1.0
    return torch.stack([mass, mass * left, mass * (1 - left)], dim=1)


class CentroidStudent(nn.Module):
    """Joint k = intensity centroid of map k, pixel centres at integer indices; score = its mass share.

    Mirroring the input mirrors each centroid exactly (x -> W - 1 - x) and exchanges joints 1 and 2.
    """

    def __init__(self):
        super().__init__()
        self.gain = nn.Parameter(torch.ones(()))
        self.config = SimpleNamespace(input_size=(H, W), num_joints=3)

    def forward(self, x):
        maps = half_masks(x) * self.gain
        total = maps.sum(dim=(2, 3))
        cx = (maps.sum(dim=2) * torch.arange(x.shape[-1], dtype=x.dtype)).sum(-1) / total
        cy = (maps.sum(dim=3) * torch.arange(x.shape[-2], dtype=x.dtype)).sum(-1) / total
        coords = torch.stack([cx / x.shape[-1], cy / x.shape[-2]], dim=-1)
        return CoordsOutput(coords=coords, score=total / total[:, :1])


class PooledTeacher(nn.Module):
    """Heatmaps = the three maps average-pooled by 2 (exactly flip-equivariant for even widths)."""

    def __init__(self):
        super().__init__()
        self.pool = nn.AvgPool2d(2)

    def forward(self, x):
        return HeatmapOutput(heatmaps=self.pool(half_masks(x)))


def make_samples(n=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    samples = []
    for i in range(n):
        image = torch.rand(3, H, W, generator=gen) * 0.2
        r, c = torch.randint(0, H - 3, (1,), generator=gen).item(), torch.randint(0, W - 3, (1,), generator=gen).item()
        image[0, r : r + 3, c : c + 2] += 2.0  # an off-centre blob so the halves differ
        zoom = 0.5 + 0.25 * i  # image px -> crop px
        affine = np.array([[zoom, 0.0, -10.0 - i], [0.0, zoom, -20.0]], dtype=np.float32)
        samples.append({"image": image, "affine": affine, "image_id": 100 + i // 2, "box_score": 0.9})
    return samples


def as_batch(samples):
    """Hand-collated batch with numpy/list fields (predict also takes DataLoader tensors)."""
    return {
        "image": torch.stack([s["image"] for s in samples]),
        "affine": np.stack([s["affine"] for s in samples]),
        "image_id": [s["image_id"] for s in samples],
        "box_score": [s["box_score"] for s in samples],
    }


def test_student_flip_test_exact_and_official():
    model = CentroidStudent().train()
    samples = make_samples()
    loader = DataLoader(samples, batch_size=2)

    plain = predict(model, loader, flip_test=False, flip_pairs=PAIRS)
    exact = predict(model, loader, flip_test=True, flip_mode="exact", flip_pairs=PAIRS)
    official = predict(model, loader, flip_test=True, flip_mode="official", flip_pairs=PAIRS)
    assert model.training  # predict restores the mode it found

    images = torch.stack([s["image"] for s in samples])
    affines = np.stack([s["affine"] for s in samples])
    with torch.no_grad():
        direct = model(images)
    expected = crop_to_image(normalized_to_crop(direct.coords.numpy(), (H, W)), affines)
    np.testing.assert_allclose(plain["coords_img"], expected, atol=1e-4)
    np.testing.assert_array_equal(plain["image_ids"], [100, 100, 101, 101, 102])
    # The OKS-NMS area is the crop box in image px: (W / zoom) x (H / zoom).
    np.testing.assert_allclose(plain["areas"], [H * W / (0.5 + 0.25 * i) ** 2 for i in range(5)], rtol=1e-6)
    np.testing.assert_allclose(plain["box_scores"], 0.9)

    # An exactly flip-equivariant model: exact flip-back reproduces the unflipped pass.
    np.testing.assert_allclose(exact["coords_img"], plain["coords_img"], atol=1e-4)
    np.testing.assert_allclose(exact["joint_scores"], plain["joint_scores"], atol=1e-6)
    # Official: x' = 1 - x puts the flipped pass one crop px right (half a px after averaging,
    # 0.5 / zoom image px), and unswapped scores mix left and right.
    shift = np.broadcast_to(0.5 / (0.5 + 0.25 * np.arange(5))[:, None], (5, 3))
    np.testing.assert_allclose(official["coords_img"][..., 0] - plain["coords_img"][..., 0], shift, atol=1e-4)
    np.testing.assert_allclose(official["coords_img"][..., 1], plain["coords_img"][..., 1], atol=1e-4)
    np.testing.assert_allclose(official["joint_scores"][:, 1:], 0.5, atol=1e-6)
    assert not np.allclose(plain["joint_scores"][:, 1:], 0.5)


def test_predict_rejects_wrong_input_size_and_unknown_outputs():
    batch = as_batch(make_samples(n=1))
    with pytest.raises(ValueError, match=r"\(16, 12\)"):
        predict(CentroidStudent(), [batch], input_size=(32, 24))

    class Nothing(nn.Module):
        def forward(self, x):
            return SimpleNamespace(tokens=x)

    with pytest.raises(TypeError, match="neither"):
        predict(Nothing(), [batch], flip_test=False)


def test_flip_heatmaps_back_mirrors_swaps_and_shifts_one_column():
    teacher = PooledTeacher()
    images = torch.stack([s["image"] for s in make_samples(n=3)])
    heatmaps = teacher(images).heatmaps
    back = flip_heatmaps_back(teacher(torch.flip(images, dims=[3])).heatmaps, PAIRS)
    torch.testing.assert_close(back[..., 1:], heatmaps[..., :-1])
    torch.testing.assert_close(back[..., 0], heatmaps[..., 0])


def test_teacher_predict_decodes_averaged_heatmaps():
    heatmaps_module = pytest.importorskip("distilpose.heatmaps")
    teacher = PooledTeacher()
    batch = as_batch(make_samples(n=3))
    images, affines = batch["image"], batch["affine"]
    out = predict(teacher, [batch], flip_pairs=PAIRS)
    heatmaps = teacher(images).heatmaps
    averaged = (heatmaps + flip_heatmaps_back(teacher(torch.flip(images, dims=[3])).heatmaps, PAIRS)) / 2
    coords_hm, maxvals = heatmaps_module.decode_heatmaps(averaged)
    expected = crop_to_image(heatmap_to_crop(np.asarray(coords_hm), (H // 2, W // 2), (H, W)), affines)
    np.testing.assert_allclose(out["coords_img"], expected, atol=1e-4)
    np.testing.assert_allclose(out["joint_scores"], np.asarray(maxvals), atol=1e-6)
