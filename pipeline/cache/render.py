"""Draw one cached view: the crop the teacher saw, its heatmaps, and the fitted Gaussians.

    reader = open_reader("runs/cache")
    render_view(reader, reader.locate(instance_id, 0), "view.png", data_root="data/synthetic")

The crop is the stored JPEG when the cache has crops, else it is rebuilt from the source
image with the stored view parameters (the same `crop_of_view` the spot check and the
student loader use, so a wrong picture means a wrong cache). Heatmaps are shown as their
max over joints, colour-mapped and alpha-blended (alpha grows with the value, so the crop
stays visible where the teacher sees nothing); ellipses mark each joint's fitted Gaussian
at mu with 2-sigma radii. Heatmap px map to crop px by ``crop = hm * (W_in / W_hm)``
(mmpose convention, no half-pixel offset).
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.patches import Ellipse
from PIL import Image

from distilpose.data.coco import load_coco, read_image
from distilpose.data.transforms import ViewParams, crop_of_view
from distilpose.keypoints import KEYPOINT_NAMES
from pipeline.cache.base import CacheReader
from pipeline.cache.manifest import Manifest
from pipeline.cache.schema import CROP_FIELD

PathLike = str | os.PathLike

RENDER_FIELDS = ("instance_id", "image_id", "view", "view_params", "heatmaps", "gauss", "confidence")
DPI = 100
RENDER_SCALE = 4  # output px per crop px: tiny-preset crops (128 x 96) are otherwise unreadable
HEATMAP_ALPHA = 0.6
HEATMAP_CMAP = "jet"
JOINT_CMAP = "tab20"
SIGMA_RADII = 2.0
BACKBONE_STRIDE = 4  # fallback when the manifest does not record the teacher's input size


def cache_input_size(manifest: Manifest) -> tuple[int, int]:
    """(H, W) of the crops the teacher saw: from the recorded teacher config, else stride x heatmap."""
    recorded = (manifest.teacher.config or {}).get("input_size")
    if recorded:
        return int(recorded[0]), int(recorded[1])
    height, width = manifest.spec.heatmap_size
    return height * BACKBONE_STRIDE, width * BACKBONE_STRIDE


def resolve_row(reader: CacheReader, ident: str | int) -> int:
    """A global row from ``"ROW"`` or ``"INSTANCE_ID:VIEW"``."""
    text = str(ident).strip()
    try:
        if ":" in text:
            instance_id, view = text.split(":", 1)
            return reader.locate(int(instance_id), int(view))
        row = int(text)
    except ValueError:
        raise ValueError(f"render id {ident!r}: expected a row number or INSTANCE_ID:VIEW") from None
    if not 0 <= row < len(reader):
        raise IndexError(f"row {row} is outside the cache's {len(reader)} rows")
    return row


def _image_source(manifest: Manifest, data_root: str | None) -> tuple[str, str]:
    """(annotation file, image root) for the cache's split: under ``data_root`` if given, else
    the locations the teacher stage recorded in the manifest."""
    if data_root:
        from pipeline.dataset_layout import resolve_layout

        layout = resolve_layout(data_root, manifest.data.split)
        return layout.ann_file, layout.image_root
    ann_file, image_root = manifest.data.ann_file, manifest.data.image_root
    if not ann_file or not image_root:
        raise ValueError(
            "this cache stores no crops and its manifest records no data location; pass the data set "
            "root (--data DIR) to rebuild the crop from the image"
        )
    return ann_file, image_root


def rebuild_crop(
    manifest: Manifest, image_id: int, view_params: np.ndarray, data_root: str | None = None
) -> np.ndarray:
    """The view's crop (H, W, 3) uint8 from the source image and the stored view parameters."""
    ann_file, image_root = _image_source(manifest, data_root)
    _, images = load_coco(ann_file)
    if int(image_id) not in images:
        raise KeyError(f"image_id {int(image_id)} of the cache is not in {ann_file}; is --data the right data set?")
    image = read_image(image_root, images[int(image_id)].file_name)
    return crop_of_view(image, view_params, cache_input_size(manifest))


def _decode_jpeg(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(bytes(data))) as im:
        return np.asarray(im.convert("RGB"))


def _interpolation_matrix(out_len: int, in_len: int, stride: float) -> np.ndarray:
    """(out_len, in_len) linear interpolation from heatmap cells to crop pixels (x_hm = x_crop / stride)."""
    position = np.clip(np.arange(out_len) / stride, 0, in_len - 1)
    lower = np.floor(position).astype(int)
    upper = np.minimum(lower + 1, in_len - 1)
    frac = position - lower
    matrix = np.zeros((out_len, in_len))
    matrix[np.arange(out_len), lower] += 1 - frac
    matrix[np.arange(out_len), upper] += frac
    return matrix


def upsample_heatmap(heatmap: np.ndarray, crop_size: tuple[int, int]) -> np.ndarray:
    """(H_hm, W_hm) -> (H, W) bilinear, aligned so heatmap cell (u, v) lands on crop px (u*s_x, v*s_y)."""
    hm_h, hm_w = heatmap.shape
    height, width = crop_size
    rows = _interpolation_matrix(height, hm_h, height / hm_h)
    cols = _interpolation_matrix(width, hm_w, width / hm_w)
    return rows @ heatmap.astype(np.float64) @ cols.T


def blend_heatmap(crop: np.ndarray, heatmap: np.ndarray, alpha: float = HEATMAP_ALPHA) -> np.ndarray:
    """Colour-mapped heatmap over the crop, uint8 (H, W, 3). The map is scaled to its own peak
    (negative values read as 0); per-pixel opacity is ``alpha`` x value."""
    values = np.clip(upsample_heatmap(heatmap, crop.shape[:2]), 0.0, None)
    peak = values.max()
    values = values / peak if peak > 0 else values
    colours = colormaps[HEATMAP_CMAP](values)[..., :3]
    opacity = (alpha * values)[..., None]
    blended = crop.astype(np.float64) / 255.0 * (1 - opacity) + colours * opacity
    return np.round(blended * 255).clip(0, 255).astype(np.uint8)


def draw_gaussians(ax, gauss: np.ndarray, confidence: np.ndarray, stride: tuple[float, float]) -> None:
    """Ellipses at mu with SIGMA_RADII-sigma radii, joints with confidence 0 left out;
    gauss (K, 4) heatmap px -> crop px by ``stride`` (x, y)."""
    cmap = colormaps[JOINT_CMAP]
    sx, sy = stride
    for k, (mu_x, mu_y, sigma_x, sigma_y) in enumerate(gauss):
        if confidence[k] <= 0:
            continue  # fit_gaussians marks flat maps (nothing fitted) with confidence 0
        colour = cmap(k % cmap.N)
        alpha = float(np.clip(confidence[k], 0.3, 1.0))
        centre = (mu_x * sx, mu_y * sy)
        ax.add_patch(
            Ellipse(
                centre,
                width=2 * SIGMA_RADII * sigma_x * sx,
                height=2 * SIGMA_RADII * sigma_y * sy,
                fill=False,
                edgecolor=colour,
                alpha=alpha,
                linewidth=1.5,
            )
        )
        ax.plot(*centre, marker="+", color=colour, alpha=alpha, markersize=6)
        name = KEYPOINT_NAMES[k] if k < len(KEYPOINT_NAMES) else str(k)
        ax.annotate(name, centre, xytext=(3, 3), textcoords="offset points", fontsize=6, color=colour, alpha=alpha)


def render_view(
    reader: CacheReader, row: int, png_path: PathLike, data_root: str | None = None, scale: int = RENDER_SCALE
) -> Path:
    """PNG of cached row ``row`` (global row number), ``scale`` x the crop size.

    ``data_root``: data set root to rebuild the crop from (needed when the cache stores no
    crops, unless the manifest records where the images were).
    """
    store_crops = reader.spec.store_crops
    fields = RENDER_FIELDS + ((CROP_FIELD,) if store_crops else ())
    record = {name: values[0] for name, values in reader.read_rows([row], fields).items()}
    if store_crops and len(record[CROP_FIELD]):
        crop = _decode_jpeg(record[CROP_FIELD])
    else:
        crop = rebuild_crop(reader.manifest, record["image_id"], record["view_params"], data_root)
    height, width = crop.shape[:2]
    hm_h, hm_w = record["heatmaps"].shape[-2:]

    fig = Figure(figsize=(width * scale / DPI, height * scale / DPI), dpi=DPI)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.imshow(blend_heatmap(crop, record["heatmaps"].max(axis=0)), interpolation="nearest")
    draw_gaussians(ax, record["gauss"], record["confidence"], (width / hm_w, height / hm_h))
    ax.set_xlim(-0.5, width - 0.5)
    ax.set_ylim(height - 0.5, -0.5)
    ax.set_axis_off()
    view = ViewParams.from_array(record["view_params"])
    ax.text(
        4 / scale,
        4 / scale,
        f"row {row}: instance {int(record['instance_id'])} view {int(record['view'])} "
        f"(rot {view.rotation:.0f}, flip {int(view.flip)}), mean conf {float(np.mean(record['confidence'])):.2f}",
        color="white",
        fontsize=8,
        va="top",
        bbox={"facecolor": "black", "alpha": 0.5},
    )
    path = Path(png_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, format="png")
    return path


def render_cli(uri: str, ident: str, png_path: PathLike, data_root: str | None = None) -> str:
    """``inspect --render ID --png FILE [--data DIR]``: render and say what was written."""
    from pipeline.cache import open_reader

    reader = open_reader(uri)
    row = resolve_row(reader, ident)
    path = render_view(reader, row, png_path, data_root)
    return f"wrote {path} (row {row})"
