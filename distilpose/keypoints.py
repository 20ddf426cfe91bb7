"""COCO keypoint conventions shared by the data pipeline and evaluation (spec section 0)."""

# Left/right joint pairs of the 17 COCO keypoints, swapped by a horizontal flip.
FLIP_PAIRS: tuple[tuple[int, int], ...] = ((1, 2), (3, 4), (5, 6), (7, 8), (9, 10), (11, 12), (13, 14), (15, 16))
