"""A cache whose fields follow the teacher: a heatmap teacher without tokens (SimpleBaseline)
writes heatmaps, Gaussians and confidences only; a loss or student that needs a field the
cache lacks is refused before Ray starts; DeepPose distils from it through jobs/distill.py."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from pipeline_fixtures import ensure_local_ray, load_job, read_csv, run_job

from distilpose.data.coco import load_coco, load_instances, read_image
from distilpose.data.transforms import apply_view
from distilpose.data.views import view_for
from distilpose.errors import UserError
from distilpose.models import get_config
from distilpose.teacher_forward import build_teacher, run_teacher
from pipeline.cache import open_reader
from pipeline.cache.encodings import decode_field, encode_field
from pipeline.cache.schema import CacheSpec, field_names, stored_arrays
from pipeline.distill import DistillConfig, check_cache_for_run
from pipeline.teacher_stage import CacheJobConfig, run_cache_job

TEACHER = "simplebaseline-tiny"
TEACHER_OUTPUTS = ["heatmaps", "gauss", "confidence"]


@pytest.fixture(scope="module")
def sb_caches(tiny_data, s3_server, tmp_path_factory) -> dict[str, str]:
    """Caches of a seeded random simplebaseline-tiny over the first 16 train instances
    (2 shards x 2 views), one per store format, built by the cache job's in-process engine."""
    root = tmp_path_factory.mktemp("sb-cache")
    caches = {}
    for fmt in ("zarr", "wds"):
        out = str(root / fmt)
        cfg = CacheJobConfig(
            data=tiny_data,
            teacher=TEACHER,
            out=out,
            format=fmt,
            views=2,
            shard_instances=8,
            batch_size=8,
            limit=16,
            engine="in-process",
        )
        assert run_cache_job(cfg).complete
        caches[fmt] = out
    return caches


def test_spec_of_a_teacher_without_tokens_has_no_token_arrays() -> None:
    spec = CacheSpec.from_model_config(get_config(TEACHER))
    assert not spec.tokens and spec.dim == 0 and spec.num_patches == 0
    assert not {"kpt_tokens", "vis_tokens"} & set(field_names(spec))
    assert not any(name.startswith(("kpt_tokens", "vis_tokens")) for name in stored_arrays(spec))
    # A TokenPose cache's spec, and manifests written before the field existed, keep their tokens.
    token_spec = CacheSpec.from_model_config(get_config("tokenpose-tiny"))
    assert token_spec.tokens and {"kpt_tokens", "vis_tokens"} <= set(field_names(token_spec))
    old = {k: v for k, v in token_spec.to_dict().items() if k != "tokens"}
    assert CacheSpec.from_dict(old) == token_spec
    with pytest.raises(ValueError, match="without tokens has dim = num_patches = 0"):
        CacheSpec(17, (32, 24), dim=96, num_patches=0, tokens=False)


def test_tokenless_cache_round_trip(sb_caches, tiny_data) -> None:
    for fmt, uri in sb_caches.items():
        reader = open_reader(uri)
        manifest = json.loads(Path(uri, "manifest.json").read_text())
        assert manifest["fields"] == TEACHER_OUTPUTS, fmt  # the manifest says which fields exist
        assert manifest["spec"]["tokens"] is False and "tokens" not in manifest["encodings"]
        assert not any(name.startswith(("kpt", "vis")) for name in manifest["arrays"])
        stored = {name for shard in manifest["shards"] for v in shard["views"] for name in v["bytes_per_field"]}
        assert not {"kpt_tokens", "vis_tokens"} & stored, fmt  # no empty token arrays either
        with pytest.raises(KeyError, match="unstored field.*kpt_tokens"):
            reader.read_rows(np.arange(2), fields=["kpt_tokens"])
    # No token file anywhere in the zarr store.
    assert not list(Path(sb_caches["zarr"]).rglob("*tokens*"))

    # The cached heatmaps and Gaussians are the teacher's on the rebuilt crops.
    reader = open_reader(sb_caches["zarr"])
    cached = reader.read_rows(np.arange(len(reader)), fields=["instance_id", "image_id", "view", *TEACHER_OUTPUTS])
    ann = str(Path(tiny_data, "annotations", "person_keypoints_train.json"))
    instances = {i.instance_id: i for i in load_instances(ann, input_size=(128, 96))[0]}
    _, images = load_coco(ann)
    crops = [
        apply_view(
            read_image(str(Path(tiny_data, "images", "train")), images[int(img)].file_name),
            instances[int(iid)].joints,
            view_for(instances[int(iid)], int(v), seed=0),
            (128, 96),
        )[0]
        for iid, img, v in zip(cached["instance_id"], cached["image_id"], cached["view"])
    ]
    fresh = run_teacher(build_teacher(TEACHER, None), np.stack(crops), 8, torch.device("cpu"))
    assert set(fresh) == set(TEACHER_OUTPUTS)
    expected = decode_field("heatmaps", encode_field("heatmaps", fresh["heatmaps"], reader.spec), reader.spec)
    np.testing.assert_allclose(cached["heatmaps"], expected, atol=1e-6)
    np.testing.assert_allclose(cached["gauss"], fresh["gauss"], atol=1e-5)
    np.testing.assert_allclose(cached["confidence"], fresh["confidence"], atol=1e-5)
    # Both stores hold the same values.
    other = open_reader(sb_caches["wds"]).read_rows(np.arange(len(reader)), fields=TEACHER_OUTPUTS)
    for name in TEACHER_OUTPUTS:
        np.testing.assert_array_equal(other[name], cached[name])


def _cfg(cache: str, tmp_path: Path, **kw) -> DistillConfig:
    return DistillConfig(cache=cache, storage=str(tmp_path / "runs"), epochs=1, batch_size=8, **kw)


def test_losses_needing_missing_fields_are_refused(sb_caches, tiny_cache, tmp_path) -> None:
    cache = sb_caches["zarr"]
    # The paper's loss (L_KT, L_VT on) against a teacher without tokens.
    for student in ("deeppose-tiny", "distilpose-tiny"):
        with pytest.raises(UserError) as info:
            check_cache_for_run(_cfg(cache, tmp_path, student=student))
        message = str(info.value)
        assert "'kpt_tokens'" in message and "'vis_tokens'" in message and "does not hold" in message
        assert "The losses that can run: L_reg, L_SH, L_CS; pass --alpha-kt 0 --alpha-vt 0" in message
        assert "\n" not in message  # one line
    with pytest.raises(UserError, match=r"L_VT \(--alpha-vt 0.0005\) needs 'vis_tokens'.*pass --alpha-vt 0$"):
        check_cache_for_run(_cfg(cache, tmp_path, student="deeppose-tiny", alpha_kt=0.0))
    # A student without tokens on a TokenPose cache: the tokens exist, the student has none.
    with pytest.raises(UserError, match="student 'deeppose-tiny' has no tokens.*L_reg, L_SH, L_CS; pass"):
        check_cache_for_run(_cfg(tiny_cache, tmp_path, student="deeppose-tiny"))
    # What can run, runs the checks through: SH + CS, the baseline, and DistilPose with SH only.
    for ok in (
        dict(student="deeppose-tiny", alpha_kt=0.0, alpha_vt=0.0),
        dict(student="deeppose-tiny", no_distill=True),
        dict(student="distilpose-tiny", alpha_kt=0.0, alpha_vt=0.0),
    ):
        check_cache_for_run(_cfg(cache, tmp_path, **ok))
    check_cache_for_run(_cfg(tiny_cache, tmp_path, student="deeppose-tiny", alpha_kt=0.0, alpha_vt=0.0))


def test_job_refuses_before_ray_starts(sb_caches, tmp_path) -> None:
    t0 = time.perf_counter()
    result = run_job(
        "distill.py",
        ["--cache", sb_caches["zarr"], "--student", "deeppose-tiny", "--storage", str(tmp_path), "--epochs", "1"],
        timeout_s=120,
    )
    assert result.returncode != 0
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert "Traceback" not in result.stdout and "Ray" not in result.stdout
    assert "needs 'kpt_tokens'" in lines[-1] and "L_reg, L_SH, L_CS" in lines[-1]
    assert not (tmp_path / "distill").exists()  # nothing written
    assert time.perf_counter() - t0 < 120


@pytest.mark.timeout(600)
@pytest.mark.heavy  # a Ray Train fit + val evaluation: ~1-2 min on 2 shared cores
def test_deeppose_with_sh_distills_from_the_tokenless_cache(sb_caches, tiny_data, tmp_path, capsys) -> None:
    ensure_local_ray()  # jobs/distill.py joins the session's local Ray (init_ray keeps a running one)
    argv = ["--cache", sb_caches["zarr"], "--student", "deeppose-tiny", "--alpha-kt", "0", "--alpha-vt", "0"]
    argv += ["--storage", str(tmp_path), "--name", "deeppose-sh", "--epochs", "2", "--batch-size", "8"]
    argv += ["--val", tiny_data, "--warmup-iters", "2"]
    assert load_job("distill").main(argv) == 0
    out = capsys.readouterr().out
    assert "exported latest student" in out
    epochs = read_csv(tmp_path / "deeppose-sh" / "logs" / "epochs.csv")
    assert len(epochs) == 2 and float(epochs[-1]["AP"]) >= 0
    # The loss terms the run trained: L_reg, L_SH, L_CS; no token term.
    for term in ("train/reg", "train/sh", "train/cs"):
        assert np.isfinite(float(epochs[-1][term])), term
    assert "train/kt" not in epochs[-1] and "train/vt" not in epochs[-1]
    record = json.loads((tmp_path / "deeppose-sh" / "run.json").read_text())
    assert record["student"] == "deeppose-tiny" and record["cache_teacher"].startswith(TEACHER)
