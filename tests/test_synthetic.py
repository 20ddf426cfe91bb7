"""The synthetic COCO-format data set (distilpose.data.synthetic, jobs/make_synthetic.py)."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from distilpose.data.coco import load_instances, read_image
from distilpose.data.synthetic import image_rng, make_figure, make_synthetic_coco, render_image
from distilpose.data.transforms import apply_view, identity_view

ROOT = Path(__file__).resolve().parents[1]
TRAIN_IMAGES = 60


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, object]:
    out = tmp_path_factory.mktemp("synthetic") / "a"
    summary = make_synthetic_coco(out, TRAIN_IMAGES, 12, seed=3)
    return out, summary


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout(dataset):
    # (How fast it renders depends on the machine: the summary reports it, no test asserts it.)
    out, summary = dataset
    assert len(list((out / "images" / "train").glob("*.jpg"))) == TRAIN_IMAGES
    assert len(list((out / "images" / "val").glob("*.jpg"))) == 12
    for name in ("person_keypoints_train.json", "person_keypoints_val.json", "val_detections.json"):
        assert (out / "annotations" / name).is_file()
    assert summary.cpu_seconds > 0


def test_same_seed_gives_identical_bytes(tmp_path, dataset):
    make_synthetic_coco(tmp_path / "x", 6, 3, seed=3)
    make_synthetic_coco(tmp_path / "y", 6, 3, seed=3)
    x, y = _files(tmp_path / "x"), _files(tmp_path / "y")
    assert x == y
    make_synthetic_coco(tmp_path / "z", 6, 3, seed=4)
    z = _files(tmp_path / "z")
    assert x["images/train/000000000001.jpg"] != z["images/train/000000000001.jpg"]
    # Image i does not depend on how many images were asked for.
    big = _files(dataset[0])
    assert x["images/train/000000000006.jpg"] == big["images/train/000000000006.jpg"]


def test_pycocotools_loads_annotations_and_detections(dataset):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    out, _ = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(out / "annotations" / "person_keypoints_val.json"))
        dets = gt.loadRes(str(out / "annotations" / "val_detections.json"))
        # Ground truth submitted as results scores a perfect AP: areas/boxes are consistent.
        results = [
            {"image_id": a["image_id"], "category_id": 1, "keypoints": a["keypoints"], "score": 1.0}
            for a in gt.dataset["annotations"]
            if not a["iscrowd"] and a["num_keypoints"] > 0
        ]
        ev = COCOeval(gt, gt.loadRes(results), "keypoints")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    assert len(gt.getImgIds()) == 12 and len(dets.getAnnIds()) > 0
    assert ev.stats[0] == pytest.approx(1.0)
    cat = gt.loadCats(1)[0]
    assert len(cat["keypoints"]) == 17 and len(cat["skeleton"]) == 19


def test_annotation_content(dataset):
    out, _ = dataset
    data = json.loads((out / "annotations" / "person_keypoints_train.json").read_text())
    assert {"info", "images", "annotations", "categories"} <= set(data)
    per_image: dict[int, int] = {}
    flags = []
    crowds = 0
    for ann in data["annotations"]:
        kp = ann["keypoints"]
        assert len(kp) == 51 and all(isinstance(v, int) for v in kp)
        assert ann["category_id"] == 1 and ann["area"] > 0 and len(ann["bbox"]) == 4
        if ann["iscrowd"]:
            crowds += 1
            assert ann["num_keypoints"] == 0 and "counts" in ann["segmentation"]
            continue
        per_image[ann["image_id"]] = per_image.get(ann["image_id"], 0) + 1
        v = np.array(kp[2::3])
        xy = np.array(kp).reshape(17, 3)[:, :2]
        assert ann["num_keypoints"] == int((v > 0).sum())
        assert (xy[v == 0] == 0).all()
        assert ((xy[v > 0] >= 0) & (xy[v > 0] <= 255)).all()
        flags.extend(v.tolist())
    assert crowds > 0
    assert set(per_image.values()) <= {1, 2, 3, 4} and len(per_image) == TRAIN_IMAGES
    counts = np.bincount(flags, minlength=3)
    assert counts[2] > counts[1] > 0 and counts[0] > 0  # visible, occluded and unlabelled joints


def test_figure_sizes_and_left_right_geometry():
    rng = np.random.default_rng(0)
    for _ in range(50):
        fig = make_figure(rng, 150.0, 0.0, np.array([100.0, 150.0]))
        sho_l, sho_r = fig.joints[5, 0], fig.joints[6, 0]
        hip_l, hip_r = fig.joints[11, 0], fig.joints[12, 0]
        if fig.front:  # facing the camera: the person's left is on the image's right, face drawn
            assert sho_l > sho_r and hip_l > hip_r and fig.labelled[:3].all()
        else:  # seen from behind: left on the image's left, face joints not labelled
            assert sho_l < sho_r and hip_l < hip_r and not fig.labelled[:3].any()
    rendered = [render_image(image_rng(1, "train", i)) for i in range(30)]
    heights = [p["bbox"][3] for r in rendered for p in r.persons if p["bbox"][1] > 0 and p["bbox"][3] < 250]
    assert 40 <= min(heights) and max(heights) <= 230


def test_loader_and_views_on_synthetic(dataset):
    out, _ = dataset
    ann = str(out / "annotations" / "person_keypoints_train.json")
    instances, report = load_instances(ann)
    assert len(instances) > TRAIN_IMAGES and report.counts.get("crowd", 0) > 0
    inst = instances[0]
    image = read_image(str(out / "images" / "train"), inst.image_file)
    crop, joints = apply_view(image, inst.joints, identity_view(inst), (256, 192))
    assert crop.shape == (256, 192, 3)
    assert joints[:, 2].sum() == (inst.joints[:, 2] > 0).sum()  # GT box crop keeps all joints
    val = out / "annotations"
    dets, report = load_instances(str(val / "person_keypoints_val.json"), "val", str(val / "val_detections.json"), 0.3)
    assert dets and all(d.box_score >= 0.3 for d in dets)


def test_cli(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "make_synthetic.py"), "--out", str(tmp_path / "cli")]
        + ["--train", "2", "--val", "1", "--seed", "0", "--size", "128"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "train: 2 images" in result.stdout
    data = json.loads((tmp_path / "cli" / "annotations" / "person_keypoints_val.json").read_text())
    assert data["images"][0]["width"] == 128
