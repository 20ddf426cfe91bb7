"""Run a student or teacher over person crops and decode to image coordinates (with flip test).

The output of :func:`predict` feeds :func:`distilpose.coco_metrics.make_results` directly.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch
from torch import nn

from distilpose.coco_metrics import (
    FlipMode,
    crop_box_areas,
    crop_to_image,
    flip_back,
    heatmap_to_crop,
    normalized_to_crop,
)
from distilpose.keypoints import FLIP_PAIRS, flip_permutation

BATCH_KEYS = ("image", "affine", "image_id", "box_score")


def _to_numpy(value) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def _config_size(model: nn.Module, field: str) -> tuple[int, int] | None:
    size = getattr(getattr(model, "config", None), field, None)
    return None if size is None else (int(size[0]), int(size[1]))


def _check_size(what: str, expected: tuple[int, int] | None, actual: Sequence[int]) -> tuple[int, int]:
    actual = (int(actual[0]), int(actual[1]))
    if expected is not None and tuple(expected) != actual:
        raise ValueError(f"{what} is {actual} (H, W) but the model/arguments say {tuple(expected)}")
    return actual


def flip_heatmaps_back(heatmaps_flipped: torch.Tensor, flip_pairs: Iterable[tuple[int, int]]) -> torch.Tensor:
    """Heatmaps predicted on a mirrored crop -> heatmaps of the un-mirrored crop (mmpose flip test).

    Mirror the columns, swap left/right joint channels, then shift one column to the right as
    mmpose's ``shift_heatmap=True`` does: a joint at crop px x lands at heatmap px
    ``x / s - (s - 1) / s`` after the column mirror (s = stride), and the one-column shift moves
    it to ``x / s + 1 / s``, closer than no shift for the paper's stride 4. The same operation
    serves both flip modes: channel swapping already keeps each joint's confidence with it.
    """
    perm = torch.as_tensor(flip_permutation(heatmaps_flipped.shape[1], flip_pairs), device=heatmaps_flipped.device)
    mirrored = torch.flip(heatmaps_flipped, dims=[3])[:, perm]
    shifted = mirrored.clone()
    shifted[..., 1:] = mirrored[..., :-1]
    return shifted


def _student_crop_coords(
    out, out_flipped, input_size: tuple[int, int], flip_pairs, flip_mode: FlipMode
) -> tuple[np.ndarray, np.ndarray]:
    coords, scores = _to_numpy(out.coords).astype(np.float64), _to_numpy(out.score).astype(np.float64)
    if out_flipped is not None:
        coords_f, scores_f = flip_back(
            _to_numpy(out_flipped.coords),
            _to_numpy(out_flipped.score),
            flip_pairs,
            mode=flip_mode,
            input_width=input_size[1],
        )
        coords, scores = (coords + coords_f) / 2.0, (scores + scores_f) / 2.0
    return normalized_to_crop(coords, input_size), scores


def _teacher_crop_coords(
    out, out_flipped, input_size: tuple[int, int], heatmap_size: tuple[int, int] | None, flip_pairs
) -> tuple[np.ndarray, np.ndarray]:
    # Lazy import: distilpose.heatmaps is only needed for heatmap models.
    from distilpose.heatmaps import decode_heatmaps

    heatmaps = out.heatmaps
    if out_flipped is not None:
        heatmaps = (heatmaps + flip_heatmaps_back(out_flipped.heatmaps, flip_pairs)) / 2.0
    heatmap_size = _check_size("heatmap size", heatmap_size, heatmaps.shape[-2:])
    coords_hm, maxvals = decode_heatmaps(heatmaps)
    crop = heatmap_to_crop(_to_numpy(coords_hm), heatmap_size, input_size)
    return crop, _to_numpy(maxvals).astype(np.float64)


def predict(
    model: nn.Module,
    batches: Iterable[dict],
    flip_test: bool = True,
    flip_mode: FlipMode = "exact",
    input_size: Sequence[int] | None = None,
    heatmap_size: Sequence[int] | None = None,
    flip_pairs: Iterable[tuple[int, int]] = FLIP_PAIRS,
    device: torch.device | str | None = None,
) -> dict[str, np.ndarray]:
    """Predict joints in image coordinates for every crop of ``batches``.

    ``batches`` yields dicts (a list of them or a torch DataLoader with default collation) with
    ``image`` (N, 3, H, W) normalized, ``affine`` (N, 2, 3) image->crop, ``image_id`` (N,) and
    ``box_score`` (N,). The model is recognised by its output: ``.coords``
    (N, K, 2) in [0, 1] and ``.score`` (N, K) for a student; ``.heatmaps`` (N, K, Hh, Wh) for a
    teacher (decoded with ``distilpose.heatmaps.decode_heatmaps``; joint score = heatmap max).

    ``input_size`` / ``heatmap_size`` (H, W) default to ``model.config``'s fields, then to the
    tensor shapes; a mismatch with the tensors is an error. With ``flip_test`` the mirrored crop
    is run too and averaged (students: :func:`distilpose.coco_metrics.flip_back` with
    ``flip_mode``; teachers: :func:`flip_heatmaps_back`, where both modes coincide).

    Returns ``image_ids`` (M,) int64, ``coords_img`` (M, K, 2), ``joint_scores`` (M, K),
    ``box_scores`` (M,), ``areas`` (M,) (the crop box areas OKS-NMS uses, from the affines:
    :func:`distilpose.coco_metrics.crop_box_areas`).
    """
    if flip_mode not in ("exact", "official"):
        raise ValueError(f"flip_mode must be 'exact' or 'official', got {flip_mode!r}")
    flip_pairs = tuple(flip_pairs)
    expected_input = tuple(input_size) if input_size is not None else _config_size(model, "input_size")
    expected_heatmap = tuple(heatmap_size) if heatmap_size is not None else _config_size(model, "heatmap_size")
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))

    collected: dict[str, list[np.ndarray]] = {
        k: [] for k in ("image_ids", "coords_img", "joint_scores", "box_scores", "areas")
    }
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for batch in batches:
                missing = [k for k in BATCH_KEYS if k not in batch]
                if missing:
                    raise KeyError(f"predict: batch lacks {missing}; each batch needs {list(BATCH_KEYS)}")
                images = torch.as_tensor(batch["image"]).to(device)
                batch_input = _check_size("image batch size", expected_input, images.shape[-2:])
                out = model(images)
                out_flipped = model(torch.flip(images, dims=[3])) if flip_test else None
                if hasattr(out, "coords"):
                    crop, scores = _student_crop_coords(out, out_flipped, batch_input, flip_pairs, flip_mode)
                elif hasattr(out, "heatmaps"):
                    crop, scores = _teacher_crop_coords(out, out_flipped, batch_input, expected_heatmap, flip_pairs)
                else:
                    raise TypeError(
                        f"predict: model output {type(out).__name__} has neither .coords (student) "
                        "nor .heatmaps (teacher)"
                    )
                affines = _to_numpy(batch["affine"])
                collected["coords_img"].append(crop_to_image(crop, affines))
                collected["joint_scores"].append(scores)
                collected["image_ids"].append(_to_numpy(batch["image_id"]).astype(np.int64).reshape(-1))
                collected["box_scores"].append(_to_numpy(batch["box_score"]).astype(np.float64).reshape(-1))
                collected["areas"].append(crop_box_areas(affines, batch_input))
    finally:
        model.train(was_training)

    if not collected["image_ids"]:
        num_joints = int(getattr(getattr(model, "config", None), "num_joints", 0))
        return {
            "image_ids": np.zeros(0, np.int64),
            "coords_img": np.zeros((0, num_joints, 2)),
            "joint_scores": np.zeros((0, num_joints)),
            "box_scores": np.zeros(0),
            "areas": np.zeros(0),
        }
    return {key: np.concatenate(parts) for key, parts in collected.items()}
