"""Label-side flip: the mirrored crop's targets follow the geometry exactly (heatmaps, joints),
token losses are masked, and the loader applies it per (seed, epoch, instance)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from cache_rows import SMALL_SPEC, base_manifest, teacher_like_rows

from distilpose.heatmaps import decode_heatmaps, render_gaussian_heatmaps
from distilpose.keypoints import flip_permutation
from distilpose.label_flip import flip_heatmaps, flip_joints, label_flips
from distilpose.losses import TOKEN_WEIGHT, DistillLoss, loss_kt
from pipeline.cache import open_reader, open_writer
from pipeline.cache.encodings import encode_crop_jpeg
from pipeline.cache.schema import CROP_FIELD
from pipeline.cache_loader import CachedViewStream

INPUT_W, HEATMAP = 192, (64, 48)  # the paper's 256x192 crop, stride 4


def _joints(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.uniform([12, 12], [INPUT_W - 13, 243], size=(n, 17, 2)).astype(np.float32)


def test_flipping_twice_is_the_identity() -> None:
    joints, weights = _joints(3), (np.random.default_rng(1).random((3, 17)) > 0.3).astype(np.float32)
    again = flip_joints(*flip_joints(joints, weights, INPUT_W), INPUT_W)
    np.testing.assert_allclose(again[0], joints, atol=1e-4)
    np.testing.assert_array_equal(again[1], weights)
    mirrored, _ = flip_joints(joints, weights, INPUT_W)
    np.testing.assert_allclose(mirrored[:, flip_permutation(17), 0], INPUT_W - 1 - joints[..., 0])


def test_flipped_heatmaps_are_the_heatmaps_of_the_flipped_joints() -> None:
    """Render Gaussians at crop joints, flip the maps; render at the flipped joints: the same
    maps (up to the sub-pixel interpolation) and the same decoded joints."""
    joints = _joints(4)
    stride = INPUT_W / HEATMAP[1]
    original = render_gaussian_heatmaps(torch.from_numpy(joints / stride), HEATMAP).numpy()
    mirrored, _ = flip_joints(joints, np.ones((4, 17), np.float32), INPUT_W)
    expected = render_gaussian_heatmaps(torch.from_numpy(mirrored / stride), HEATMAP).numpy()
    flipped = flip_heatmaps(original, INPUT_W)
    error = np.abs(flipped - expected)
    assert error[..., 1:].max() < 0.03  # linear interpolation of a unit-peak sigma-2 blob
    assert error[..., 0].max() < 0.1  # the left column, extrapolated from beyond the map
    found, _ = decode_heatmaps(torch.from_numpy(flipped))
    want, _ = decode_heatmaps(torch.from_numpy(expected))
    assert (found - want).abs().max() < 0.05  # heatmap px: 0.2 crop px
    # A whole-pixel shift (mmpose's flip test) would be 0.25 heatmap px off.
    assert flipped.dtype == original.dtype


def test_masked_token_samples_do_not_count() -> None:
    student, teacher = torch.zeros(4, 17, 8), torch.ones(4, 17, 8)
    assert loss_kt(student, teacher).item() == pytest.approx(1.0)
    assert loss_kt(student, teacher, torch.tensor([1.0, 0.0, 1.0, 0.0])).item() == pytest.approx(0.5)

    class Out:
        coords, sigma, score = torch.full((4, 17, 2), 0.5), torch.ones(4, 17, 2), torch.zeros(4, 17)
        kpt_tokens, vis_tokens = student, torch.zeros(4, 12, 8)

    loss = DistillLoss(alpha_kt=1.0, alpha_vt=0.0, alpha_sh=0.0, alpha_cs=0.0)
    target, weight = torch.full((4, 17, 2), 0.5), torch.ones(4, 17)
    _, terms = loss(Out(), target, weight, {"kpt_tokens": teacher, TOKEN_WEIGHT: torch.zeros(4)})
    assert terms["kt"].item() == 0.0


def test_label_flips_are_seeded_per_epoch_and_instance() -> None:
    ids = np.arange(2000)
    flips = label_flips(3, 0, ids)
    assert abs(flips.mean() - 0.5) < 0.05
    np.testing.assert_array_equal(flips, label_flips(3, 0, ids))
    assert (flips != label_flips(3, 1, ids)).mean() > 0.4  # another epoch, other coins
    np.testing.assert_array_equal(label_flips(3, 0, ids[::-1]), flips[::-1])  # order does not matter


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> str:
    uri = str(tmp_path_factory.mktemp("flip-cache") / "cache")
    writer = open_writer(uri, SMALL_SPEC, "zarr")
    rng = np.random.default_rng(0)
    for shard in range(2):
        rows = teacher_like_rows(SMALL_SPEC, 16, seed=shard, first_instance=16 * shard, views=1)
        rows[CROP_FIELD] = [encode_crop_jpeg(rng.integers(0, 255, (64, 48, 3), dtype=np.uint8)) for _ in range(16)]
        writer.write_shard(shard, rows)
    writer.finalize(base_manifest(1), expected_shards=2)
    return uri


def test_the_loader_mirrors_the_chosen_samples_and_their_targets(cache) -> None:
    fields = ("heatmaps", "kpt_tokens")

    def batches(label_flip: bool):
        stream = CachedViewStream(
            open_reader(cache), None, None, (64, 48), fields, 0, 1, batch_size=8, seed=5, label_flip=label_flip
        )
        return list(stream.epoch(2))

    for plain, flipped in zip(batches(False), batches(True)):
        ids = plain["instance_id"].numpy()
        assert (ids == flipped["instance_id"].numpy()).all()  # the same order, with or without flips
        mask = label_flips(5, 2, ids)
        assert 0 < mask.sum() < len(mask)
        np.testing.assert_array_equal(flipped[TOKEN_WEIGHT].numpy(), (~mask).astype(np.float32))
        np.testing.assert_array_equal(flipped["image"][mask].numpy(), plain["image"][mask].flip(-1).numpy())
        np.testing.assert_array_equal(flipped["image"][~mask].numpy(), plain["image"][~mask].numpy())
        hm = plain["heatmaps"][mask].numpy()
        np.testing.assert_allclose(flipped["heatmaps"][mask].numpy(), flip_heatmaps(hm, 48), atol=1e-6)
        joints, weights = flip_joints(
            plain["target"][mask].numpy() * [48, 64], plain["target_weight"][mask].numpy(), 48
        )
        np.testing.assert_allclose(flipped["target"][mask].numpy(), joints / [48, 64], atol=1e-6)
        np.testing.assert_array_equal(flipped["target_weight"][mask].numpy(), weights)
        torch.testing.assert_close(flipped["kpt_tokens"], plain["kpt_tokens"])  # masked, not moved
