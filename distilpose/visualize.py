"""Pictures for looking at a model: pose overlays, teacher vs. simulated heatmaps, training curves.

- `render_pose_overlay`: skeletons drawn on an image; joint colour and size follow the
  joint's confidence (the student's raw score clipped to [0, 1]: L_CS trains it towards the
  teacher's unit-peak heatmap value, so 1 means "as sure as the teacher gets").
- `render_heatmap_grid`: per joint, the teacher's heatmap next to the student's simulated
  heatmap (the L_SH Gaussian of its coords and sigma), plus the max over joints.
- `plot_training_curves`: loss terms, learning rate, epoch loss and AP of a run's
  ``logs/steps.csv`` / ``logs/epochs.csv``.
- `visualize_predictions`: runs a student (and optionally a teacher) on data set instances
  and writes the first two kinds of PNG.

Figures are `matplotlib.figure.Figure` objects rendered by Agg (no pyplot, no global state,
no display needed). Every PNG has a size fixed by its inputs, in pixels (DPI is 100 and no
tight bounding box is used), so callers and tests know what they get.
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from torch import nn

from distilpose.coco_metrics import crop_to_image, normalized_to_crop
from distilpose.data.coco import Instance, join_uri, read_bytes, read_image
from distilpose.data.transforms import affine_matrix, apply_view, identity_view, normalize_batch
from distilpose.heatmaps import render_simulated_heatmaps
from distilpose.keypoints import KEYPOINT_NAMES, LIMBS

PathLike = str | os.PathLike

DPI = 100
CONFIDENCE_CMAP = "RdYlGn"  # red = unsure, green = sure
HEATMAP_CMAP = "magma"
LIMB_COLOR = "#39c5ff"
MIN_ALPHA = 0.15  # limbs of unsure joints stay faintly visible instead of vanishing

# Heatmap grid layout (pixels).
PAIRS_PER_ROW = 6
HEATMAP_PANEL_SCALE = 3  # heatmap cell -> pixels per panel
PANEL_TITLE_PX = 18
GRID_HEADER_PX = 28

CURVES_SIZE_PX = (1200, 800)
STEP_LOSS_COLUMNS = ("loss", "reg", "kt", "vt", "sh", "cs")


def _save(fig: Figure, png_path: PathLike) -> Path:
    path = Path(png_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, format="png")
    return path


def joint_confidence(scores: np.ndarray) -> np.ndarray:
    """Raw student scores (or teacher maxvals) -> [0, 1] for colour and marker size."""
    return np.clip(np.nan_to_num(np.asarray(scores, dtype=np.float64)), 0.0, 1.0)


# ------------------------------------------------------------------ pose overlays


def draw_pose(ax, joints: np.ndarray, confidence: np.ndarray, marker_scale: float = 1.0) -> None:
    """Draw one skeleton: limbs fade with the less confident end, joints coloured and sized
    by confidence. joints (K, 2) px (x, y); confidence (K,) in [0, 1]."""
    cmap = colormaps[CONFIDENCE_CMAP]
    for a, b in LIMBS:
        if a < len(joints) and b < len(joints):
            alpha = max(MIN_ALPHA, float(min(confidence[a], confidence[b])))
            ax.plot(joints[[a, b], 0], joints[[a, b], 1], color=LIMB_COLOR, alpha=alpha, linewidth=2 * marker_scale)
    sizes = (8 + 60 * confidence) * marker_scale**2
    ax.scatter(joints[:, 0], joints[:, 1], s=sizes, c=cmap(confidence), edgecolors="black", linewidths=0.5, zorder=3)


def render_pose_overlay(
    image: np.ndarray,
    joints: np.ndarray,
    confidence: np.ndarray,
    png_path: PathLike,
    title: str | None = None,
) -> Path:
    """Skeletons on ``image`` as a PNG of exactly the image's size.

    image (H, W, 3) uint8; joints (M, K, 2) or (K, 2) in image px; confidence (M, K) or (K,)
    in [0, 1] (see `joint_confidence`).
    """
    joints = np.asarray(joints, dtype=np.float64).reshape(-1, *np.shape(joints)[-2:])
    confidence = np.asarray(confidence, dtype=np.float64).reshape(len(joints), -1)
    height, width = image.shape[:2]
    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.imshow(image, interpolation="nearest")
    # Markers are in points; scale them with the image so small crops are not covered.
    marker_scale = float(np.clip(min(height, width) / 256, 0.5, 3.0))
    for pose, conf in zip(joints, confidence):
        draw_pose(ax, pose, conf, marker_scale)
    ax.set_xlim(-0.5, width - 0.5)
    ax.set_ylim(height - 0.5, -0.5)
    ax.set_axis_off()
    if title:
        ax.text(4, 4, title, color="white", fontsize=8, va="top", bbox={"facecolor": "black", "alpha": 0.5})
    _add_confidence_bar(fig)
    return _save(fig, png_path)


def _add_confidence_bar(fig: Figure) -> None:
    """Small inset colour bar (inside the image, so the PNG keeps the image's size)."""
    cax = fig.add_axes((0.62, 0.08, 0.34, 0.025))
    mappable = ScalarMappable(norm=Normalize(0.0, 1.0), cmap=colormaps[CONFIDENCE_CMAP])
    bar = fig.colorbar(mappable, cax=cax, orientation="horizontal", ticks=[0, 0.5, 1])
    bar.ax.tick_params(labelsize=6, colors="white", length=2, pad=1)
    bar.ax.set_title("joint confidence", fontsize=6, color="white", pad=2)


# ------------------------------------------------------------------ heatmap grids


def simulated_heatmaps(coords: torch.Tensor, sigma: torch.Tensor, heatmap_size: tuple[int, int]) -> torch.Tensor:
    """The student's L_SH heatmaps: mu = coords (in [0, 1]) x (W_hm, H_hm), its own sigma.

    coords, sigma: (N, K, 2); returns (N, K, H_hm, W_hm), peak 1.
    """
    height, width = heatmap_size
    mu = coords * torch.tensor([width, height], dtype=coords.dtype, device=coords.device)
    return render_simulated_heatmaps(mu, sigma, (height, width))


def heatmap_grid_size(num_joints: int, heatmap_size: tuple[int, int]) -> tuple[int, int]:
    """(width, height) in px of `render_heatmap_grid`'s PNG."""
    height, width = heatmap_size
    rows = math.ceil((num_joints + 1) / PAIRS_PER_ROW)  # + 1: the max-over-joints pair
    panel_w, panel_h = width * HEATMAP_PANEL_SCALE, height * HEATMAP_PANEL_SCALE
    return 2 * PAIRS_PER_ROW * panel_w, GRID_HEADER_PX + rows * (panel_h + PANEL_TITLE_PX)


def render_heatmap_grid(
    teacher: np.ndarray,
    student: np.ndarray,
    png_path: PathLike,
    joint_names: Sequence[str] = KEYPOINT_NAMES,
    title: str = "",
) -> Path:
    """Per joint, teacher heatmap (T) next to the student's simulated heatmap (S).

    teacher, student: (K, H_hm, W_hm). Both panels of a pair share one colour scale
    (0 .. the larger peak), so heights compare directly; the last pair is the max over
    joints. The PNG size is `heatmap_grid_size(K, (H_hm, W_hm))`.
    """
    teacher = np.asarray(teacher, dtype=np.float32)
    student = np.asarray(student, dtype=np.float32)
    if teacher.shape != student.shape or teacher.ndim != 3:
        raise ValueError(f"teacher {teacher.shape} and student {student.shape} heatmaps must both be (K, H, W)")
    num_joints, hm_h, hm_w = teacher.shape
    width_px, height_px = heatmap_grid_size(num_joints, (hm_h, hm_w))
    fig = Figure(figsize=(width_px / DPI, height_px / DPI), dpi=DPI)
    header = title or "heatmaps"
    fig.text(0.005, 1 - 4 / height_px, f"{header}   [T: teacher | S: student simulated]", fontsize=9, va="top")
    names = [*(joint_names[k] if k < len(joint_names) else f"joint {k}" for k in range(num_joints)), "max"]
    pairs = [*zip(teacher, student), (teacher.max(axis=0), student.max(axis=0))]
    panel_w, panel_h = hm_w * HEATMAP_PANEL_SCALE, hm_h * HEATMAP_PANEL_SCALE
    for index, ((t_map, s_map), name) in enumerate(zip(pairs, names)):
        row, col = divmod(index, PAIRS_PER_ROW)
        top = GRID_HEADER_PX + row * (panel_h + PANEL_TITLE_PX) + PANEL_TITLE_PX
        # One title per pair, centred over it: long joint names would not fit one panel.
        centre_x = (2 * col + 1) * panel_w / width_px
        fig.text(centre_x, 1 - (top - 3) / height_px, name, fontsize=7, ha="center", va="bottom")
        vmax = max(float(t_map.max()), float(s_map.max()), 1e-6)
        for side, (label, values) in enumerate((("T", t_map), ("S", s_map))):
            left = (2 * col + side) * panel_w
            ax = fig.add_axes(
                (left / width_px, 1 - (top + panel_h) / height_px, panel_w / width_px, panel_h / height_px)
            )
            ax.imshow(values, cmap=HEATMAP_CMAP, vmin=0.0, vmax=vmax, interpolation="nearest")
            ax.text(1, 1, label, color="white", fontsize=6, va="top", ha="left")
            ax.set_axis_off()
    return _save(fig, png_path)


# ------------------------------------------------------------------ training curves


def read_metrics_csv(uri: str) -> dict[str, np.ndarray]:
    """Numeric columns of a metrics CSV (local or s3://); empty / non-numeric cells -> NaN.

    Missing file -> {}. Rows may lack columns (e.g. AP only on evaluated epochs).
    """
    try:
        text = read_bytes(uri).decode()
    except FileNotFoundError:
        return {}
    rows = list(csv.DictReader(io.StringIO(text)))
    columns: dict[str, np.ndarray] = {}
    for name in rows[0] if rows else []:
        if name is None:
            continue
        values = np.array([_to_float(row.get(name)) for row in rows])
        if not np.all(np.isnan(values)):
            columns[name] = values
    return columns


def _to_float(value: str | None) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def _plot_series(ax, x: np.ndarray, columns: dict[str, np.ndarray], names: Sequence[str], log: bool) -> None:
    for name in names:
        y = columns[name]
        ok = ~np.isnan(y)
        if log:
            ok &= y > 0
        if ok.any():
            ax.plot(x[ok], y[ok], label=name, marker="o" if ok.sum() < 20 else None, markersize=3)
    if log and ax.lines:
        ax.set_yscale("log")
    if ax.lines:
        ax.legend(fontsize=7)
    ax.grid(alpha=0.3)


def _plot_ap(ax, epochs: np.ndarray, columns: dict[str, np.ndarray], names: Sequence[str]) -> None:
    """AP per evaluated epoch on a 0-based axis, readable with a single point: markers, the
    values written next to a few points, and x from epoch 0 to the last epoch."""
    _plot_series(ax, epochs, columns, names, log=False)
    for line in ax.lines:
        x, y = line.get_data()
        line.set_marker("o")
        line.set_markersize(5)
        if len(x) <= 5:
            for xi, yi in zip(x, y, strict=True):
                ax.annotate(f"{yi:.3f}", (xi, yi), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=7)
    top = max((float(np.max(line.get_ydata())) for line in ax.lines), default=0.0)
    ax.set_ylim(0.0, min(1.0, max(0.1, 1.25 * top)))
    if len(epochs):
        ax.set_xlim(0, float(np.nanmax(epochs)) + 1)
    if ax.lines:
        ax.legend(fontsize=7, loc="upper left")  # the points are on the right: late epochs
    ax.set(title="validation AP (evaluated epochs)", xlabel="epoch")


def plot_training_curves(run_dir: str, png_path: PathLike) -> Path:
    """Loss terms / lr per step and train loss / AP per epoch of ``run_dir``/logs as one PNG
    (CURVES_SIZE_PX). Raises FileNotFoundError when neither CSV exists."""
    return _save(training_curves_figure(run_dir), png_path)


def training_curves_figure(run_dir: str) -> Figure:
    """The figure `plot_training_curves` writes."""
    steps_uri = join_uri(str(run_dir), "logs/steps.csv")
    epochs_uri = join_uri(str(run_dir), "logs/epochs.csv")
    steps, epochs = read_metrics_csv(steps_uri), read_metrics_csv(epochs_uri)
    if not steps and not epochs:
        raise FileNotFoundError(f"no training metrics: neither {steps_uri} nor {epochs_uri} has rows")
    width, height = CURVES_SIZE_PX
    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI)
    axes = fig.subplots(2, 2)
    # The run's name, not its path: an absolute path is long and says nothing about the run.
    fig.suptitle(f"training curves: {str(run_dir).rstrip('/').rsplit('/', 1)[-1]}", fontsize=10)

    step_x = steps.get("step", np.arange(len(next(iter(steps.values()), []))))
    loss_names = [c for c in STEP_LOSS_COLUMNS if c in steps]
    _plot_series(axes[0, 0], step_x, steps, loss_names, log=True)
    axes[0, 0].set(title="loss terms per step (weighted)", xlabel="step")
    _plot_series(axes[0, 1], step_x, steps, [c for c in ("lr",) if c in steps], log=False)
    axes[0, 1].set(title="learning rate", xlabel="step")

    epoch_x = epochs.get("epoch", np.arange(1, len(next(iter(epochs.values()), [])) + 1))
    loss_cols = [c for c in epochs if "loss" in c]
    _plot_series(axes[1, 0], epoch_x, epochs, loss_cols, log=True)
    axes[1, 0].set(title="loss per epoch", xlabel="epoch")
    ap_cols = [c for c in epochs if c.startswith("AP") or c.startswith("AR")]
    _plot_ap(axes[1, 1], epoch_x, epochs, [c for c in ap_cols if c in ("AP", "AP50", "AP75")])
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.07, top=0.91, hspace=0.35, wspace=0.18)
    return fig


# ------------------------------------------------------------------ running models on instances


@dataclass
class InstancePrediction:
    instance: Instance
    crop: np.ndarray  # (H, W, 3) uint8, the un-augmented view the models saw
    coords_image: np.ndarray  # (K, 2) image px
    confidence: np.ndarray  # (K,) in [0, 1]
    student_heatmaps: np.ndarray  # (K, H_hm, W_hm) simulated from coords and sigma
    teacher_heatmaps: np.ndarray | None  # (K, H_hm, W_hm) raw teacher output


def _check_pair(student: nn.Module, teacher: nn.Module | None) -> None:
    if student.config.kind != "student":
        raise ValueError(f"expected a student model, got a {student.config.kind} ({student.config.name})")
    if teacher is None:
        return
    if teacher.config.kind != "teacher":
        raise ValueError(f"expected a teacher model, got a {teacher.config.kind} ({teacher.config.name})")
    for name in ("input_size", "heatmap_size", "num_joints"):
        if getattr(teacher.config, name) != getattr(student.config, name):
            raise ValueError(
                f"teacher {teacher.config.name} and student {student.config.name} differ in {name}: "
                f"{getattr(teacher.config, name)} vs {getattr(student.config, name)}"
            )


@torch.inference_mode()
def predict_instances(
    student: nn.Module, instances: Sequence[Instance], image_root: str, teacher: nn.Module | None = None
) -> list[InstancePrediction]:
    """Run the student (and teacher) on the un-augmented crop of every instance."""
    _check_pair(student, teacher)
    student.eval()
    if teacher is not None:
        teacher.eval()
    input_size = tuple(student.config.input_size)
    images: dict[int, np.ndarray] = {}
    predictions = []
    for instance in instances:
        if instance.image_id not in images:
            images[instance.image_id] = read_image(image_root, instance.image_file)
        view = identity_view(instance)
        crop, _ = apply_view(images[instance.image_id], instance.joints, view, input_size)
        batch = normalize_batch(crop[None])
        out = student(batch)
        coords_crop = normalized_to_crop(out.coords.numpy(), input_size)
        coords_image = crop_to_image(coords_crop, affine_matrix(view, input_size)[None])[0]
        teacher_maps = teacher(batch).heatmaps[0].numpy() if teacher is not None else None
        predictions.append(
            InstancePrediction(
                instance=instance,
                crop=crop,
                coords_image=coords_image,
                confidence=joint_confidence(out.score[0].numpy()),
                student_heatmaps=simulated_heatmaps(out.coords, out.sigma, student.config.heatmap_size)[0].numpy(),
                teacher_heatmaps=teacher_maps,
            )
        )
    return predictions


def visualize_predictions(
    student: nn.Module,
    instances: Sequence[Instance],
    image_root: str,
    out_dir: PathLike,
    teacher: nn.Module | None = None,
    num: int = 8,
) -> list[Path]:
    """Write ``overlay_<image_id>.png`` (all chosen instances of an image) and, with a teacher,
    ``heatmaps_<instance_id>.png`` for the first ``num`` instances. Returns the PNG paths."""
    out_dir = Path(out_dir)
    predictions = predict_instances(student, list(instances)[:num], image_root, teacher)
    by_image: dict[int, list[InstancePrediction]] = {}
    for p in predictions:
        by_image.setdefault(p.instance.image_id, []).append(p)
    written = []
    for image_id, preds in by_image.items():
        image = read_image(image_root, preds[0].instance.image_file)
        written.append(
            render_pose_overlay(
                image,
                np.stack([p.coords_image for p in preds]),
                np.stack([p.confidence for p in preds]),
                out_dir / f"overlay_{image_id}.png",
                title=f"{student.config.name}: image {image_id}, {len(preds)} person(s)",
            )
        )
    for p in predictions:
        if p.teacher_heatmaps is not None:
            written.append(
                render_heatmap_grid(
                    p.teacher_heatmaps,
                    p.student_heatmaps,
                    out_dir / f"heatmaps_{p.instance.instance_id}.png",
                    title=f"instance {p.instance.instance_id}: teacher {teacher.config.name} vs "
                    f"{student.config.name} simulated",
                )
            )
    return written
