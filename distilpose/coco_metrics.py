"""COCO keypoint evaluation as mmpose 0.x's top-down COCO evaluation does it: decoding to image
coordinates, flip test, results with rescored persons, OKS-NMS on crop-box areas, COCOeval.

Everything here works on plain arrays (image ids, box scores, crop affines, coordinates) so that
it does not depend on the data or model classes. Coordinates are ``(x, y)``, sizes ``(H, W)``.

Pixel convention (mmpose): pixel centres sit at integer coordinates, so mirroring a crop of
width W maps pixel x to ``W - 1 - x``.
"""

from __future__ import annotations

import contextlib
import io
import json
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from distilpose.keypoints import FLIP_PAIRS as COCO_FLIP_PAIRS
from distilpose.keypoints import OKS_SIGMAS as COCO_SIGMAS
from distilpose.keypoints import flip_permutation

# Order of pycocotools' COCOeval(iouType="keypoints").stats.
METRIC_NAMES = ("AP", "AP50", "AP75", "APM", "APL", "AR", "AR50", "AR75", "ARM", "ARL")

FlipMode = Literal["exact", "official"]


# --------------------------------------------------------------------------------------------
# Decoding: model output -> crop pixels -> image pixels
# --------------------------------------------------------------------------------------------


def heatmap_to_crop(coords_hm: np.ndarray, heatmap_size: Sequence[int], input_size: Sequence[int]) -> np.ndarray:
    """Heatmap px -> crop px: ``crop = hm * (input / heatmap)`` per axis (mmpose, no half-pixel offset)."""
    coords_hm = np.asarray(coords_hm, dtype=np.float64)
    (h_hm, w_hm), (h_in, w_in) = heatmap_size, input_size
    return coords_hm * np.array([w_in / w_hm, h_in / h_hm])


def normalized_to_crop(coords01: np.ndarray, input_size: Sequence[int]) -> np.ndarray:
    """Student output in [0, 1] -> crop px: ``(x * W, y * H)`` (targets were px / size, no -1)."""
    coords01 = np.asarray(coords01, dtype=np.float64)
    h_in, w_in = input_size
    return coords01 * np.array([w_in, h_in], dtype=np.float64)


def crop_to_image(coords_crop: np.ndarray, affines: np.ndarray) -> np.ndarray:
    """Map crop px back to image px with the inverse of each (2, 3) image->crop affine.

    Inverting the full matrix (rather than mmpose's ``transform_preds`` centre/scale formula)
    also handles rotated crops, so the same function serves augmented views.
    """
    coords_crop = np.asarray(coords_crop, dtype=np.float64)
    affines = np.asarray(affines, dtype=np.float64)
    if coords_crop.ndim != 3 or coords_crop.shape[-1] != 2:
        raise ValueError(f"coords_crop must have shape (N, K, 2), got {coords_crop.shape}")
    if affines.shape != (coords_crop.shape[0], 2, 3):
        raise ValueError(f"affines must have shape ({coords_crop.shape[0]}, 2, 3), got {affines.shape}")
    linear, shift = affines[:, :, :2], affines[:, :, 2]
    inverse = np.linalg.inv(linear)  # (N, 2, 2); raises LinAlgError for a degenerate crop
    return np.einsum("nij,nkj->nki", inverse, coords_crop - shift[:, None, :])


def crop_box_areas(affines: np.ndarray, input_size: Sequence[int]) -> np.ndarray:
    """Area in image px^2 of the box each (2, 3) image->crop affine maps onto the (H, W) crop.

    For an evaluation crop this is the person box fitted to the input aspect ratio and padded
    by 1.25, i.e. mmpose's ``prod(scale * 200)``: the area mmpose's top-down evaluation gives
    OKS-NMS (not the annotation area and not the raw detector box, which are 2-6x smaller).
    The crop is ``W x H`` px and the affine scales areas by ``|det|``; rotation and mirroring
    do not change it.
    """
    affines = np.asarray(affines, dtype=np.float64)
    if affines.ndim != 3 or affines.shape[1:] != (2, 3):
        raise ValueError(f"affines must have shape (N, 2, 3), got {affines.shape}")
    h_in, w_in = input_size
    return h_in * w_in / np.abs(np.linalg.det(affines[:, :, :2]))


# --------------------------------------------------------------------------------------------
# Flip test
# --------------------------------------------------------------------------------------------


def flip_back(
    coords_norm: np.ndarray,
    scores: np.ndarray,
    flip_pairs: Iterable[tuple[int, int]] = COCO_FLIP_PAIRS,
    mode: FlipMode = "exact",
    input_width: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Undo a horizontal flip of the crop on a student's normalized predictions.

    ``coords_norm`` (N, K, 2) in [0, 1] and ``scores`` (N, K) were predicted on the mirrored crop.
    Returns ``(coords, scores)`` expressed in the un-mirrored crop, ready to be averaged with the
    un-mirrored pass.

    - ``"exact"`` (project default): mirror in pixel space,
      ``x_px' = W - 1 - x_px`` i.e. ``x' = (W - 1) / W - x``, and swap left/right joints for the
      coordinates AND the scores, so each score stays with its joint. Needs ``input_width``.
    - ``"official"`` (DistilPose / mmpose v0.22 ``fliplr_regression``): ``x' = 1 - x`` in
      normalized units (leaves a 1-input-pixel offset on the flipped pass) and only the
      coordinates are swapped; the score vector keeps its order, so after averaging a left
      joint's score mixes in the right joint's flipped score.
    """
    coords = np.array(coords_norm, dtype=np.float64)  # copy: never write into the caller's array
    scores = np.array(scores, dtype=np.float64)
    if coords.ndim != 3 or coords.shape[-1] != 2:
        raise ValueError(f"coords_norm must have shape (N, K, 2), got {coords.shape}")
    if scores.shape != coords.shape[:2]:
        raise ValueError(f"scores must have shape {coords.shape[:2]}, got {scores.shape}")
    perm = flip_permutation(coords.shape[1], flip_pairs)
    if mode == "exact":
        if input_width is None:
            raise ValueError("flip_back(mode='exact') needs input_width (crop width in px)")
        coords[..., 0] = (input_width - 1) / input_width - coords[..., 0]
        return coords[:, perm], scores[:, perm]
    if mode == "official":
        coords[..., 0] = 1.0 - coords[..., 0]
        return coords[:, perm], scores
    raise ValueError(f"flip mode must be 'exact' or 'official', got {mode!r}")


# --------------------------------------------------------------------------------------------
# COCO results, OKS-NMS
# --------------------------------------------------------------------------------------------


def person_score(joint_scores: np.ndarray, box_score: float, vis_thr: float = 0.2) -> float:
    """Box score x mean of the joint scores above ``vis_thr`` (0 when none is), as mmpose rescores."""
    confident = joint_scores[joint_scores > vis_thr]
    if confident.size == 0:
        return 0.0
    return float(box_score) * float(confident.mean())


def make_results(
    image_ids: Sequence[int],
    coords_img: np.ndarray,
    joint_scores: np.ndarray,
    box_scores: Sequence[float],
    areas: Sequence[float],
    vis_thr: float = 0.2,
) -> list[dict]:
    """One COCO keypoint result per instance.

    Each dict has ``image_id``, ``category_id`` (1), ``keypoints`` (flat ``[x, y, score] * K``
    with the joint score as third value), ``score`` (see :func:`person_score`) and ``area``, the
    OKS scale :func:`oks_nms` uses; mmpose passes the crop box area (:func:`crop_box_areas`).
    pycocotools recomputes its own area and ignores this one.
    """
    coords_img = np.asarray(coords_img, dtype=np.float64)
    joint_scores = np.asarray(joint_scores, dtype=np.float64)
    image_ids = np.asarray(image_ids).reshape(-1)
    box_scores = np.asarray(box_scores, dtype=np.float64).reshape(-1)
    areas = np.asarray(areas, dtype=np.float64).reshape(-1)
    n = coords_img.shape[0]
    if coords_img.shape[1:] != (joint_scores.shape[1], 2) or joint_scores.shape[0] != n:
        raise ValueError(f"coords_img {coords_img.shape} and joint_scores {joint_scores.shape} disagree")
    for name, arr in (("image_ids", image_ids), ("box_scores", box_scores), ("areas", areas)):
        if arr.shape != (n,):
            raise ValueError(f"{name} must have shape ({n},), got {arr.shape}")
    results = []
    for i in range(n):
        keypoints = np.concatenate([coords_img[i], joint_scores[i][:, None]], axis=1)
        results.append(
            {
                "image_id": int(image_ids[i]),
                "category_id": 1,
                "keypoints": keypoints.reshape(-1).tolist(),
                "score": person_score(joint_scores[i], box_scores[i], vis_thr),
                "area": float(areas[i]),
            }
        )
    return results


def oks_one_to_many(
    kpts: np.ndarray, area: float, others: np.ndarray, other_areas: np.ndarray, sigmas: np.ndarray
) -> np.ndarray:
    """OKS between one pose (K, 2) and M poses (M, K, 2), as mmpose's ``oks_iou``.

    Uses the mean of the two areas as scale and all joints (no visibility gate), as mmpose's
    top-down COCO evaluation calls it.
    """
    variances = (2.0 * sigmas) ** 2
    sq_dist = ((others - kpts[None]) ** 2).sum(axis=-1)  # (M, K)
    scale = (area + other_areas)[:, None] / 2.0 + np.spacing(1)
    return np.exp(-sq_dist / variances[None] / scale / 2.0).mean(axis=1)


def oks_nms(results: list[dict], thr: float = 0.9, sigmas: np.ndarray = COCO_SIGMAS) -> list[dict]:
    """Greedy OKS non-maximum suppression per image, as mmpose's ``oks_nms`` (official ``oks_thr`` 0.9).

    Within each image, repeatedly keep the highest-scoring result and drop the others whose OKS
    with it exceeds ``thr``. Results need ``area`` (as :func:`make_results` writes); the official
    evaluation uses the crop box area (:func:`crop_box_areas`), and a larger area makes the same
    pixel distance a higher OKS, so more near-duplicates are suppressed. Returns the kept
    results, grouped by image, each image's best first.
    """
    sigmas = np.asarray(sigmas, dtype=np.float64)
    by_image: dict[int, list[dict]] = {}
    for res in results:
        if "area" not in res:
            raise ValueError("oks_nms needs an 'area' in every result; build them with make_results")
        by_image.setdefault(res["image_id"], []).append(res)
    kept = []
    for image_results in by_image.values():
        kpts = np.array([r["keypoints"] for r in image_results], dtype=np.float64).reshape(len(image_results), -1, 3)
        coords = kpts[..., :2]
        areas = np.array([r["area"] for r in image_results], dtype=np.float64)
        # mmpose's order, scores.argsort()[::-1]: highest first, equal scores last-first.
        order = np.argsort([r["score"] for r in image_results], kind="stable")[::-1]
        while order.size > 0:
            best, rest = order[0], order[1:]
            kept.append(image_results[best])
            oks = oks_one_to_many(coords[best], areas[best], coords[rest], areas[rest], sigmas)
            order = rest[oks <= thr]
    return kept


# --------------------------------------------------------------------------------------------
# COCOeval
# --------------------------------------------------------------------------------------------


def evaluate_keypoints(
    ann_file: str | Path | COCO,
    results: list[dict],
    out_json: str | Path | None = None,
    verbose: bool = False,
) -> dict[str, float]:
    """COCO keypoint AP/AR of ``results`` against ``ann_file`` (pycocotools, standard sigmas).

    Returns ``AP, AP50, AP75, APM, APL, AR, AR50, AR75, ARM, ARL``; like pycocotools, an entry
    is -1 when the ground truth has no person in that area range. Empty results give zeros and
    a warning (pycocotools would crash on them). ``out_json`` receives the results as given.
    pycocotools' console output is shown only when ``verbose``.
    """
    if out_json is not None:
        out_json = Path(out_json)
        out_json.parent.mkdir(parents=True, exist_ok=True)
        out_json.write_text(json.dumps(results))
    if not results:
        warnings.warn("evaluate_keypoints: no predictions; reporting all metrics as 0", stacklevel=2)
        return dict.fromkeys(METRIC_NAMES, 0.0)

    quiet = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
    with quiet:
        coco_gt = ann_file if isinstance(ann_file, COCO) else COCO(str(ann_file))
        unknown = {r["image_id"] for r in results} - set(coco_gt.getImgIds())
        if unknown:
            raise ValueError(
                f"{len(unknown)} result image ids are not in the ground truth "
                f"{'(COCO object)' if isinstance(ann_file, COCO) else ann_file} (e.g. {sorted(unknown)[:5]}); "
                "evaluate against the split the predictions were made on"
            )
        # loadRes writes bbox/area/id into the dicts it gets; hand it copies.
        coco_dt = coco_gt.loadRes([dict(r) for r in results])
        coco_eval = COCOeval(coco_gt, coco_dt, iouType="keypoints")
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return {name: float(value) for name, value in zip(METRIC_NAMES, coco_eval.stats)}


# --------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------


def _is_number(value) -> bool:
    return isinstance(value, int | float | np.number) and not isinstance(value, bool)


def format_table(
    rows: list[dict],
    columns: Sequence[str] | None = None,
    float_fmt: str = ".4f",
    cell: Callable[[Any], str] | None = None,
) -> str:
    """Aligned plain-text table of ``rows`` (dicts); numbers right-aligned, text left, missing '-'.

    ``columns`` defaults to the keys of all rows in first-seen order. ``cell`` formats a
    present value (default: floats with ``float_fmt``, anything else with ``str``).
    """
    if columns is None:
        columns = list(dict.fromkeys(key for row in rows for key in row))

    def default_cell(value) -> str:
        if isinstance(value, float | np.floating):
            return format(float(value), float_fmt)
        return str(value)

    def text(value) -> str:
        return "-" if value is None else (cell or default_cell)(value)

    body = [[text(row.get(col)) for col in columns] for row in rows]
    # A column is right-aligned when every value present in it is a number.
    numeric = [
        all(_is_number(row[col]) for row in rows if row.get(col) is not None)
        and any(row.get(col) is not None for row in rows)
        for col in columns
    ]
    widths = [max([len(str(col))] + [len(line[j]) for line in body]) for j, col in enumerate(columns)]

    def line(cells: Sequence[str]) -> str:
        padded = [c.rjust(w) if num else c.ljust(w) for c, w, num in zip(cells, widths, numeric)]
        return "  ".join(padded).rstrip()

    separator = "  ".join("-" * w for w in widths)
    return "\n".join([line([str(c) for c in columns]), separator] + [line(cells) for cells in body])
