"""The 17 COCO person keypoints: names, skeleton, left/right pairs, OKS sigmas, upper body.

Joint order is COCO's (as in the annotation files, pycocotools and mmpose).
"""

from __future__ import annotations

import numpy as np

NUM_JOINTS = 17
KEYPOINT_NAMES = (
    "nose",
    "left_eye",
    "right_eye",
    "left_ear",
    "right_ear",
    "left_shoulder",
    "right_shoulder",
    "left_elbow",
    "right_elbow",
    "left_wrist",
    "right_wrist",
    "left_hip",
    "right_hip",
    "left_knee",
    "right_knee",
    "left_ankle",
    "right_ankle",
)
# COCO's limb list, 1-based joint indices as in the official annotation files.
SKELETON = (
    (16, 14), (14, 12), (17, 15), (15, 13), (12, 13), (6, 12), (7, 13), (6, 7), (6, 8),
    (7, 9), (8, 10), (9, 11), (2, 3), (1, 2), (1, 3), (2, 4), (3, 5), (4, 6), (5, 7),
)  # fmt: skip
# The same limbs with 0-based joint indices, for drawing.
LIMBS: tuple[tuple[int, int], ...] = tuple((a - 1, b - 1) for a, b in SKELETON)
# Left/right joint pairs, swapped by a horizontal flip.
FLIP_PAIRS: tuple[tuple[int, int], ...] = ((1, 2), (3, 4), (5, 6), (7, 8), (9, 10), (11, 12), (13, 14), (15, 16))
# Nose .. wrists: the joints of a half-body view's upper half (mmpose's upper_body_ids).
UPPER_BODY_JOINTS = frozenset(range(11))
# OKS sigmas of each joint (as pycocotools / mmpose use them).
OKS_SIGMAS = (
    np.array([0.26, 0.25, 0.25, 0.35, 0.35, 0.79, 0.79, 0.72, 0.72, 0.62, 0.62, 1.07, 1.07, 0.87, 0.87, 0.89, 0.89])
    / 10.0
)


def flip_permutation(num_joints: int = NUM_JOINTS, pairs=FLIP_PAIRS) -> np.ndarray:
    """Index array p such that ``x[..., p, :]`` swaps every left joint with its right partner
    (pairs beyond ``num_joints`` are ignored, so an empty joint array flips too)."""
    perm = np.arange(num_joints)
    for left, right in pairs:
        if left < num_joints and right < num_joints:
            perm[left], perm[right] = right, left
    return perm
