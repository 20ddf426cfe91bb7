"""Label-side flip: mirror a cached view and the teacher's targets with it, at load time.

A cache replays V fixed views; a long schedule replays each of them epochs / V times. Flipping
a cached crop horizontally doubles the distinct crops without running the teacher again, as
long as the targets follow the crop exactly where geometry dictates:

- joints (crop px): x' = W - 1 - x, then every left joint swaps with its right partner;
- heatmaps (K x Hh x Wh): the crop -> heatmap map is x_hm = x * Wh / W (no half-pixel
  offset), so the mirrored crop's heatmap at x_hm' holds the original at
  Wh - Wh / W - x_hm': the mirrored array, shifted right by 1 - Wh / W px (0.75 px at stride
  4), then the joints swapped. mmpose's flip test shifts by a whole pixel instead; here the
  shift is linear interpolation, so a blob's decoded centre lands within a few hundredths of a
  heatmap pixel of the exact mirror (tested);
- keypoint and visual tokens do not follow: a token is not a picture of the crop, and the
  teacher's token for a mirrored crop is not a permutation of the original tokens. Their
  losses (L_KT, L_VT) are masked for a flipped sample (``token_weight`` 0).

What is not geometry - the teacher's own left/right asymmetries - is the warp's error; it is
measured against the teacher run on the mirrored crop (`bench/study_label_flip.py`).
"""

from __future__ import annotations

import numpy as np

from distilpose.keypoints import flip_permutation

LABEL_FLIP_TAG = 0x6C666C70  # "lflp": keeps these coin flips apart from every other seeded draw


def label_flips(seed: int, epoch: int, instance_ids: np.ndarray, prob: float = 0.5) -> np.ndarray:
    """(N,) bool: which samples are mirrored this epoch; a function of (seed, epoch, id) only,
    so a resumed run and any worker count draw the same."""
    return np.array(
        [np.random.default_rng([LABEL_FLIP_TAG, seed, epoch, int(i)]).random() < prob for i in instance_ids],
        dtype=bool,
    )


def flip_joints(joints: np.ndarray, weights: np.ndarray, input_width: int) -> tuple[np.ndarray, np.ndarray]:
    """Crop-px joints (..., K, 2) and weights (..., K) of the mirrored crop."""
    perm = flip_permutation(joints.shape[-2])
    mirrored = joints.copy()
    mirrored[..., 0] = input_width - 1 - joints[..., 0]
    return mirrored[..., perm, :], weights[..., perm]


def flip_heatmaps(heatmaps: np.ndarray, input_width: int) -> np.ndarray:
    """Heatmaps (..., K, Hh, Wh) of the mirrored crop: mirrored, shifted right by
    1 - Wh / W px (linear interpolation), joints swapped. The new left column needs a value
    from beyond the original map's right edge, which the teacher never computed: it is
    extrapolated linearly from the two edge columns."""
    width = heatmaps.shape[-1]
    shift = 1.0 - width / input_width
    mirrored = heatmaps[..., ::-1]
    shifted = (1.0 - shift) * mirrored
    shifted[..., 1:] += shift * mirrored[..., :-1]
    shifted[..., :1] += shift * (2.0 * mirrored[..., :1] - mirrored[..., 1:2])
    return np.ascontiguousarray(shifted[..., flip_permutation(heatmaps.shape[-3]), :, :], dtype=heatmaps.dtype)
