"""Cache / training cost planner (pipeline.plan): scaling, object counts against the real stores."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest

from distilpose.models import get_config
from pipeline.cache import CacheSpec, open_writer
from pipeline.cache.schema import FIELDS, field_names
from pipeline.cloud_prices import GPU_TYPES
from pipeline.plan import (
    LOADER_COST_FILE,
    attention_gmacs,
    estimate,
    loader_cpu_ms,
    main,
    model_cost,
    objects_per_unit,
)
from pipeline.premise import ReplayPoint, ReplayStudy, replay_advice

TINY = dict(teacher="tokenpose-tiny", students=("distilpose-tiny",))
COCO_TRAIN_INSTANCES = 149_813


def test_bytes_hours_and_requests_scale_linearly_with_instances_and_views() -> None:
    # Instances and views that fill whole shards, so nothing is rounded.
    base = estimate(instances=512, views=2, shard_instances=128, **TINY)
    more_instances = estimate(instances=1024, views=2, shard_instances=128, **TINY)
    more_views = estimate(instances=512, views=4, shard_instances=128, **TINY)
    assert more_views.shards == base.shards  # shard membership does not depend on V
    for bigger, factor in ((more_instances, 2), (more_views, 2)):
        assert bigger.views_total == factor * base.views_total
        assert bigger.bytes_total == pytest.approx(factor * base.bytes_total)
        assert bigger.units == factor * base.units
        assert bigger.objects_total - 2 == factor * (base.objects_total - 2)  # - manifest.json, job.json
        assert bigger.teacher_gpu_hours == pytest.approx(factor * base.teacher_gpu_hours)
        assert bigger.storage_cost_per_month == pytest.approx(factor * base.storage_cost_per_month)
    # A student epoch sees one view per instance: it scales with instances, not views.
    assert more_instances.students[0].gpu_hours_per_epoch == pytest.approx(2 * base.students[0].gpu_hours_per_epoch)
    assert more_views.students[0].gpu_hours_per_epoch == pytest.approx(base.students[0].gpu_hours_per_epoch)


def test_gpu_hours_follow_the_stated_formula() -> None:
    plan = estimate(instances=1000, views=3, gpu_type="a100", utilization=0.5, **TINY)
    teacher = model_cost("tokenpose-tiny")
    expected = 1000 * 3 * teacher.forward_gflops * 1e9 / (GPU_TYPES["a100"].peak_tflops * 1e12 * 0.5) / 3600
    assert plan.teacher_gpu_hours == pytest.approx(expected)
    assert plan.teacher_cost == pytest.approx(expected * GPU_TYPES["a100"].price_per_hour)
    student = plan.students[0]
    assert student.gpu_hours_per_epoch == pytest.approx(
        1000 * 3 * model_cost("distilpose-tiny").forward_gflops * 1e9 / (312e12 * 0.5) / 3600
    )
    assert student.teacher_to_epoch_ratio == pytest.approx(plan.teacher_gpu_hours / student.gpu_hours_per_epoch)
    assert estimate(instances=1000, views=3, price_per_gpu_hour=1.0, **TINY).teacher_cost == pytest.approx(
        estimate(instances=1000, views=3, **TINY).teacher_gpu_hours
    )


def test_attention_macs_match_the_spec_figure() -> None:
    from distilpose.models import get_config

    # QK^T and AV for 273 tokens x 12 layers = 0.343 G, not in the paper's count
    # (docs/method.md#parameter-and-flop-counts).
    assert attention_gmacs(get_config("tokenpose-w48")) == pytest.approx(0.343, abs=1e-3)


def _write_one_shard(uri: str, spec: CacheSpec, fmt: str, rows: int = 4) -> None:
    rng = np.random.default_rng(0)
    batch = {}
    for name in field_names(spec):
        fdef = FIELDS[name]
        if name == "crop_jpeg":
            batch[name] = [b"\xff\xd8fake" for _ in range(rows)]
        elif fdef.dtype == "float32":
            batch[name] = rng.random((rows, *fdef.shape(spec)), dtype=np.float32) + 0.5
        else:
            batch[name] = np.arange(rows).astype(fdef.dtype)
    batch["view"] = np.zeros(rows, dtype=FIELDS["view"].dtype)  # one unit
    open_writer(uri, spec, fmt).write_shard(0, batch)


@pytest.mark.parametrize("fmt", ["zarr", "wds"])
@pytest.mark.parametrize("store_crops", [False, True])
def test_object_count_per_unit_matches_the_real_store(tmp_path, fmt: str, store_crops: bool) -> None:
    spec = CacheSpec(num_joints=17, heatmap_size=(32, 24), dim=64, num_patches=64, store_crops=store_crops)
    root = tmp_path / "cache"
    _write_one_shard(str(root), spec, fmt)
    files = [os.path.join(d, f) for d, _, names in os.walk(root) for f in names]
    assert len(files) == objects_per_unit(spec, fmt), sorted(os.path.relpath(f, root) for f in files)


def test_token_and_small_field_bytes_are_the_schema_sizes() -> None:
    plan = estimate(instances=10, views=1, **TINY)
    fields = plan.bytes_per_view_by_field
    dim = get_config("tokenpose-tiny").dim
    assert fields["kpt_tokens"] == 17 * dim + 17 * 2  # int8 values + fp16 scale per token
    assert fields["vis_tokens"] == 64 * dim + 64 * 2  # 64 patches
    assert fields["gauss"] == 17 * 4 * 4
    assert 0 < fields["heatmaps"] < 17 * 32 * 24  # compressed uint8: an estimate below raw


def test_wds_packs_fewer_objects_and_gets_than_zarr() -> None:
    zarr = estimate(instances=2560, views=1, fmt="zarr", **TINY)
    wds = estimate(instances=2560, views=1, fmt="wds", **TINY)
    assert wds.objects_total < zarr.objects_total
    assert wds.students[0].gets_per_epoch == wds.shards
    assert zarr.students[0].gets_per_epoch > wds.students[0].gets_per_epoch


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="GPU type"):
        estimate(instances=10, views=1, gpu_type="tpu", **TINY)
    with pytest.raises(ValueError, match="not a teacher"):
        estimate(instances=10, views=1, teacher="distilpose-tiny")
    with pytest.raises(ValueError, match="utilization"):
        estimate(instances=10, views=1, utilization=0, **TINY)


def test_coco_scale_plan_and_cli(capsys) -> None:
    plan = estimate(instances=COCO_TRAIN_INSTANCES, views=8, teacher="tokenpose-w48")
    assert plan.shards == -(-COCO_TRAIN_INSTANCES // 256)  # 256 instances per shard, one unit per view
    assert plan.units == 8 * plan.shards
    assert 30 * 2**30 < plan.bytes_total < 200 * 2**30  # tens of GiB: tokens dominate
    assert plan.teacher_forward_gflops == pytest.approx(2 * (17.028 + 0.343), rel=1e-3)
    assert [s.preset for s in plan.students] == ["distilpose-s", "distilpose-l"]
    # A student epoch is much cheaper than caching 8 views: the cache pays back across epochs and runs.
    assert plan.students[0].teacher_to_epoch_ratio > 8
    table = plan.table()
    for text in ("cache size (estimate)", "teacher GPU-hours", "distilpose-l", "assumptions:", "estimate"):
        assert text in table
    # The CLI in-process: the model costs computed above are cached.
    assert main(["--instances", str(COCO_TRAIN_INSTANCES), "--views", "8", "--teacher", "tokenpose-w48",
                 "--gpu-type", "l4", "--format", "wds"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "NVIDIA L4" in out and "format wds" in out


def test_object_count_matches_a_real_cache_job(tiny_cache) -> None:
    from pipeline import storage
    from pipeline.cache import open_reader

    manifest = open_reader(tiny_cache).manifest
    plan = estimate(
        manifest.num_rows // manifest.views, manifest.views, "tokenpose-tiny", students=(), shard_instances=16
    )
    assert plan.shards == len(manifest.shards) and plan.units == len(manifest.units())
    assert plan.objects_total == len(storage.find_files(tiny_cache))


def test_the_plan_recommends_views_from_the_premise_study(tmp_path) -> None:
    from pipeline.premise import PremiseStudy, load_study, study_for, views_advice

    study = load_study("premise-l-tiny")  # what bench/study_premise.py wrote into pipeline/studies/
    assert study is not None and study.student == "distilpose-l-tiny"
    best = study.smallest_views_within()
    assert best is not None and study.cache_ap[best] >= study.online_fresh_ap - 0.01
    assert f"V={best} within 1 AP of the online teacher or better" in views_advice(8, study.epochs, study)
    # One-sided for its own schedule only: a long schedule replays each view 300/8 times.
    assert views_advice(8, 300, study).startswith("not measured for 300 epochs (the short-schedule study ran 12;")
    none_good = PremiseStudy("s", 12, (0,), online_fresh_ap=0.5, cache_ap={1: 0.1, 16: 0.3})
    assert none_good.smallest_views_within() is None and "no V was within" in views_advice(8, 12, none_good)
    # The study is picked by student family; without any study the planner says so.
    (tmp_path / "premise-tiny.json").write_text(json.dumps(none_good.to_json()))
    assert study_for("distilpose-s", tmp_path) == none_good and study_for("distilpose-l", tmp_path) == none_good
    assert "no premise study found" in views_advice(8, 12, study_for("distilpose-s", tmp_path / "none"))
    plan = estimate(instances=1000, views=8, teacher="tokenpose-tiny", students=("distilpose-tiny",))
    table = plan.table()
    assert "views (short schedules)" in table and "views (replay study)" in table
    assert "(one view unit per shard: 1/8)" in table


def _point(views: int, instances: int, epochs: int, diff: float) -> ReplayPoint:
    return ReplayPoint(views, instances, epochs, diff, 0.01, diff - 0.01, diff + 0.01, 3)


def test_the_replay_study_recommends_the_smallest_measured_k_within_1_ap() -> None:
    study = ReplayStudy(
        "s",
        1000,
        (
            _point(2, 128, 250, -0.05),  # 125 replays
            _point(4, 128, 250, -0.02),  # 62
            _point(8, 128, 250, -0.004),  # 31
            _point(16, 128, 250, 0.01),  # 16
            _point(4, 512, 62, 0.02),  # 16
        ),
        "where",
    )
    # 300 epochs: K=2 at 150 (measured 125), K=4 at 75 (62): behind; K=8 at 37.5 (31): within.
    best, checked = study.recommend(300)
    assert best == 8 and [k for k, _ in checked] == [2, 4, 8]
    assert replay_advice(300, study).startswith("K=8 cached augmented views: -0.4 AP (min -1.4, 3 seeds)")
    # 64 epochs: K=4 at 16 replays was measured on 512 instances (+2 AP); K=2 at 32 was not.
    assert study.recommend(64)[0] == 4
    # Better is fine (one-sided), but no extrapolation: 2000 epochs are far from anything measured.
    assert study.recommend(2000) == (None, [])
    assert "measured no K near 2000/K replays" in replay_advice(2000, study)
    behind = ReplayStudy("s", 1000, (_point(8, 128, 250, -0.03), _point(16, 128, 250, -0.02)), "where")
    assert "no measured K (8, 16) was within 1 AP" in replay_advice(300, behind)
    assert "falls behind" in replay_advice(300, behind) and "remedies" not in replay_advice(300, behind)
    # A measured remedy is named beside the plain arms (and never decides the plain answer).
    flip = ReplayPoint(8, 128, 250, -0.002, 0.01, -0.01, 0.005, 3, remedy="--label-flip")
    with_flip = ReplayStudy("s", 1000, (*behind.points, flip), "where")
    assert with_flip.recommend(300) == behind.recommend(300) and with_flip.recommend(300, remedy="--label-flip")[0] == 8
    assert "remedies measured: --label-flip K=8: -0.2 AP at 31 replays (within 1 AP, 3 seed(s))" in replay_advice(
        300, with_flip
    )
    assert "no replay study found" in replay_advice(300, None)
    assert ReplayStudy.from_json(json.loads(json.dumps(study.to_json()))) == study


def test_the_token_views_row_quotes_the_measured_arm_beside_the_plain_ones() -> None:
    from pipeline.premise import token_views_advice

    plain = (_point(8, 128, 250, -0.011), _point(16, 128, 250, -0.010))
    assert "not measured by the replay study" in token_views_advice(ReplayStudy("s", 1000, plain, "where"))
    assert "not measured" in token_views_advice(None)
    tokens = ReplayPoint(16, 128, 250, -0.014, 0.006, -0.021, -0.01, 3, remedy="--token-views 9")
    line = token_views_advice(ReplayStudy("s", 1000, (*plain, tokens), "where"))
    assert line.startswith("replay study: K=16 with --token-views 9: -1.4 AP vs the online teacher (3 seeds; ")
    assert "K=16 with tokens on every view -1.0, K=8 with tokens on every view -1.1" in line


def test_the_planners_study_data_ships_with_the_package() -> None:
    """The planner reads pipeline/studies/*.json: package data (pyproject), inside a folder the
    Docker image copies (infra/Dockerfile copies pipeline/, not docs/)."""
    import tomllib
    from pathlib import Path

    from pipeline import premise

    root = Path(__file__).resolve().parents[1]
    assert premise.STUDIES.parent == root / "pipeline"
    shipped = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "studies/*.json" in shipped["pipeline"]
    assert "COPY pipeline ./pipeline" in (root / "infra" / "Dockerfile").read_text()
    names = {p.stem for p in premise.STUDIES.glob("*.json")}
    assert {premise.REPLAY_STUDY, *premise.STUDY_FOR_STUDENT.values()} <= names
    assert premise.load_replay_study() is not None and not list((root / "docs").glob("premise-*.json"))


def test_loader_cores_come_from_the_shipped_measurement() -> None:
    measured = json.loads(LOADER_COST_FILE.read_text())["cpu_ms_per_sample"]
    assert loader_cpu_ms() == pytest.approx(measured)
    plan = estimate(instances=COCO_TRAIN_INSTANCES, views=8, teacher="tokenpose-w48")
    s = plan.students[0]
    assert s.loader_cores_per_gpu == pytest.approx(s.samples_per_s_per_gpu * measured["rebuild"] / 1e3)
    # Per GPU type: the compute-bound rate scales with the peak, the cores with it.
    h100, l4 = s.loader_cores_by_gpu["h100"], s.loader_cores_by_gpu["l4"]
    ratio = GPU_TYPES["l4"].peak_tflops / GPU_TYPES["h100"].peak_tflops
    assert l4["stored"] == pytest.approx(h100["stored"] * ratio)
    assert h100["rebuild"] == pytest.approx(s.loader_cores_per_gpu)
    assert "loader_cost.json" in plan.table()


def test_too_few_cpus_per_gpu_are_flagged_and_priced() -> None:
    kwargs = dict(instances=COCO_TRAIN_INSTANCES, views=8, teacher="tokenpose-w48", students=("distilpose-s",))
    plenty = estimate(**kwargs, cpus_per_gpu=10_000)
    flag = re.compile(r"LOADER-BOUND +needs")
    assert plenty.students[0].input_bound_factor == 1.0 and not flag.search(plenty.table())
    few = estimate(**kwargs, cpus_per_gpu=2)
    s = few.students[0]
    assert s.input_bound_factor == pytest.approx(s.loader_cores_per_gpu / 2)
    assert flag.search(few.table()) and "the cluster has 2 " in few.table()
    # The comparison prices the loader-starved GPU-hours.
    assert few.crops["rebuild"].gpu_cost == pytest.approx(s.cost_total * s.input_bound_factor)
    with pytest.raises(ValueError, match="cpus_per_gpu"):
        estimate(**kwargs, cpus_per_gpu=0)


def test_stored_vs_rebuilt_crops_both_ways() -> None:
    kwargs = dict(instances=COCO_TRAIN_INSTANCES, views=8, teacher="tokenpose-w48")
    plan = estimate(**kwargs)
    stored, rebuild = plan.crops["stored"], plan.crops["rebuild"]
    # Each side is the plan made the other way.
    other = estimate(**kwargs, store_crops=True)
    assert stored.total == pytest.approx(other.crops["stored"].total)
    assert stored.request_cost == pytest.approx(other.request_cost)
    assert rebuild.request_cost == pytest.approx(plan.request_cost)
    # Rebuilding reads every image once per student epoch; stored crops cost bytes instead.
    assert rebuild.gets_per_run - stored.gets_per_run > 2 * 300 * COCO_TRAIN_INSTANCES * 0.9
    assert stored.storage_cost > rebuild.storage_cost
    assert stored.loader_cores["distilpose-s"] < rebuild.loader_cores["distilpose-s"]
    assert plan.crops_choice == min(plan.crops, key=lambda k: plan.crops[k].total)
    assert "crops: use" in plan.table()
