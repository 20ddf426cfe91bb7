"""Rendering a cached view (pipeline.cache.render) from a small real cache."""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from distilpose.data.coco import load_instances, read_image
from distilpose.data.synthetic import make_synthetic_coco
from distilpose.data.transforms import affine_matrix, apply_view
from distilpose.data.views import view_for
from distilpose.heatmaps import fit_gaussians, render_gaussian_heatmaps
from distilpose.models import get_config
from pipeline.cache import CacheSpec, DataInfo, Manifest, TeacherInfo, open_reader, open_writer
from pipeline.cache.render import (
    RENDER_SCALE,
    blend_heatmap,
    rebuild_crop,
    render_cli,
    render_view,
    resolve_row,
    upsample_heatmap,
)

TEACHER = get_config("tokenpose-tiny")
INPUT_SIZE = tuple(TEACHER.input_size)  # (128, 96)
VIEWS = 2
SEED = 0


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("render-data")
    make_synthetic_coco(root, num_train=1, num_val=0, seed=0)
    return root


def _cache_rows(dataset: Path, store_crops: bool) -> tuple[dict, list[np.ndarray]]:
    """Teacher-like rows for the first two instances: GT-centred heatmaps and their fits."""
    instances, _ = load_instances(str(dataset / "annotations" / "person_keypoints_train.json"), input_size=INPUT_SIZE)
    rows: dict[str, list] = {}
    crops = []
    rng = np.random.default_rng(0)
    for inst in instances[:2]:
        image = read_image(str(dataset / "images" / "train"), inst.image_file)
        for v in range(VIEWS):
            view = view_for(inst, v, SEED)
            crop, joints = apply_view(image, inst.joints, view, INPUT_SIZE)
            crops.append(crop)
            heatmaps = render_gaussian_heatmaps(
                torch.from_numpy(joints[None, :, :2] / 4.0),
                TEACHER.heatmap_size,
                weights=torch.from_numpy(joints[None, :, 2]),
            )
            gauss, confidence = fit_gaussians(heatmaps)
            record = {
                "instance_id": inst.instance_id,
                "image_id": inst.image_id,
                "view": v,
                "view_params": view.to_array(),
                "affine": affine_matrix(view, INPUT_SIZE),
                "heatmaps": heatmaps[0].numpy(),
                "gauss": gauss[0].numpy(),
                "confidence": confidence[0].numpy(),
                "kpt_tokens": rng.normal(size=(17, TEACHER.dim)).astype(np.float32),
                "vis_tokens": rng.normal(size=(TEACHER.num_patches, TEACHER.dim)).astype(np.float32),
                "joints": joints[:, :2],
                "joint_weights": joints[:, 2],
            }
            if store_crops:
                buf = io.BytesIO()
                Image.fromarray(crop).save(buf, format="JPEG", quality=95)
                record["crop_jpeg"] = buf.getvalue()
            for key, value in record.items():
                rows.setdefault(key, []).append(value)
    batch = {k: (v if k == "crop_jpeg" else np.stack([np.asarray(x) for x in v])) for k, v in rows.items()}
    return batch, crops


def _write_cache(uri: Path, dataset: Path, fmt: str, store_crops: bool, record_data: bool) -> list[np.ndarray]:
    spec = CacheSpec.from_model_config(TEACHER, store_crops=store_crops)
    rows, crops = _cache_rows(dataset, store_crops)
    writer = open_writer(str(uri), spec, fmt)
    writer.write_shard(0, rows)
    data = DataInfo(
        ann_file_sha256="0" * 64,
        num_images=1,
        split="train",
        ann_file=str(dataset / "annotations" / "person_keypoints_train.json") if record_data else "",
        image_root=str(dataset / "images" / "train") if record_data else "",
    )
    teacher = TeacherInfo(preset=TEACHER.name, checkpoint_sha256="random-init", config=dataclasses.asdict(TEACHER))
    writer.finalize(Manifest(teacher=teacher, data=data, views=VIEWS, seed=SEED), expected_shards=1)
    return crops


def _png_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as im:
        im.load()
        return im.size


EXPECTED_SIZE = (INPUT_SIZE[1] * RENDER_SCALE, INPUT_SIZE[0] * RENDER_SCALE)


def test_render_rebuilds_the_crop_from_the_images(tmp_path: Path, dataset: Path) -> None:
    crops = _write_cache(tmp_path / "cache", dataset, "zarr", store_crops=False, record_data=False)
    reader = open_reader(str(tmp_path / "cache"))
    # The stored view parameters reproduce the teacher's crop exactly.
    record = reader.read_rows([3], ["image_id", "view_params"])
    rebuilt = rebuild_crop(reader.manifest, record["image_id"][0], record["view_params"][0], str(dataset))
    np.testing.assert_array_equal(rebuilt, crops[3])
    path = render_view(reader, 3, tmp_path / "view.png", data_root=str(dataset))
    assert _png_size(path) == EXPECTED_SIZE


def test_render_decodes_stored_crops_without_a_data_root(tmp_path: Path, dataset: Path) -> None:
    _write_cache(tmp_path / "cache", dataset, "wds", store_crops=True, record_data=False)
    reader = open_reader(str(tmp_path / "cache"))
    path = render_view(reader, 1, tmp_path / "out" / "view.png")
    assert _png_size(path) == EXPECTED_SIZE


def test_render_cli_uses_the_recorded_data_location(tmp_path: Path, dataset: Path) -> None:
    _write_cache(tmp_path / "cache", dataset, "zarr", store_crops=False, record_data=True)
    reader = open_reader(str(tmp_path / "cache"))
    instance_id = int(reader.read_rows([1], ["instance_id"])["instance_id"][0])  # rows: view-major
    assert resolve_row(reader, f"{instance_id}:1") == 3
    message = render_cli(str(tmp_path / "cache"), f"{instance_id}:1", tmp_path / "cli.png")
    assert "row 3" in message
    assert _png_size(tmp_path / "cli.png") == EXPECTED_SIZE


def test_render_without_crops_or_data_location_asks_for_data(tmp_path: Path, dataset: Path) -> None:
    _write_cache(tmp_path / "cache", dataset, "zarr", store_crops=False, record_data=False)
    reader = open_reader(str(tmp_path / "cache"))
    with pytest.raises(ValueError, match="--data"):
        render_view(reader, 0, tmp_path / "view.png")
    with pytest.raises(ValueError, match="INSTANCE_ID:VIEW"):
        resolve_row(reader, "first")
    with pytest.raises(IndexError):
        resolve_row(reader, "99")


def test_heatmap_cells_land_on_crop_pixels_at_the_stride() -> None:
    heatmap = np.zeros((32, 24))
    heatmap[7, 5] = 1.0  # row 7, col 5
    up = upsample_heatmap(heatmap, (128, 96))
    assert np.unravel_index(up.argmax(), up.shape) == (7 * 4, 5 * 4)
    assert up.max() == pytest.approx(1.0)
    crop = np.full((128, 96, 3), 100, np.uint8)
    blended = blend_heatmap(crop, heatmap)
    assert blended.shape == crop.shape and blended.dtype == np.uint8
    assert (blended[0, 0] == 100).all()  # zero heat leaves the crop untouched
    assert not (blended[28, 20] == 100).all()
