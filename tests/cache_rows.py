"""Teacher-like cache rows and small-cache helpers shared by the cache store tests."""

from __future__ import annotations

import numpy as np

from pipeline.cache import (
    CacheSpec,
    DataInfo,
    Manifest,
    TeacherInfo,
    open_writer,
)
from pipeline.cache.encodings import error_bound
from pipeline.cache.schema import (
    CROP_FIELD,
    HEATMAP_FIELD,
    TOKEN_FIELDS,
)

SMALL_SPEC = CacheSpec(num_joints=17, heatmap_size=(16, 12), dim=8, num_patches=12, store_crops=True)
PAPER_SPEC = CacheSpec(num_joints=17, heatmap_size=(64, 48), dim=192, num_patches=256)
KIB = 1024
VIEW_BUDGET_BYTES = 64 * KIB
FORMATS = ["zarr", "wds"]


def teacher_like_rows(spec: CacheSpec, n: int, seed: int = 0, first_instance: int = 0, views: int = 4) -> dict:
    """fp32 record batch resembling teacher output: Gaussian blobs (sigma 1.5-3 px, peak
    0.3-1) over an N(0, 0.003) noise floor, random-normal tokens, random geometry. Rows are
    instance-major (each instance's ``views`` views in turn); a whole shard needs n % views == 0."""
    rng = np.random.default_rng(seed)
    k = spec.num_joints
    height, width = spec.heatmap_size
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    mu = rng.uniform([1, 1], [width - 2, height - 2], size=(n, k, 2)).astype(np.float32)
    sigma = rng.uniform(1.5, 3.0, size=(n, k, 2)).astype(np.float32)
    peak = rng.uniform(0.3, 1.0, size=(n, k)).astype(np.float32)
    dx = (xs - mu[..., 0, None, None]) / sigma[..., 0, None, None]
    dy = (ys - mu[..., 1, None, None]) / sigma[..., 1, None, None]
    heatmaps = peak[..., None, None] * np.exp(-0.5 * (dx**2 + dy**2))
    heatmaps = (heatmaps + rng.normal(0, 0.003, size=heatmaps.shape)).astype(np.float32)
    rows = {
        "instance_id": first_instance + np.arange(n) // views,
        "image_id": (first_instance + np.arange(n)) // 8,
        "view": np.arange(n) % views,
        "view_params": rng.normal(size=(n, 7)).astype(np.float32),
        "affine": rng.normal(size=(n, 2, 3)).astype(np.float32),
        "heatmaps": heatmaps,
        "gauss": np.concatenate([mu, sigma], axis=-1),
        "confidence": peak,
        "kpt_tokens": rng.standard_normal((n, k, spec.dim), dtype=np.float32),
        "vis_tokens": rng.standard_normal((n, spec.num_patches, spec.dim), dtype=np.float32),
        "joints": (mu * 4).astype(np.float32),
        "joint_weights": (rng.random((n, k)) > 0.2).astype(np.float32),
    }
    if spec.store_crops:
        rows[CROP_FIELD] = [rng.bytes(int(rng.integers(1, 300))) for _ in range(n)]
    return rows


def base_manifest(views: int = 4) -> Manifest:
    return Manifest(
        teacher=TeacherInfo(preset="tokenpose-tiny", checkpoint_sha256="a" * 64, config={"dim": 8}),
        data=DataInfo(ann_file_sha256="d" * 64, num_images=10, split="train"),
        views=views,
        seed=7,
    )


def write_cache(uri: str, fmt: str, shard_rows=(20, 12), spec: CacheSpec = SMALL_SPEC, views: int = 4) -> list[dict]:
    """A finalized cache of teacher-like shards; returns each shard's rows in view order
    (the order the cache stores and reads them back in)."""
    writer = open_writer(uri, spec, fmt)
    batches, start = [], 0
    for index, n in enumerate(shard_rows):
        rows = teacher_like_rows(spec, n, seed=index, first_instance=start, views=views)
        writer.write_shard(index, rows)
        batches.append(in_view_order(rows))
        start += n
    writer.finalize(base_manifest(views), expected_shards=len(shard_rows))
    return batches


def in_view_order(rows: dict) -> dict:
    """A shard's rows as the cache holds them: view-major, each view's rows in the given order."""
    order = np.argsort(np.asarray(rows["view"]), kind="stable")
    return {k: ([v[i] for i in order] if k == CROP_FIELD else v[order]) for k, v in rows.items()}


def concat_rows(batches: list[dict]) -> dict:
    return {
        k: (sum((b[k] for b in batches), []) if k == CROP_FIELD else np.concatenate([b[k] for b in batches]))
        for k in batches[0]
    }


def assert_raw_equal(actual: dict, expected: dict) -> None:
    assert sorted(actual) == sorted(expected)
    for name, value in expected.items():
        if name == CROP_FIELD:
            assert list(actual[name]) == list(value)
        else:
            assert actual[name].dtype == value.dtype, name
            np.testing.assert_array_equal(actual[name], value, err_msg=name)


def assert_decoded_close(decoded: dict, rows: dict, spec: CacheSpec) -> None:
    for name, value in rows.items():
        if name == CROP_FIELD:
            assert list(decoded[name]) == list(value)
        elif name == HEATMAP_FIELD or name in TOKEN_FIELDS:
            assert decoded[name].dtype == np.float32
            assert np.all(np.abs(decoded[name] - value) <= error_bound(name, value, spec)), name
        else:
            np.testing.assert_array_equal(decoded[name], value, err_msg=name)
