"""pipeline.cache.verify.spot_check: re-running the teacher on cached views passes a correct
cache and catches one whose bytes are intact but whose content is wrong.

The cache is written directly with the store (no Ray) from the real teacher's outputs, the
way the teacher stage writes it; the teacher is the BatchNorm-calibrated `tiny_teacher`,
whose outputs differ from crop to crop.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from distilpose.data.coco import load_instances, read_image
from distilpose.data.synthetic import make_synthetic_coco
from distilpose.data.transforms import affine_matrix, apply_view
from distilpose.data.views import view_for
from distilpose.models import get_config
from distilpose.teacher_forward import build_teacher, run_teacher
from pipeline import storage
from pipeline.cache import CacheSpec, DataInfo, Manifest, TeacherInfo, open_writer
from pipeline.cache.verify import spot_check

TEACHER = "tokenpose-tiny"
VIEWS = 2


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("spot-data")
    make_synthetic_coco(str(root), num_train=3, num_val=0, seed=2)
    return root


def _write_cache(
    out: Path, data: Path, checkpoint: str, mix_rows: bool = False, precision: str = "fp32", recorded: str = ""
) -> str:
    """A one-shard cache of every instance x VIEWS views, the teacher run in `precision` and
    the manifest saying `recorded` (default: the same); `mix_rows` gives each view the
    teacher outputs of the next row (a cache whose content is wrong but whose checksums hold)."""
    config = get_config(TEACHER)
    input_size = tuple(config.input_size)
    ann_file, image_root = str(data / "annotations" / "person_keypoints_train.json"), str(data / "images" / "train")
    instances, _ = load_instances(ann_file, input_size=input_size)
    rows: dict[str, list] = {k: [] for k in ("instance_id", "image_id", "view", "view_params", "affine", "joints")}
    crops = []
    for inst in instances:
        image = read_image(image_root, inst.image_file)
        for v in range(VIEWS):
            view = view_for(inst, v, seed=0)
            crop, joints = apply_view(image, inst.joints, view, input_size)
            crops.append(crop)
            rows["instance_id"].append(inst.instance_id)
            rows["image_id"].append(inst.image_id)
            rows["view"].append(v)
            rows["view_params"].append(view.to_array())
            rows["affine"].append(affine_matrix(view, input_size))
            rows["joints"].append(joints)
    record = {k: np.asarray(v) for k, v in rows.items()}
    record["joint_weights"] = record["joints"][..., 2].astype(np.float32)
    record["joints"] = record["joints"][..., :2].astype(np.float32)
    model = build_teacher(TEACHER, checkpoint)
    outputs = run_teacher(model, np.stack(crops), 8, torch.device("cpu"), precision=precision)
    if mix_rows:
        outputs = {k: np.roll(v, 1, axis=0) for k, v in outputs.items()}
    record.update(outputs)
    spec = CacheSpec.from_model_config(config)
    writer = open_writer(str(out), spec, "zarr")
    writer.write_shard(0, record)
    fingerprint = storage.sha256(ann_file)
    manifest = Manifest(
        teacher=TeacherInfo(
            preset=TEACHER, checkpoint_sha256=storage.sha256(checkpoint), precision=recorded or precision
        ),
        data=DataInfo(fingerprint, 3, "train", ann_file=ann_file, image_root=image_root),
        views=VIEWS,
        seed=0,
    )
    writer.finalize(manifest, expected_shards=1)
    return str(out)


def test_spot_check_passes_a_correct_cache(data, tiny_teacher, tmp_path) -> None:
    cache = _write_cache(tmp_path / "good", data, tiny_teacher)
    check = spot_check(cache, 6, checkpoint=tiny_teacher, batch_size=4)
    assert check.ok, check.summary()
    assert len(check.rows) == 6 and "OK" in check.summary()


def test_spot_check_catches_views_with_another_views_outputs(data, tiny_teacher, tmp_path) -> None:
    cache = _write_cache(tmp_path / "mixed", data, tiny_teacher, mix_rows=True)
    check = spot_check(cache, 6, checkpoint=tiny_teacher, batch_size=4)
    assert not check.ok and "MISMATCH" in check.summary()
    worst = max(check.max_abs[k] / check.tolerance[k] for k in check.max_abs)
    assert worst > 2, check.summary()  # far outside the tolerance, not a rounding accident


def test_spot_check_refuses_a_checkpoint_the_cache_was_not_built_with(data, tiny_teacher, tmp_path) -> None:
    cache = _write_cache(tmp_path / "good", data, tiny_teacher)
    other = tmp_path / "other.pt"
    other.write_bytes(Path(tiny_teacher).read_bytes() + b"\0")
    with pytest.raises(ValueError, match="not the teacher this cache was built with"):
        spot_check(cache, 2, checkpoint=str(other))
    with pytest.raises(ValueError, match="needs --checkpoint"):
        spot_check(cache, 2)


def test_spot_check_tolerance_follows_the_recorded_precision(data, tiny_teacher, tmp_path) -> None:
    """A bf16 cache passes with the bf16 tolerance; fp32 gets the tight one, which the same
    bf16 outputs fail when the manifest claims fp32."""
    fp32 = spot_check(_write_cache(tmp_path / "fp32", data, tiny_teacher), 6, checkpoint=tiny_teacher)
    bf16 = spot_check(_write_cache(tmp_path / "bf16", data, tiny_teacher, precision="bf16"), 6, checkpoint=tiny_teacher)
    assert fp32.ok and fp32.precision == "fp32", fp32.summary()
    assert bf16.ok and bf16.precision == "bf16" and "a bf16 cache" in bf16.summary(), bf16.summary()
    for name in fp32.tolerance:
        assert fp32.tolerance[name] < bf16.tolerance[name] / 2, name
        # Same crops, same fp32 forward: only the encoding separates an fp32 cache from it.
        assert fp32.max_abs[name] < bf16.max_abs[name], name
    mislabeled = _write_cache(tmp_path / "bf16-as-fp32", data, tiny_teacher, precision="bf16", recorded="fp32")
    # This tiny teacher's bf16 drift is about the size of the fp32 tolerance (which is relative
    # to the largest value among the views checked): measured, 5 of 12 samples of 6 views
    # exceed it. Eight fixed samples: some fail as fp32, every one passes as bf16.
    checks = [spot_check(mislabeled, 6, checkpoint=tiny_teacher, seed=seed) for seed in range(8)]
    assert sum(not c.ok and "MISMATCH" in c.summary() for c in checks) >= 2, [c.summary() for c in checks]
    as_bf16 = _write_cache(tmp_path / "bf16-again", data, tiny_teacher, precision="bf16")
    assert all(spot_check(as_bf16, 6, checkpoint=tiny_teacher, seed=seed).ok for seed in range(8))


def test_spot_check_of_a_cache_without_recorded_precision_allows_bf16(data, tiny_teacher, tmp_path) -> None:
    cache = _write_cache(tmp_path / "old", data, tiny_teacher, precision="bf16")
    manifest_path = Path(cache) / "manifest.json"
    doc = json.loads(manifest_path.read_text())
    del doc["teacher"]["precision"]  # as written before the precision was recorded
    manifest_path.write_text(json.dumps(doc))
    check = spot_check(cache, 6, checkpoint=tiny_teacher)
    assert check.ok and check.precision == "bf16", check.summary()
