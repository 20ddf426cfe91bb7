"""COCO keypoint validation of a model (teacher or student) and the trivial mean-pose baseline.

Both go through the same path, so their numbers are comparable:
instances (GT or detector boxes) -> identity crops -> joints in image px + joint scores ->
`make_results` (person score = box score x mean confident joint score) -> OKS-NMS (0.9) ->
pycocotools COCOeval (`evaluate_keypoints`).

`limit` evaluates only the first `limit` images of the annotation file (file order), and the
ground truth is restricted to those images too, so a quick check is not penalised for the
people in images it never looked at.

Also here: the data set's person detections (`detections_file`), loading a checkpoint of
either format (`load_model`) and the body of jobs/evaluate.py (`run_evaluation`).
"""

from __future__ import annotations

import contextlib
import io
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pycocotools.coco import COCO
from torch import nn
from torch.utils.data import DataLoader

from distilpose.coco_metrics import (
    crop_box_areas,
    crop_to_image,
    evaluate_keypoints,
    format_table,
    make_results,
    normalized_to_crop,
    oks_nms,
)
from distilpose.data.coco import DEFAULT_INPUT_SIZE, Instance, join_uri, load_coco, load_instances
from distilpose.data.dataset import TopDownDataset
from distilpose.data.layout import DataOptions, uri_exists
from distilpose.data.transforms import affine_matrix, identity_view, transform_joints
from distilpose.inference import predict
from distilpose.models import checkpoints
from distilpose.options import check_options, option
from distilpose.profiles import DEFAULT_PROFILE, PROFILES, get_profile

OKS_NMS_THR = 0.9  # the official test setting
VIS_THR = 0.2
DETECTIONS_FILE = "val_detections.json"
METRIC_COLUMNS = ("AP", "AP50", "AP75", "APM", "APL", "AR", "num_instances")


# --------------------------------------------------------------------------- detections


def detections_file(data: str) -> str | None:
    """The data set's person detections for val (synthetic: annotations/val_detections.json)."""
    uri = join_uri(data, f"annotations/{DETECTIONS_FILE}")
    return uri if uri_exists(uri) else None


# --------------------------------------------------------------------------- evaluation


def ground_truth(ann_file: str, limit: int | None = None) -> tuple[COCO, set[int] | None]:
    """pycocotools COCO of `ann_file`, restricted to its first `limit` images when given.

    Returns the COCO object and the kept image ids (None = all).
    """
    data, _ = load_coco(ann_file)
    keep = None
    if limit is not None:
        keep = {int(entry["id"]) for entry in data["images"][: max(0, int(limit))]}
        data = dict(data)
        data["images"] = [e for e in data["images"] if int(e["id"]) in keep]
        data["annotations"] = [a for a in data["annotations"] if int(a.get("image_id", -1)) in keep]
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints "creating index..."
        coco.createIndex()
    return coco, keep


def val_instances(
    ann_file: str,
    boxes: str = "gt",
    score_thr: float = 0.0,
    input_size: Sequence[int] = DEFAULT_INPUT_SIZE,
    keep_images: set[int] | None = None,
) -> tuple[list[Instance], int]:
    """Validation instances (GT or detector boxes) and how many records were skipped."""
    instances, report = load_instances(ann_file, "val", boxes=boxes, score_thr=score_thr, input_size=tuple(input_size))
    if keep_images is not None:
        instances = [inst for inst in instances if inst.image_id in keep_images]
    return instances, report.total


def score_predictions(
    coco_gt: COCO,
    preds: dict[str, np.ndarray],
    out_json: str | Path | None = None,
    oks_thr: float = OKS_NMS_THR,
    vis_thr: float = VIS_THR,
) -> dict[str, float]:
    """`predict`-style arrays -> COCO results -> OKS-NMS -> AP/AR dict."""
    results = make_results(
        preds["image_ids"], preds["coords_img"], preds["joint_scores"], preds["box_scores"], preds["areas"], vis_thr
    )
    return evaluate_keypoints(coco_gt, oks_nms(results, oks_thr), out_json=out_json)


def evaluate_model(
    model: nn.Module,
    ann_file: str,
    image_root: str,
    boxes: str = "gt",
    flip_test: bool = True,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    score_thr: float = 0.0,
    out_json: str | Path | None = None,
    limit: int | None = None,
    num_workers: int = 0,
    flip_mode: str = "exact",
) -> dict[str, Any]:
    """COCO keypoint metrics of `model` on a split.

    boxes: "gt" or a person-detection results file (detections with score < `score_thr` are
    dropped). Works for teachers (heatmaps, DARK decoding) and students (coords + score);
    `distilpose.inference.predict` tells them apart. `flip_mode` is the student flip test's
    (see distilpose.profiles). `out_json` receives the COCO results after OKS-NMS. Returns AP,
    AP50, AP75, APM, APL, AR (+ AR50..ARL), num_instances, num_images, skipped (records the
    loader dropped), boxes, flip_test, flip_mode, wall_s.
    """
    start = time.perf_counter()
    config = model.config
    coco_gt, keep = ground_truth(ann_file, limit)
    instances, skipped = val_instances(ann_file, boxes, score_thr, config.input_size, keep)
    dataset = TopDownDataset(instances, image_root, config.input_size, train=False)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    preds = predict(model, loader, flip_test=flip_test, flip_mode=flip_mode, device=torch.device(device))
    stats = score_predictions(coco_gt, preds, out_json)
    return {
        **stats,
        "num_instances": len(instances),
        "num_images": len(coco_gt.getImgIds()),
        "skipped": skipped,
        "boxes": boxes,
        "flip_test": bool(flip_test),
        "flip_mode": flip_mode,
        "wall_s": time.perf_counter() - start,
    }


def mean_pose(instances: Sequence[Instance], input_size: Sequence[int] = DEFAULT_INPUT_SIZE) -> np.ndarray:
    """(K, 2) mean normalized (x / W, y / H) position of each joint in the identity crops.

    Only labelled joints inside the crop count; a joint never seen sits at the crop centre.
    """
    if not instances:
        raise ValueError("mean_pose needs at least one training instance")
    height, width = input_size
    num_joints = len(instances[0].joints)
    total = np.zeros((num_joints, 2))
    count = np.zeros(num_joints)
    for inst in instances:
        joints = transform_joints(inst.joints, identity_view(inst), tuple(input_size))
        seen = joints[:, 2] > 0
        total[seen] += joints[seen, :2] / np.array([width, height])
        count[seen] += 1
    pose = np.full((num_joints, 2), 0.5)
    pose[count > 0] = total[count > 0] / count[count > 0, None]
    return pose


def mean_pose_baseline(
    train_instances: Sequence[Instance],
    ann_file: str,
    boxes: str = "gt",
    input_size: Sequence[int] = DEFAULT_INPUT_SIZE,
    score_thr: float = 0.0,
    out_json: str | Path | None = None,
    limit: int | None = None,
) -> dict[str, Any]:
    """The trivial baseline: the training set's mean crop pose placed in every val box.

    Joint scores are a constant 1, so the person score is the box score. Anything a model
    learns shows up as AP above this number; a model at this level has learnt only the
    average pose. Returns the same keys as `evaluate_model`.
    """
    start = time.perf_counter()
    pose = mean_pose(train_instances, input_size)
    coco_gt, keep = ground_truth(ann_file, limit)
    instances, skipped = val_instances(ann_file, boxes, score_thr, input_size, keep)
    n = len(instances)
    num_joints = pose.shape[0]
    crop = np.broadcast_to(normalized_to_crop(pose, input_size), (n, num_joints, 2))
    affines = np.stack([affine_matrix(identity_view(inst), tuple(input_size)) for inst in instances]) if n else None
    preds = {
        "image_ids": np.array([inst.image_id for inst in instances], np.int64),
        "coords_img": crop_to_image(crop, affines) if n else np.zeros((0, num_joints, 2)),
        "joint_scores": np.ones((n, num_joints)),
        "box_scores": np.array([inst.box_score for inst in instances], np.float64),
        "areas": crop_box_areas(affines, input_size) if n else np.zeros(0),
    }
    stats = score_predictions(coco_gt, preds, out_json)
    return {
        **stats,
        "num_instances": n,
        "num_images": len(coco_gt.getImgIds()),
        "skipped": skipped,
        "boxes": boxes,
        "flip_test": False,
        "wall_s": time.perf_counter() - start,
    }


# --------------------------------------------------------------------------- checkpoints + job


def load_model(preset: str, checkpoint: str | Path) -> nn.Module:
    """A model of `preset` with weights from our checkpoint format or an official mmpose .pth
    (told apart by content: `checkpoints.load_model`)."""
    return checkpoints.load_model(checkpoint, preset)


@dataclass
class EvalRequest(DataOptions):
    """What jobs/evaluate.py asks for (the split: DataOptions' --data, or --ann-file/--images)."""

    model: str = option(help="preset the checkpoint was made for")
    checkpoint: str = option(help="our checkpoint or an official .pth")
    boxes: str = option("gt", help="'gt' or a person-detection results json")
    score_thr: float = option(0.0, help="drop detections below this score")
    flip_test: bool = option(True, negatable=True, help="flip test")
    profile: str = option(
        DEFAULT_PROFILE,
        choices=tuple(sorted(PROFILES)),
        help="'official': the official code's quirks; 'intended': the behaviour they were meant to have",
    )
    split: str = option("val", help="data split")
    batch_size: int = option(64, help="inference batch size")
    limit: int | None = option(None, help="evaluate only the first N images of the split")
    device: str = option("cpu", help="torch device")
    threads: int = option(2, help="torch threads")
    results_json: str | None = option(None, help="also write the COCO keypoint results (after OKS-NMS) here")
    out: str | None = option(None, help="write the metrics (and what was evaluated) as JSON here")

    def __post_init__(self) -> None:
        check_options(self)
        self.check_data_source()


@dataclass
class EvalReport:
    request: EvalRequest
    metrics: dict[str, Any]

    def table(self) -> str:
        row = {
            "model": self.request.model,
            "profile": self.request.profile,
            "boxes": "gt" if self.request.boxes == "gt" else "det",
        }
        return format_table([{**row, **{k: self.metrics.get(k) for k in METRIC_COLUMNS}}])


def run_evaluation(request: EvalRequest) -> EvalReport:
    """Load the checkpoint, evaluate it on the split, write `request.out` if given."""
    profile = get_profile(request.profile)
    torch.set_num_threads(request.threads)
    files = request.split_files(request.split)
    model = load_model(request.model, request.checkpoint).to(request.device)
    metrics = evaluate_model(
        model,
        files.ann_file,
        files.image_root,
        boxes=request.boxes,
        flip_test=request.flip_test,
        batch_size=request.batch_size,
        device=request.device,
        score_thr=request.score_thr,
        out_json=request.results_json,
        limit=request.limit,
        flip_mode=profile.flip_mode,
    )
    report = EvalReport(request, metrics)
    if request.out:
        out = Path(request.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "metrics": metrics,
            "request": asdict(request),
            "profile": asdict(profile),
            "model_config": asdict(model.config),
        }
        out.write_text(json.dumps(payload, indent=2))
    return report
