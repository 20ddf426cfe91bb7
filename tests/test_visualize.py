"""Visualizations write real PNGs of the documented size (distilpose.visualize, jobs/visualize.py)."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from distilpose.data.synthetic import make_synthetic_coco
from distilpose.models import build_model
from distilpose.models.checkpoints import save_checkpoint
from distilpose.visualize import (
    CURVES_SIZE_PX,
    heatmap_grid_size,
    joint_confidence,
    plot_training_curves,
    read_metrics_csv,
    render_heatmap_grid,
    render_pose_overlay,
    simulated_heatmaps,
    training_curves_figure,
)

ROOT = Path(__file__).resolve().parents[1]


def _png_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as im:
        im.load()
        assert im.format == "PNG"
        return im.size


def test_pose_overlay_has_the_image_size(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, size=(120, 160, 3), dtype=np.uint8)
    joints = rng.uniform([0, 0], [160, 120], size=(2, 17, 2))
    confidence = joint_confidence(rng.normal(0.5, 0.5, size=(2, 17)))
    path = render_pose_overlay(image, joints, confidence, tmp_path / "overlay.png", title="two people")
    assert _png_size(path) == (160, 120)


def test_joint_confidence_clips_raw_scores() -> None:
    np.testing.assert_array_equal(joint_confidence(np.array([-0.3, 0.4, 1.7, np.nan])), [0.0, 0.4, 1.0, 0.0])


def test_simulated_heatmaps_peak_at_the_predicted_joint() -> None:
    coords = torch.tensor([[[0.5, 0.25]]])  # x, y in [0, 1] of the crop
    maps = simulated_heatmaps(coords, torch.tensor([[[1.5, 2.0]]]), (32, 24))
    row, col = divmod(int(maps[0, 0].argmax()), 24)
    assert (col, row) == (12, 8)  # mu = (0.5 * 24, 0.25 * 32)
    assert float(maps.max()) == pytest.approx(1.0)


def test_heatmap_grid_has_the_documented_size(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    teacher = rng.random((17, 32, 24)).astype(np.float32)
    coords = torch.from_numpy(rng.random((1, 17, 2)).astype(np.float32))
    student = simulated_heatmaps(coords, torch.full((1, 17, 2), 2.0), (32, 24))[0].numpy()
    path = render_heatmap_grid(teacher, student, tmp_path / "grid.png", title="instance 1")
    assert _png_size(path) == heatmap_grid_size(17, (32, 24))
    with pytest.raises(ValueError, match="must both be"):
        render_heatmap_grid(teacher, student[:, :16], tmp_path / "bad.png")


def _write_csv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _fake_run(run_dir: Path) -> None:
    steps = [
        {"step": s, "epoch": 1 + s // 5, "lr": 1e-3 * min(1, (s + 1) / 4), "loss": 1 / (s + 1), "reg": 0.5 / (s + 1),
         "kt": 1e-4, "vt": 2e-4, "sh": 0.3 / (s + 1), "cs": 0.0}
        for s in range(10)
    ]  # fmt: skip
    epochs = [
        {"epoch": 1, "train/loss": 0.4, "samples_per_s": 50.0, "lr": 1e-3, "AP": ""},
        {"epoch": 2, "train/loss": 0.2, "samples_per_s": 51.0, "lr": 1e-3, "AP": 0.31},
    ]
    _write_csv(run_dir / "logs" / "steps.csv", steps)
    _write_csv(run_dir / "logs" / "epochs.csv", epochs)


def test_training_curves_from_run_logs(tmp_path: Path) -> None:
    _fake_run(tmp_path / "run")
    epochs = read_metrics_csv(str(tmp_path / "run" / "logs" / "epochs.csv"))
    assert np.isnan(epochs["AP"][0]) and epochs["AP"][1] == pytest.approx(0.31)
    path = plot_training_curves(str(tmp_path / "run"), tmp_path / "curves.png")
    assert _png_size(path) == CURVES_SIZE_PX
    with pytest.raises(FileNotFoundError, match="steps.csv"):
        plot_training_curves(str(tmp_path / "empty"), tmp_path / "none.png")


def test_training_curves_title_and_a_readable_single_ap_point(tmp_path: Path) -> None:
    _fake_run(tmp_path / "runs" / "distilled")
    fig = training_curves_figure(str(tmp_path / "runs" / "distilled"))
    assert fig._suptitle.get_text() == "training curves: distilled"  # the run's name, no absolute path
    ap = fig.axes[3]
    (line,) = ap.lines  # only epoch 2 has an AP: one point, drawn as a marker with its value
    assert line.get_marker() == "o" and list(line.get_xdata()) == [2]
    assert ap.get_ylim() == (0.0, pytest.approx(1.25 * 0.31)) and ap.get_xlim() == (0.0, 3.0)
    assert [t.get_text() for t in ap.texts] == ["0.310"]


def test_visualize_job_writes_overlays_heatmaps_and_curves(tmp_path: Path) -> None:
    make_synthetic_coco(tmp_path / "data", num_train=0, num_val=1, seed=0)
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "student.pt", build_model("distilpose-tiny"))
    save_checkpoint(tmp_path / "teacher.pt", build_model("tokenpose-tiny"))
    _fake_run(tmp_path / "run")
    out = tmp_path / "viz"
    result = subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "visualize.py"), "--data", str(tmp_path / "data"),
         "--checkpoint", str(tmp_path / "student.pt"), "--teacher-checkpoint", str(tmp_path / "teacher.pt"),
         "--num", "1", "--curves", str(tmp_path / "run"), "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    overlays = sorted(out.glob("overlay_*.png"))
    grids = sorted(out.glob("heatmaps_*.png"))
    assert len(overlays) == 1 and len(grids) == 1
    assert _png_size(overlays[0]) == (256, 256)  # the synthetic images' size
    assert _png_size(grids[0]) == heatmap_grid_size(17, (32, 24))
    assert _png_size(out / "curves.png") == CURVES_SIZE_PX
