"""Crop views: the affine (cross-checked with mmpose), warps, flips, seeded augmentation
draws and their round trip through the cached float32 parameters."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_data import INPUT, full_joints, make_instance, noise_image

from distilpose.data.transforms import (
    AugmentConfig,
    ViewParams,
    affine_matrix,
    apply_view,
    draw_view,
    identity_view,
    normalize,
    normalize_batch,
)
from distilpose.keypoints import FLIP_PAIRS

# ----------------------------------------------------------------------------- views


def _mmpose_affine(center, box, rot, out_wh) -> np.ndarray:
    """Three-point construction of mmpose get_affine_transform (for cross-checking)."""
    src_w, (dst_w, dst_h) = box[0], out_wh
    r = np.deg2rad(rot)

    def rotate(p):
        return np.array([p[0] * np.cos(r) - p[1] * np.sin(r), p[0] * np.sin(r) + p[1] * np.cos(r)])

    def third(a, b):
        d = a - b
        return b + np.array([-d[1], d[0]])

    src, dst = np.zeros((3, 2)), np.zeros((3, 2))
    src[0], dst[0] = center, [dst_w * 0.5, dst_h * 0.5]
    src[1], dst[1] = src[0] + rotate([0.0, -src_w * 0.5]), dst[0] + [0.0, -dst_w * 0.5]
    src[2], dst[2] = third(src[0], src[1]), third(dst[0], dst[1])
    return np.linalg.solve(np.hstack([src, np.ones((3, 1))]), dst).T


def test_affine_matrix_matches_mmpose_construction():
    rng = np.random.default_rng(0)
    for _ in range(5):
        view = ViewParams(tuple(rng.uniform(0, 300, 2)), (90.0, 120.0), float(rng.uniform(-90, 90)))
        expected = _mmpose_affine(np.array(view.center), view.scale, view.rotation, (192, 256))
        np.testing.assert_allclose(affine_matrix(view, INPUT), expected, rtol=1e-5, atol=1e-3)


def test_warp_samples_at_integer_pixel_centres():
    """A crop of a coordinate ramp returns the image coordinates affine_matrix predicts."""
    ys, xs = np.mgrid[0:200, 0:250]
    image = np.dstack([xs, ys, np.zeros_like(xs)]).clip(0, 255).astype(np.uint8)
    view = ViewParams((120.3, 95.7), (60.0, 80.0), 20.0)
    crop, _ = apply_view(image, np.zeros((17, 3)), view, (64, 48))
    inv = np.linalg.inv(np.vstack([affine_matrix(view, (64, 48)), [0, 0, 1]]))[:2]
    cy, cx = np.mgrid[0:64, 0:48]
    expect_x = inv[0, 0] * cx + inv[0, 1] * cy + inv[0, 2]
    expect_y = inv[1, 0] * cx + inv[1, 1] * cy + inv[1, 2]
    assert np.abs(crop[..., 0] - expect_x).max() <= 1.0
    assert np.abs(crop[..., 1] - expect_y).max() <= 1.0


def test_joints_follow_the_pixels():
    """A bright dot drawn at a joint ends up where apply_view says the joint is."""
    image = np.zeros((100, 120, 3), np.uint8)
    joints = np.zeros((17, 3), np.float32)
    joints[5] = [70, 40, 1]  # left shoulder
    image[38:43, 68:73] = 255
    for flip in (False, True):
        view = ViewParams((60.0, 50.0), (60.0, 80.0), 30.0, flip)
        crop, jc = apply_view(image, joints, view, INPUT)
        k = 6 if flip else 5  # flipped: the left shoulder is now labelled as the right one
        assert jc[k, 2] == 1 and jc[11 - k, 2] == 0
        ys, xs = np.nonzero(crop[..., 0] > 128)
        assert abs(xs.mean() - jc[k, 0]) < 1.0 and abs(ys.mean() - jc[k, 1]) < 1.0


def test_flip_twice_is_identity_and_swaps_left_right():
    image, joints = noise_image(), full_joints()
    view = ViewParams((60.0, 50.0), (60.0, 80.0), 12.5)
    flipped = ViewParams(view.center, view.scale, view.rotation, flip=True)
    crop, jc = apply_view(image, joints, view, INPUT)
    crop_f, jc_f = apply_view(image, joints, flipped, INPUT)
    np.testing.assert_array_equal(crop_f[:, ::-1], crop)
    back = jc_f.copy()
    back[:, 0] = INPUT[1] - 1 - back[:, 0]
    for a, b in FLIP_PAIRS:
        back[[a, b]] = back[[b, a]]
    np.testing.assert_allclose(back, jc, atol=1e-4)
    for left, right in FLIP_PAIRS:  # left joint k appears, mirrored, at its right partner's index
        assert jc_f[right, 0] == pytest.approx(INPUT[1] - 1 - jc[left, 0], abs=1e-4)
    np.testing.assert_allclose(jc_f[0, 0], INPUT[1] - 1 - jc[0, 0], atol=1e-4)  # nose stays
    m, m_f = affine_matrix(view, INPUT), affine_matrix(flipped, INPUT)
    np.testing.assert_allclose(m_f[0], [-m[0, 0], -m[0, 1], INPUT[1] - 1 - m[0, 2]], rtol=1e-6, atol=1e-4)


def test_joint_weights_zero_for_unlabelled_and_outside():
    joints = full_joints()
    joints[3, 2] = 0
    joints[4, :2] = [-500, 50]
    _, jc = apply_view(noise_image(), joints, ViewParams((60.0, 50.0), (60.0, 80.0)), INPUT)
    assert jc[3, 2] == 0 and jc[4, 2] == 0 and jc[[0, 1, 2, 5], 2].all()
    assert jc[3, 0] == 0 and jc[3, 1] == 0
    inside = (jc[:, 0] >= 0) & (jc[:, 0] <= 191) & (jc[:, 1] >= 0) & (jc[:, 1] <= 255)
    np.testing.assert_array_equal(jc[:, 2] > 0, inside & (joints[:, 2] > 0))


def test_view_roundtrip_through_float32_array_is_exact():
    inst = make_instance(full_joints(), center=(60.123456789, 50.987654321), scale=(61.1, 81.3))
    image = noise_image()
    rng = np.random.default_rng(5)
    for _ in range(10):
        view = draw_view(inst, rng, AugmentConfig())
        arr = view.to_array()
        assert arr.dtype == np.float32 and arr.shape == (7,)
        again = ViewParams.from_array(arr)
        assert again == view and ViewParams.from_dict(view.to_dict()) == view
        a_crop, a_j = apply_view(image, inst.joints, view, INPUT)
        b_crop, b_j = apply_view(image, inst.joints, again, INPUT)
        np.testing.assert_array_equal(a_crop, b_crop)
        np.testing.assert_array_equal(a_j, b_j)
        np.testing.assert_array_equal(affine_matrix(view, INPUT), affine_matrix(again, INPUT))
    # Values that float32 cannot hold are rounded at construction: stored == applied.
    view = ViewParams((0.1, 0.2), (1e-1 + 50, 70.0), 0.3)
    assert view.center[0] == float(np.float32(0.1))


def test_draw_then_apply_is_deterministic():
    inst = make_instance(full_joints())
    image = noise_image()
    views = [draw_view(inst, np.random.default_rng([7, 1, v]), AugmentConfig()) for v in range(4)]
    again = [draw_view(inst, np.random.default_rng([7, 1, v]), AugmentConfig()) for v in range(4)]
    assert views == again
    for view in views:
        a = normalize(apply_view(image, inst.joints, view, INPUT)[0])
        b = normalize(apply_view(image, inst.joints, view, INPUT)[0])
        assert torch.equal(a, b)


def test_draw_view_distribution_matches_config():
    inst = make_instance(full_joints())
    rng = np.random.default_rng(0)
    views = [draw_view(inst, rng, AugmentConfig(half_body_prob=0.0)) for _ in range(2000)]
    ratio = np.array([v.scale[0] / inst.scale[0] for v in views])
    rot = np.array([v.rotation for v in views])
    assert ratio.min() >= 0.65 - 1e-6 and ratio.max() <= 1.35 + 1e-6
    assert np.abs(rot).max() <= 90 and 0.55 < (rot != 0).mean() < 0.65
    assert 0.45 < np.mean([v.flip for v in views]) < 0.55
    assert all(v.half_body == 0 and v.center == views[0].center for v in views)
    assert identity_view(inst) == ViewParams(tuple(inst.center), tuple(inst.scale))


def test_half_body_view():
    joints = full_joints()
    inst = make_instance(joints)
    aug = AugmentConfig(flip_prob=0.0, half_body_prob=1.0, scale_factor=0.0, rot_prob=0.0)
    parts = set()
    for seed in range(20):
        view = draw_view(inst, np.random.default_rng(seed), aug)
        parts.add(view.half_body)
        selected = joints[:11] if view.half_body == 1 else joints[11:]
        np.testing.assert_allclose(view.center, selected[:, :2].mean(axis=0), rtol=1e-5)
        w, h = np.ptp(selected[:, :2], axis=0)
        assert view.scale[0] / view.scale[1] == pytest.approx(0.75, rel=1e-5)
        assert view.scale[0] >= 1.5 * w - 1e-3 and view.scale[1] >= 1.5 * h - 1e-3
    assert parts == {1, 2}
    few = joints.copy()
    few[8:, 2] = 0  # 8 labelled joints: half-body needs more than 8
    views = [draw_view(make_instance(few), np.random.default_rng(s), aug) for s in range(10)]
    assert all(v.half_body == 0 for v in views)


def test_normalize():
    crop = np.zeros((4, 3, 3), np.uint8)
    crop[..., 0] = 255
    x = normalize(crop)
    assert x.shape == (3, 4, 3) and x.dtype == torch.float32
    assert x[0, 0, 0].item() == pytest.approx((1 - 0.485) / 0.229, rel=1e-6)
    assert x[1, 0, 0].item() == pytest.approx(-0.456 / 0.224, rel=1e-6)
    batch = normalize_batch(np.stack([crop, crop[::-1]]))
    assert batch.shape == (2, 3, 4, 3) and torch.equal(batch[0], x)


def test_apply_view_accepts_no_joints():
    crop, jc = apply_view(
        noise_image(), np.zeros((0, 3), np.float32), ViewParams((60.0, 50.0), (60.0, 80.0), 0, True), INPUT
    )
    assert crop.shape == (256, 192, 3) and jc.shape == (0, 3)
