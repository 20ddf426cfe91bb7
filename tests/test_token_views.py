"""More views per byte: a cache built with --token-views Vt stores the teacher's tokens for
views 0..Vt-1 only; the later views keep heatmaps, Gaussians and confidences, and the loader
masks the token losses on them (token_weight 0, times the label-side flip's mask)."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from cache_rows import SMALL_SPEC, base_manifest, teacher_like_rows
from pipeline_fixtures import ROOT, load_job

from distilpose.errors import UserError
from distilpose.label_flip import label_flips
from distilpose.losses import TOKEN_WEIGHT, DistillLoss
from pipeline.cache import CacheMismatchError, check_compatible, open_reader, open_writer
from pipeline.cache.encodings import encode_crop_jpeg
from pipeline.cache.schema import CROP_FIELD, TOKEN_FIELDS, CacheSpec, stored_arrays
from pipeline.cache.wds_store import decode_wds_sample, iter_tar_views
from pipeline.cache_loader import CachedViewStream, shard_view
from pipeline.distill import DistillConfig, check_cache_for_run
from pipeline.distill.checks import check_token_views, token_views_line
from pipeline.plan import estimate, main, objects_per_unit
from pipeline.teacher_stage import CacheJobConfig, run_cache_job

TEACHER = "tokenpose-tiny"
TOKEN_SPEC = dataclasses.replace(SMALL_SPEC, token_views=2)


# ----------------------------------------------------------------------------- spec


def test_spec_says_which_units_hold_tokens() -> None:
    assert "token_views" not in SMALL_SPEC.to_dict()  # default: every view, JSON as before the field
    assert TOKEN_SPEC.to_dict()["token_views"] == 2
    assert CacheSpec.from_dict(TOKEN_SPEC.to_dict()) == TOKEN_SPEC
    assert [TOKEN_SPEC.has_tokens(v) for v in range(4)] == [True, True, False, False]
    assert TOKEN_SPEC.unit_spec(1) == SMALL_SPEC  # a unit with tokens: the full cache's spec
    tokenless = TOKEN_SPEC.unit_spec(2)
    assert not tokenless.tokens and not any(a.field in TOKEN_FIELDS for a in stored_arrays(tokenless).values())
    for bad in (0, -1, True):
        with pytest.raises(ValueError, match="token_views must be an integer >= 1"):
            dataclasses.replace(SMALL_SPEC, token_views=bad)
    with pytest.raises(ValueError, match="teacher has no tokens"):
        CacheSpec(17, (16, 12), dim=0, num_patches=0, tokens=False, token_views=1)


# ----------------------------------------------------------------------------- the cache job


@pytest.fixture(scope="module")
def job_caches(tiny_data, tiny_teacher, s3_server, tmp_path_factory) -> dict[str, str]:
    """The first 16 train instances (2 shards) cached by the job (in-process engine): a plain
    2-view zarr cache, and 3-view caches with --token-views 2 in both formats."""
    root = tmp_path_factory.mktemp("token-views")
    base = dict(data=tiny_data, teacher=TEACHER, checkpoint=tiny_teacher, shard_instances=8, batch_size=8, limit=16)
    base["engine"] = "in-process"
    caches = {}
    for name, fmt, views, token_views in (("full", "zarr", 2, None), ("zarr", "zarr", 3, 2), ("wds", "wds", 3, 2)):
        out = str(root / name)
        assert run_cache_job(CacheJobConfig(out=out, format=fmt, views=views, token_views=token_views, **base)).complete
        caches[name] = out
    return caches


def test_job_writes_tokens_for_the_first_views_only(job_caches) -> None:
    full = open_reader(job_caches["full"])
    for fmt in ("zarr", "wds"):
        reader = open_reader(job_caches[fmt])
        manifest = json.loads(Path(job_caches[fmt], "manifest.json").read_text())
        assert manifest["token_views"] == 2 and manifest["spec"]["token_views"] == 2
        assert manifest["views"] == 3 and reader.spec.token_views == 2
        for unit in reader.manifest.units():
            has = {"kpt_tokens", "vis_tokens"} <= set(unit.bytes_per_field)
            assert has == (unit.view < 2), (fmt, unit.name, sorted(unit.bytes_per_field))
            assert unit.bytes_per_field.get("heatmaps", 0) > 0  # every view keeps its heatmaps
        for shard in full.shard_indices:
            for view in (0, 1):  # the same tokens as the cache with tokens on every view
                mine = reader.read_shard(shard, fields=["instance_id", *TOKEN_FIELDS, "heatmaps"], view=view)
                theirs = full.read_shard(shard, fields=["instance_id", *TOKEN_FIELDS, "heatmaps"], view=view)
                for name in theirs:
                    np.testing.assert_array_equal(mine[name], theirs[name], err_msg=f"{fmt} {name}")
            # View 2 has everything but the tokens, and asking it for tokens is an error.
            view2 = reader.read_shard(shard, fields=["gauss", "confidence", "heatmaps"], view=2)
            assert np.isfinite(view2["heatmaps"]).all() and view2["gauss"].shape[1:] == (17, 4)
            with pytest.raises(KeyError, match="view 2 stores no kpt_tokens.*views 0..1 only"):
                reader.read_shard(shard, fields=["kpt_tokens"], view=2)
    # Zarr: the units with tokens are byte-identical to the full cache's; no token arrays after.
    zarr = open_reader(job_caches["zarr"]).manifest
    for shard in full.manifest.shards:
        for view in (0, 1):
            assert zarr.shards[shard.index].unit(view).sha256 == shard.unit(view).sha256
    assert not list(Path(job_caches["zarr"], "shards").glob("*/view-002.zarr/*tokens*"))
    assert list(Path(job_caches["zarr"], "shards").glob("*/view-001.zarr/kpt_tokens"))
    # WebDataset: no .kt / .vt members in a view-2 tar; a plain webdataset sample decodes without them.
    tar = next(Path(job_caches["wds"], "shards").glob("*.view-002.tar"))
    with tar.open("rb") as stream:
        key, members = next(iter_tar_views(stream))
    assert not any(ext.startswith(("kt.", "vt.")) for ext in members)
    sample = decode_wds_sample({"__key__": key, **members}, open_reader(job_caches["wds"]).spec)
    assert int(sample["view"]) == 2 and not set(TOKEN_FIELDS) & set(sample) and "heatmaps" in sample


def test_token_views_outside_1_to_views_is_a_one_line_error(tiny_data, tmp_path, capsys) -> None:
    for token_views, views in ((4, 3), (0, 3)):
        with pytest.raises(ValueError, match=f"--token-views {token_views}: choose 1..{views}"):
            CacheJobConfig(data=tiny_data, teacher=TEACHER, out="x", views=views, token_views=token_views)
    job = load_job("cache_teacher")
    argv = ["--data", tiny_data, "--teacher", TEACHER, "--out", str(tmp_path / "c"), "--views", "8"]
    with pytest.raises(SystemExit) as info:
        job.parse_args([*argv, "--token-views", "9"])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--token-views 9: choose 1..8" in err
    assert job.parse_args([*argv, "--token-views", "8"]).config.token_views == 8
    # A teacher without tokens has nothing to store (refused before Ray starts).
    with pytest.raises(UserError, match="--token-views 1: teacher simplebaseline-tiny has no tokens"):
        run_cache_job(CacheJobConfig(data=tiny_data, teacher="simplebaseline-tiny", out="x", views=2, token_views=1))
    assert not (tmp_path / "c").exists()


def test_distill_checks_and_the_drivers_line(job_caches, tmp_path) -> None:
    cache = job_caches["zarr"]
    manifest = open_reader(cache).manifest

    def cfg(**kw) -> DistillConfig:
        return DistillConfig(cache=cache, student="distilpose-tiny", storage=str(tmp_path), batch_size=8, **kw)

    check_cache_for_run(cfg())  # the paper's loss, all three views drawn
    assert token_views_line(cfg(), manifest) == (
        "tokens cached for views 0..1 of 3: L_KT/L_VT masked on view 2 (1 of the 3 views drawn)"
    )
    assert token_views_line(cfg(exclude_view0=True), manifest).endswith("on view 2 (1 of the 2 views drawn)")
    assert token_views_line(cfg(cache_views=2), manifest) is None  # views 0..1 only: nothing masked
    assert token_views_line(cfg(alpha_kt=0.0, alpha_vt=0.0), manifest) is None  # no token term
    assert token_views_line(cfg(online_teacher=TEACHER, online_views="cache"), manifest) is None  # tokens online
    # Every drawn view without tokens: the token terms would never run.
    with pytest.raises(UserError, match="views 0..0 only and this run draws views 1..2: L_KT/L_VT would never"):
        check_token_views(cfg(exclude_view0=True), _with_token_views(manifest, 1))
    check_token_views(cfg(exclude_view0=True, alpha_kt=0.0, alpha_vt=0.0), _with_token_views(manifest, 1))
    # A sweep arm's expect refuses a cache without token_views (the replay study's cache-k16-t8).
    check_compatible(manifest, {"spec.token_views": 2})
    with pytest.raises(CacheMismatchError, match="views with tokens"):
        check_compatible(open_reader(job_caches["full"]).manifest, {"spec.token_views": 2})


def _with_token_views(manifest, token_views: int):
    return dataclasses.replace(manifest, spec=dataclasses.replace(manifest.spec, token_views=token_views))


# ----------------------------------------------------------------------------- the loader


SHARDS, VIEWS = 4, 4


@pytest.fixture(scope="module")
def loader_caches(tmp_path_factory) -> dict[str, str]:
    """SHARDS shards of 4 instances x VIEWS views with stored JPEG crops, written with tokens on
    every view ("full") and on views 0..1 only ("part"); the same rows in both."""
    root = tmp_path_factory.mktemp("tv-loader")
    caches = {}
    for name, spec in (("full", SMALL_SPEC), ("part", TOKEN_SPEC)):
        writer = open_writer(str(root / name), spec, "zarr")
        rng = np.random.default_rng(0)
        for shard in range(SHARDS):
            rows = teacher_like_rows(spec, 4 * VIEWS, seed=shard, first_instance=8 * shard, views=VIEWS)
            rows[CROP_FIELD] = [encode_crop_jpeg(rng.integers(0, 255, (64, 48, 3), dtype=np.uint8)) for _ in range(16)]
            writer.write_shard(shard, rows)
        writer.finalize(base_manifest(VIEWS), expected_shards=SHARDS)
        caches[name] = str(root / name)
    return caches


def _batches(uri: str, epoch: int, fields=("heatmaps", *TOKEN_FIELDS), **kw) -> list[dict]:
    stream = CachedViewStream(open_reader(uri), None, None, (64, 48), fields, 0, 1, batch_size=4, seed=3, **kw)
    return list(stream.epoch(epoch))


def _view_of(instance_ids: np.ndarray, epoch: int, **kw) -> np.ndarray:
    """The view each sample was read in: one per shard per epoch (ids 8 * shard + i)."""
    first = 1 if kw.get("exclude_view0") else 0
    k = kw.get("cache_views") or VIEWS - first
    return np.asarray([shard_view(3, epoch, int(i) // 8, k, first) for i in instance_ids])


@pytest.mark.parametrize("options", [{}, {"label_flip": True}, {"exclude_view0": True, "label_flip": True}])
def test_token_weight_is_zero_exactly_for_views_without_tokens_and_flips(loader_caches, options) -> None:
    seen_views = set()
    for epoch in range(3):
        full, part = (
            _batches(loader_caches["full"], epoch, **options),
            _batches(loader_caches["part"], epoch, **options),
        )
        assert len(full) == len(part) == SHARDS
        for a, b in zip(full, part):
            ids = b["instance_id"].numpy()
            np.testing.assert_array_equal(ids, a["instance_id"].numpy())  # the same samples in the same order
            views = _view_of(ids, epoch, **options)
            seen_views.update(views.tolist())
            keep = views < 2
            if options.get("label_flip"):
                keep &= ~label_flips(3, epoch, ids)
            np.testing.assert_array_equal(b[TOKEN_WEIGHT].numpy(), keep.astype(np.float32))
            has = views < 2
            for name in TOKEN_FIELDS:  # real tokens where stored, zeros (never read) elsewhere
                torch.testing.assert_close(b[name][has], a[name][has])
                assert (b[name][~has] == 0).all() and (a[name][~has].abs().sum() > 0 or has.all())
            for name in ("heatmaps", "image", "target"):  # everything else as from the full cache
                torch.testing.assert_close(b[name], a[name])
    assert seen_views >= {2, 3} and seen_views & {0, 1}  # both kinds drawn


def test_nothing_changes_when_the_drawn_views_all_have_tokens(loader_caches) -> None:
    for epoch in range(2):
        for a, b in zip(
            _batches(loader_caches["full"], epoch, cache_views=2), _batches(loader_caches["part"], epoch, cache_views=2)
        ):
            assert TOKEN_WEIGHT not in b and sorted(a) == sorted(b)
            for name in a:
                torch.testing.assert_close(b[name], a[name])
        # A run that reads no tokens reads views 2..3 as they are, with no mask.
        for batch in _batches(loader_caches["part"], epoch, fields=("heatmaps",)):
            assert TOKEN_WEIGHT not in batch and not set(TOKEN_FIELDS) & set(batch)


def test_token_losses_use_the_weight_and_stay_finite_when_all_masked() -> None:
    n, k, p, d = 4, 17, 12, 8

    class Out:
        coords, sigma, score = torch.full((n, k, 2), 0.5), torch.ones(n, k, 2), torch.zeros(n, k)
        kpt_tokens, vis_tokens = torch.full((n, k, d), 2.0), torch.full((n, p, d), 3.0)

    loss = DistillLoss(alpha_kt=1.0, alpha_vt=1.0, alpha_sh=0.0, alpha_cs=0.0)
    target, weight = torch.full((n, k, 2), 0.5), torch.ones(n, k)
    teacher = {"kpt_tokens": torch.zeros(n, k, d), "vis_tokens": torch.zeros(n, p, d)}
    _, terms = loss(Out(), target, weight, teacher)
    assert terms["kt"].item() == pytest.approx(4.0) and terms["vt"].item() == pytest.approx(9.0)
    _, terms = loss(Out(), target, weight, {**teacher, TOKEN_WEIGHT: torch.tensor([1.0, 0.0, 0.0, 1.0])})
    assert terms["kt"].item() == pytest.approx(2.0) and terms["vt"].item() == pytest.approx(4.5)
    total, terms = loss(Out(), target, weight, {**teacher, TOKEN_WEIGHT: torch.zeros(n)})
    assert terms["kt"].item() == 0.0 and terms["vt"].item() == 0.0 and torch.isfinite(total)


# ----------------------------------------------------------------------------- planner


def test_planner_counts_tokens_on_the_first_views_only(capsys) -> None:
    kw = dict(instances=4096, views=16, teacher="tokenpose-w48", students=(), compare_crops=False)
    full, part = estimate(**kw), estimate(**kw, token_views=8)
    tokens = sum(v for f, v in full.bytes_per_view_by_field.items() if f in TOKEN_FIELDS)
    assert tokens > 0.5 * full.bytes_per_view  # tokens are most of a view at paper size
    assert part.bytes_per_view_with_tokens == pytest.approx(full.bytes_per_view)
    assert part.bytes_per_view_without_tokens == pytest.approx(full.bytes_per_view - tokens)
    assert part.bytes_per_view == pytest.approx(full.bytes_per_view - tokens / 2)
    for name in TOKEN_FIELDS:
        assert part.bytes_per_view_by_field[name] == pytest.approx(full.bytes_per_view_by_field[name] / 2)
    # 8 of 16 views without tokens: their token bytes, and per unit the 4 token arrays' metadata.
    saved = 4096 * 8 * tokens + part.shards * 8 * 4 * 1024
    assert full.bytes_total - part.bytes_total == pytest.approx(saved)
    tokenless = objects_per_unit(part.spec.unit_spec(8), "zarr")
    assert tokenless == full.objects_per_unit - 8  # 4 arrays x (zarr.json + data)
    assert part.objects_total - 2 == part.shards * 8 * (full.objects_per_unit + tokenless)
    assert estimate(**kw, token_views=16).bytes_total == pytest.approx(full.bytes_total)
    with pytest.raises(ValueError, match="token_views must be in 1..views"):
        estimate(**kw, token_views=17)
    assert main(["--instances", "150000", "--views", "16", "--token-views", "8", "--teacher", "tokenpose-w48"]) == 0
    out = capsys.readouterr().out
    assert "on views 0..7 only" in out and "--token-views 8" in out and "less than tokens on every view" in out


def test_planner_object_count_matches_a_real_token_views_store(tmp_path) -> None:
    spec = CacheSpec(num_joints=17, heatmap_size=(32, 24), dim=64, num_patches=64, token_views=1)
    for fmt in ("zarr", "wds"):
        root = tmp_path / fmt
        rows = teacher_like_rows(spec, 8, views=2)
        open_writer(str(root), spec, fmt).write_shard(0, rows)
        files = [f for _, _, names in os.walk(root) for f in names]
        assert len(files) == objects_per_unit(spec.unit_spec(0), fmt) + objects_per_unit(spec.unit_spec(1), fmt)


# ----------------------------------------------------------------------------- sweep and replay study


def _study_replay():
    bench = str(ROOT / "bench")
    if bench not in sys.path:
        sys.path.insert(0, bench)
    import study_replay

    return study_replay


def test_a_sweep_trial_reads_a_token_views_cache(job_caches, tmp_path) -> None:
    from pipeline.sweep import SweepConfig, check_sweep, load_space

    space = str(ROOT / "sweeps" / "premise-replay.yaml")
    arm = {t["name"]: t for t in load_space(space)}["cache-k16-t8"]
    assert arm["cache_views"] == 16 and arm["exclude_view0"] and arm["expect_teacher"] == {"spec.token_views": 9}
    manifest = open_reader(job_caches["zarr"]).manifest
    check_compatible(_with_token_views(manifest, 9), arm["expect_teacher"])  # the study's second cache
    with pytest.raises(CacheMismatchError, match="views with tokens"):
        check_compatible(open_reader(job_caches["full"]).manifest, arm["expect_teacher"])
    # The sweep's own checks on the tiny token-views cache (its 3 views, tokens on 0..1).
    small = {"cache_views": 2, "expect_teacher": {"spec.token_views": 2}, "student": "distilpose-tiny", "batch_size": 8}
    for cache, ok in ((job_caches["zarr"], True), (job_caches["full"], False)):
        cfg = SweepConfig(cache=cache, space=space, only="cache-k16-t8", storage=str(tmp_path), overrides=small)
        if ok:
            [config] = check_sweep(cfg)
            assert config.cache == cache and config.exclude_view0 and config.cache_views == 2
        else:
            with pytest.raises(CacheMismatchError, match="views with tokens"):
                check_sweep(cfg)


def test_replay_study_group_e_builds_and_reads_the_token_views_cache(tmp_path, monkeypatch) -> None:
    import argparse

    study = _study_replay()
    assert study.ARM_GROUPS["e"] == ("cache-k16-t8",) and "e" in study.OPTIONAL_GROUPS
    assert study.is_cache_arm("cache-k16-t8") and study.arm_views("cache-k16-t8") == 16
    assert study.arm_remedy("cache-k16-t8") == "--token-views 9" and study.arm_remedy("cache-k8") == ""
    commands: list[list[str]] = []
    monkeypatch.setattr(study, "_run", commands.append)
    monkeypatch.setattr(study, "subset_epochs", lambda cache: (16, 4))
    demo = tmp_path / "demo"
    args = argparse.Namespace(
        out=str(tmp_path / "study"), demo=demo, teacher=TEACHER, subsets=[16], seeds=[0], report_only=False,
        shard_instances=8, cache_workers=1, cache_seed=0, max_concurrent=1, groups=["a"],
    )  # fmt: skip
    study.run_sweeps(args, study.build_caches(args))  # the default groups: one cache, no group e
    assert len(commands) == 2 and "--token-views" not in commands[0] and "cache-k16-t8" not in commands[1]
    commands.clear()
    args.groups = ["e"]
    study.run_sweeps(args, study.build_caches(args))
    plain, token, sweep = commands
    assert plain[plain.index("--out") + 1] == str(tmp_path / "study" / "cache-n16")
    assert token[token.index("--out") + 1] == str(tmp_path / "study" / "cache-n16-t8")
    assert token[token.index("--views") + 1] == "17" and token[token.index("--token-views") + 1] == "9"
    assert sweep[sweep.index("--cache") + 1] == str(tmp_path / "study" / "cache-n16-t8")
    assert sweep[sweep.index("--only") + 1] == "cache-k16-t8" and "replay-n16-seed0-e" in sweep
