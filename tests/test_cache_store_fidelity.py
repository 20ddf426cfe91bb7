"""Cached heatmaps equal the online teacher's output within the bound the cache states,
negative values included: a real teacher forward on real crops, encoded with the default
encodings, decoded, compared with the same forward.

The teacher is the BatchNorm-calibrated `tiny_teacher` (its raw heatmaps, like a trained
teacher's, are partly negative).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from distilpose.data.coco import load_instances, read_image
from distilpose.data.synthetic import make_synthetic_coco
from distilpose.data.transforms import apply_view
from distilpose.data.views import view_for
from distilpose.models import get_config
from distilpose.teacher_forward import AUTOCAST_DTYPES, build_teacher, run_teacher
from pipeline.cache.encodings import decode_field, encode_field, error_bound
from pipeline.cache.schema import (
    DEFAULT_HEATMAP_ENCODING,
    HEATMAP_ENCODINGS,
    HEATMAP_FIELD,
    SCALE_SUFFIX,
    TEACHER_PRECISIONS,
    CacheSpec,
)

TEACHER = "tokenpose-tiny"


@pytest.fixture(scope="module")
def crops(tmp_path_factory) -> np.ndarray:
    root: Path = tmp_path_factory.mktemp("fidelity-data")
    make_synthetic_coco(str(root), num_train=3, num_val=0, seed=4)
    input_size = tuple(get_config(TEACHER).input_size)
    instances, _ = load_instances(str(root / "annotations" / "person_keypoints_train.json"), input_size=input_size)
    out = []
    for inst in instances[:4]:
        image = read_image(str(root / "images" / "train"), inst.image_file)
        out += [apply_view(image, inst.joints, view_for(inst, v, seed=0), input_size)[0] for v in range(2)]
    return np.stack(out)


def test_default_heatmap_encoding_keeps_the_teachers_negative_values(crops, tiny_teacher) -> None:
    spec = CacheSpec.from_model_config(get_config(TEACHER))
    assert spec.heatmap_encoding == DEFAULT_HEATMAP_ENCODING == "i8-thresh"
    online = run_teacher(build_teacher(TEACHER, tiny_teacher), crops, 4, torch.device("cpu"))[HEATMAP_FIELD]
    raw = encode_field(HEATMAP_FIELD, online, spec)
    cached = decode_field(HEATMAP_FIELD, raw, spec)

    # The bound as the manifest states it: per (view, joint), max(threshold, step) x scale,
    # scale = the stored per-(view, joint) max |x| (rounded up to fp16).
    encoding = HEATMAP_ENCODINGS[spec.heatmap_encoding]
    scale = raw[HEATMAP_FIELD + SCALE_SUFFIX].astype(np.float32)[..., None, None]
    stated = max(encoding.threshold, encoding.step) * scale * (1 + 1e-6)
    assert encoding.signed and np.all(np.abs(cached - online) <= stated)
    assert np.all(np.abs(cached - online) <= error_bound(HEATMAP_FIELD, online, spec))

    # Negatives exist above the threshold, and they are cached with their sign and value.
    negative = online < -encoding.threshold * scale
    assert negative.mean() > 0.05, f"only {negative.mean():.1%} clearly negative values: the test would be weak"
    assert np.all(cached[negative] < 0)
    # The previous default stored them as 0: far outside this bound.
    old = dict(spec.to_dict(), heatmap_encoding="u8-thresh")
    old_spec = CacheSpec.from_dict(old)
    clipped = decode_field(HEATMAP_FIELD, encode_field(HEATMAP_FIELD, online, old_spec), old_spec)
    assert np.any(np.abs(clipped - online) > 2 * stated)


def test_teacher_precisions_are_the_ones_the_forward_runs() -> None:
    assert set(TEACHER_PRECISIONS) == set(AUTOCAST_DTYPES)
    with pytest.raises(ValueError, match="teacher precision 'tf32'"):
        run_teacher(None, np.zeros((1, 8, 8, 3), np.uint8), 1, torch.device("cpu"), precision="tf32")


def test_manifest_states_the_bound_and_the_teacher_precision(tmp_path) -> None:
    from pipeline.cache import DataInfo, Manifest, TeacherInfo
    from pipeline.teacher_stage import CacheJobConfig

    spec = CacheSpec.from_model_config(get_config(TEACHER))
    teacher = TeacherInfo(preset=TEACHER, checkpoint_sha256="c" * 64, precision="bf16")
    manifest = Manifest(teacher=teacher, data=DataInfo("d" * 64, 3, "train"), views=2, seed=0, spec=spec)
    doc = manifest.to_dict()
    heatmaps = doc["encodings"]["heatmaps"]
    assert heatmaps["name"] == "i8-thresh" and heatmaps["signed"] and heatmaps["threshold"] == 0.01
    assert heatmaps["step"] == 1 / 254 and "sign kept" in heatmaps["error_bound"]
    assert doc["teacher"]["precision"] == "bf16" and doc["teacher_precision"]["heatmap_tolerance"] == 0.08
    assert Manifest.from_json(manifest.to_json()).teacher.precision == "bf16"
    # A manifest from before the precision was recorded is taken as bf16 (GPU builds were).
    del doc["teacher"]["precision"]
    assert Manifest.from_dict(doc).teacher.effective_precision == "bf16"
    assert CacheJobConfig(data="d", teacher="t", out="o").teacher_precision == "fp32"
    with pytest.raises(ValueError, match="CacheJobConfig.teacher_precision"):
        CacheJobConfig(data="d", teacher="t", out="o", teacher_precision="tf32")
