"""TopDownDataset, evaluate_model / mean_pose_baseline and jobs/evaluate.py on a tiny synthetic set."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from distilpose.coco_metrics import METRIC_NAMES
from distilpose.data.coco import ImageError, load_instances
from distilpose.data.dataset import TopDownDataset, crop_to_heatmap_px
from distilpose.data.layout import split_files
from distilpose.data.synthetic import make_synthetic_coco
from distilpose.data.transforms import affine_matrix, identity_view
from distilpose.evaluate import (
    evaluate_model,
    ground_truth,
    load_model,
    mean_pose,
    mean_pose_baseline,
    score_predictions,
    val_instances,
)
from distilpose.heatmaps import decode_heatmaps
from distilpose.inference import predict
from distilpose.models import TeacherOutput, build_model
from distilpose.models.checkpoints import CheckpointError, save_checkpoint, to_official_state_dict

ROOT = Path(__file__).resolve().parents[1]
INPUT = (128, 96)
HEATMAP = (32, 24)
RESULT_KEYS = {*METRIC_NAMES, "num_instances", "num_images", "skipped", "boxes", "flip_test", "wall_s"}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("valdata") / "synth"
    make_synthetic_coco(root, 6, 4, seed=1, image_size=(160, 160))
    return root


@pytest.fixture(scope="module")
def train_instances(data):
    files = split_files(str(data), "train")
    instances, _ = load_instances(files.ann_file, "train", input_size=INPUT)
    assert instances
    return instances


def _dataset(data: Path, instances, train: bool, **kwargs) -> TopDownDataset:
    return TopDownDataset(instances, str(data / "images" / "train"), INPUT, train, seed=5, **kwargs)


# --------------------------------------------------------------------------- dataset


def test_sample_shapes_and_types(data, train_instances):
    sample = _dataset(data, train_instances, True, heatmap_size=HEATMAP)[0]
    assert sample["image"].shape == (3, *INPUT) and sample["image"].dtype == torch.float32
    assert sample["target"].shape == (17, 2) and sample["target_weight"].shape == (17,)
    assert sample["heatmap"].shape == (17, *HEATMAP)
    assert sample["affine"].shape == (2, 3)
    assert sample["valid"] is True
    inst = train_instances[0]
    assert (sample["image_id"], sample["instance_id"]) == (inst.image_id, inst.instance_id)
    assert sample["box_score"] == 1.0 and sample["area"] == pytest.approx(inst.area)
    weight = sample["target_weight"]
    assert set(weight.unique().tolist()) <= {0.0, 1.0}
    # Weighted joints are inside the crop, in normalized units.
    inside = sample["target"][weight > 0]
    assert ((inside >= 0) & (inside <= 1)).all()
    # No heatmap unless asked for.
    assert "heatmap" not in _dataset(data, train_instances, True)[0]


def test_heatmap_peaks_sit_on_the_targets(data, train_instances):
    sample = _dataset(data, train_instances, False, heatmap_size=HEATMAP)[1]
    weight = sample["target_weight"] > 0
    coords, maxvals = decode_heatmaps(sample["heatmap"][None])
    expected = crop_to_heatmap_px(sample["target"].numpy() * np.array([INPUT[1], INPUT[0]]), INPUT, HEATMAP)
    error = np.abs(coords[0][weight].numpy() - expected[weight.numpy()])
    # Exact (DARK on a Gaussian) away from the border; within a cell next to it.
    assert np.median(error) < 0.01 and error.max() < 1.0
    assert (maxvals[0][~weight] == 0).all()


def test_train_views_are_reproducible_per_seed_epoch_index(data, train_instances):
    a, b = _dataset(data, train_instances, True), _dataset(data, train_instances, True)
    for ds in (a, b):
        ds.set_epoch(3)
    assert torch.equal(a[2]["image"], b[2]["image"]) and a.view(2) == b.view(2)
    b.set_epoch(4)
    assert a.view(2) != b.view(2)
    c = TopDownDataset(train_instances, str(data / "images" / "train"), INPUT, True, seed=6)
    c.set_epoch(3)
    assert a.view(2) != c.view(2)
    # Worker processes see the same draws as the main process.
    loader = DataLoader(a, batch_size=2, num_workers=1)
    first = next(iter(loader))
    assert torch.equal(first["image"][0], a[0]["image"])


def test_eval_uses_identity_views(data, train_instances):
    ds = _dataset(data, train_instances, False)
    ds.set_epoch(7)
    inst = train_instances[3]
    assert ds.view(3) == identity_view(inst)
    np.testing.assert_array_equal(ds[3]["affine"].numpy(), affine_matrix(identity_view(inst), INPUT))


def test_bad_image_raises_naming_the_file_or_is_skipped(data, train_instances, tmp_path):
    images = tmp_path / "images"
    shutil.copytree(data / "images" / "train", images)
    broken = train_instances[0].image_file
    (images / broken).write_bytes(b"not a jpeg")
    ds = TopDownDataset(train_instances[:1], str(images), INPUT, train=True, heatmap_size=HEATMAP)
    with pytest.raises(ImageError, match=broken):
        ds[0]
    skipping = TopDownDataset(
        train_instances[:1], str(images), INPUT, train=True, heatmap_size=HEATMAP, skip_bad_images=True
    )
    sample = skipping[0]
    assert sample["valid"] is False and sample["target_weight"].sum() == 0
    assert sample["heatmap"].shape == (17, *HEATMAP)


# --------------------------------------------------------------------------- evaluation


class _OracleTeacher(torch.nn.Module):
    """Returns the ground-truth heatmaps of the batch it was handed (set before each call)."""

    def __init__(self) -> None:
        super().__init__()
        self.heatmaps: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> TeacherOutput:
        return TeacherOutput(heatmaps=self.heatmaps, kpt_tokens=None, vis_tokens=None)


def test_ground_truth_heatmaps_score_near_perfect_ap(data):
    """Rendering, decoding and the image <-> crop mapping agree: GT heatmaps give AP ~ 1."""
    files = split_files(str(data), "val")
    instances, _ = val_instances(files.ann_file, input_size=INPUT)
    ds = TopDownDataset(instances, files.image_root, INPUT, train=False, heatmap_size=HEATMAP)
    oracle = _OracleTeacher()

    def batches():
        for batch in DataLoader(ds, batch_size=4):
            oracle.heatmaps = batch["heatmap"]
            yield batch

    preds = predict(oracle, batches(), flip_test=False, input_size=INPUT, heatmap_size=HEATMAP)
    coco, _ = ground_truth(files.ann_file)
    assert score_predictions(coco, preds)["AP"] > 0.95


@pytest.mark.parametrize("preset", ["tokenpose-tiny", "distilpose-tiny"])
def test_evaluate_model_returns_metrics_for_teacher_and_student(data, preset, tmp_path):
    files = split_files(str(data), "val")
    torch.manual_seed(0)
    model = build_model(preset)
    out_json = tmp_path / "results.json"
    stats = evaluate_model(model, files.ann_file, files.image_root, batch_size=8, out_json=out_json)
    assert RESULT_KEYS <= set(stats)
    assert stats["num_instances"] > 0 and stats["boxes"] == "gt" and stats["flip_test"] is True
    assert all(0.0 <= stats[k] <= 1.0 or stats[k] == -1.0 for k in METRIC_NAMES)
    assert isinstance(json.loads(out_json.read_text()), list)


def test_evaluate_model_with_detections_and_limit(data):
    files = split_files(str(data), "val")
    model = build_model("distilpose-tiny")
    dets = str(data / "annotations" / "val_detections.json")
    stats = evaluate_model(model, files.ann_file, files.image_root, boxes=dets, flip_test=False, limit=2)
    assert stats["num_images"] == 2 and stats["boxes"] == dets
    all_dets, _ = val_instances(files.ann_file, boxes=dets, input_size=INPUT)
    first_two = {e["id"] for e in json.loads(Path(files.ann_file).read_text())["images"][:2]}
    assert stats["num_instances"] == sum(inst.image_id in first_two for inst in all_dets)


def test_mean_pose_baseline(data, train_instances):
    pose = mean_pose(train_instances, INPUT)
    assert pose.shape == (17, 2) and ((pose > 0) & (pose < 1)).all()
    # Heads are above hips in the mean upright crop.
    assert pose[0, 1] < pose[11, 1]
    files = split_files(str(data), "val")
    stats = mean_pose_baseline(train_instances, files.ann_file, input_size=INPUT)
    assert RESULT_KEYS <= set(stats) and stats["num_instances"] > 0
    assert 0.0 <= stats["AP"] <= 1.0


# --------------------------------------------------------------------------- loading + CLI


def test_load_model_reads_our_format_and_official_files(tmp_path):
    torch.manual_seed(1)
    model = build_model("tokenpose-tiny").eval()
    ours = tmp_path / "ours.pt"
    save_checkpoint(ours, model)
    official = tmp_path / "official.pth"
    torch.save({"meta": {"epoch": 3}, "state_dict": to_official_state_dict(model)}, official)
    x = torch.randn(1, 3, *INPUT)
    expected = model(x).heatmaps
    for path in (ours, official):
        loaded = load_model("tokenpose-tiny", path)
        torch.testing.assert_close(loaded(x).heatmaps, expected)
    with pytest.raises(CheckpointError, match="expected preset"):
        load_model("distilpose-tiny", ours)


def test_evaluate_cli_options_are_the_request_fields(monkeypatch):
    import importlib.util

    from distilpose.evaluate import EvalRequest
    from distilpose.options import config_from_args

    monkeypatch.syspath_prepend(str(ROOT / "jobs"))
    spec = importlib.util.spec_from_file_location("evaluate_job", ROOT / "jobs" / "evaluate.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    parser = job.build_parser()

    def parse(*extra):
        args = parser.parse_args(["--data", "d", "--model", "m", "--checkpoint", "c", *extra])
        return config_from_args(EvalRequest, args)

    default = parse()
    assert default == EvalRequest(data="d", model="m", checkpoint="c")
    assert (default.profile, default.flip_test, default.boxes, default.batch_size) == ("official", True, "gt", 64)
    assert parse("--flip-test").flip_test and not parse("--no-flip-test").flip_test
    given = parse("--profile", "intended", "--boxes", "b.json", "--score-thr", "0.3", "--limit", "5")
    given_too = parse("--split", "train", "--batch-size", "8", "--device", "cuda", "--threads", "1")
    assert (given.profile, given.boxes, given.score_thr, given.limit) == ("intended", "b.json", 0.3, 5)
    assert (given_too.split, given_too.batch_size, given_too.device, given_too.threads) == ("train", 8, "cuda", 1)
    written = parse("--results-json", "r.json", "--out", "o.json")
    assert (written.results_json, written.out) == ("r.json", "o.json")
    with pytest.raises(SystemExit):
        parse("--profile", "paper")
    with pytest.raises(SystemExit):
        parser.parse_args(["--data", "d", "--model", "m"])  # --checkpoint is required


def test_evaluate_cli_end_to_end(data, tmp_path):
    ckpt = tmp_path / "teacher.pt"
    save_checkpoint(ckpt, build_model("tokenpose-tiny"))
    out = tmp_path / "metrics.json"
    cmd = [sys.executable, str(ROOT / "jobs" / "evaluate.py"), "--data", str(data), "--model", "tokenpose-tiny"]
    cmd += ["--checkpoint", str(ckpt), "--no-flip-test", "--out", str(out), "--threads", "1", "--profile", "official"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "AP50" in result.stdout and "tokenpose-tiny" in result.stdout and "official" in result.stdout
    payload = json.loads(out.read_text())
    assert RESULT_KEYS <= set(payload["metrics"]) and payload["metrics"]["flip_test"] is False
    assert payload["request"]["checkpoint"] == str(ckpt)
    assert payload["profile"] == {"name": "official", "sh_weighting": "official", "flip_mode": "official"}
    assert payload["metrics"]["flip_mode"] == "official"
