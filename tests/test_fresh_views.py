"""Fresh views for the online teacher (`--online-views fresh`, the official data flow): a new
augmentation of every cached instance every epoch, independent of the rank split, in DDP
lockstep; and a 2-worker run in that mode on the session's local Ray and tiny cache."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from pipeline_fixtures import read_csv

from distilpose.data.coco import load_instances
from distilpose.data.views import fresh_view, view_for
from distilpose.errors import UserError
from pipeline.cache import open_reader
from pipeline.cache_loader import steps_per_epoch
from pipeline.distill import DistillConfig, check_cache_for_run, prepare_run, run_distill
from pipeline.fresh_views import fresh_stream_for_rank

STUDENT = "distilpose-tiny"
INPUT_SIZE = (128, 96)  # distilpose-tiny / tokenpose-tiny
TERMS = ("reg", "kt", "vt", "sh", "cs")


def _stream(reader, rank=0, world=1, batch=4, seed=0, prefetch=0):
    data = reader.manifest.data
    return fresh_stream_for_rank(
        reader, data.ann_file, data.image_root, INPUT_SIZE, rank, world, batch, seed, prefetch=prefetch
    )


def _crops(stream, epoch: int) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """instance id -> (image, target) of one epoch."""
    out = {}
    for batch in stream.epoch(epoch):
        for i, iid in enumerate(batch["instance_id"].tolist()):
            assert iid not in out, "an instance twice in one epoch"
            out[iid] = (batch["image"][i], batch["target"][i])
    return out


def _share_changed(a: dict, b: dict) -> float:
    """Share of the instances in both whose crop differs. Not all: two draws can give the
    same view (no rotation, no flip, the scale clipped at the same bound: ~0.25% of pairs)."""
    common = set(a) & set(b)
    assert len(common) > 20
    return sum(not torch.equal(a[i][0], b[i][0]) for i in common) / len(common)


def test_fresh_views_change_every_epoch_and_differ_from_the_cached_ones(tiny_cache) -> None:
    reader = open_reader(tiny_cache)
    stream = _stream(reader)
    first, second = _crops(stream, 0), _crops(stream, 1)
    assert _share_changed(first, second) >= 0.9
    # The same (seed, epoch) gives the same crops; another seed other ones.
    again = _crops(_stream(reader), 0)
    assert set(again) == set(first) and all(torch.equal(again[i][0], first[i][0]) for i in first)
    assert _share_changed(first, _crops(_stream(reader, seed=1), 0)) >= 0.9
    # Seeded apart from the cached views: no fresh view is a cached one.
    instances, _ = load_instances(reader.manifest.data.ann_file, input_size=INPUT_SIZE)
    views = reader.manifest.views
    for inst in instances[:10]:
        cached = {view_for(inst, v, reader.manifest.seed) for v in range(views)}
        assert all(fresh_view(inst, 0, epoch, INPUT_SIZE) not in cached for epoch in range(3))


def test_fresh_views_do_not_depend_on_the_rank_split_and_ranks_run_in_lockstep(tiny_cache) -> None:
    reader = open_reader(tiny_cache)
    alone = _crops(_stream(reader, world=1), 0)
    ranks = [_stream(reader, rank=r, world=2) for r in range(2)]
    # Every rank runs the cache mode's step count for the same workers and batch.
    assert [s.steps for s in ranks] == [steps_per_epoch(reader, 2, 4)] * 2
    split = [_crops(s, 0) for s in ranks]
    assert [len(c) for c in split] == [ranks[0].steps * 4] * 2
    assert not set(split[0]) & set(split[1])  # the ranks share no instance
    for crops in split:
        both = set(crops) & set(alone)
        assert both
        for i in both:
            assert torch.equal(crops[i][0], alone[i][0]) and torch.equal(crops[i][1], alone[i][1])
    # The loader thread keeps the order.
    prefetched = list(_stream(reader, rank=1, world=2, prefetch=2).epoch(0))
    plain = list(ranks[1].epoch(0))
    assert len(prefetched) == len(plain)
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(prefetched, plain))


def test_fresh_targets_are_the_views_joints(tiny_cache) -> None:
    """The target is the joint in the fresh crop (normalised), weighted 1 only inside it."""
    reader = open_reader(tiny_cache)
    batch = next(iter(_stream(reader).epoch(0)))
    target, weight = batch["target"].numpy(), batch["target_weight"].numpy()
    assert batch["image"].shape == (4, 3, *INPUT_SIZE) and target.shape == (4, 17, 2)
    visible = weight > 0
    assert visible.any() and np.all((target[visible] >= 0) & (target[visible] <= 1))
    assert set(batch) == {"image", "target", "target_weight", "instance_id"}


def _cfg(cache, storage, name, **kw) -> DistillConfig:
    base = dict(student=STUDENT, epochs=1, batch_size=4, workers=2, warmup_iters=2, log_every=1, max_failures=0)
    return DistillConfig(cache=cache, storage=str(storage), name=name, **{**base, **kw})


def test_online_views_needs_an_online_teacher(tiny_cache, tmp_path) -> None:
    with pytest.raises(UserError, match="--online-views cache chooses what the online teacher sees; add --online"):
        check_cache_for_run(_cfg(tiny_cache, tmp_path, "x", online_views="cache"))
    with pytest.raises(ValueError, match="'stored' is not one of 'fresh', 'cache'"):
        _cfg(tiny_cache, tmp_path, "x", online_views="stored")
    assert _cfg(tiny_cache, tmp_path, "x", online_teacher="tokenpose-tiny").view_source() == "fresh"
    assert _cfg(tiny_cache, tmp_path, "x").view_source() == "cache"
    # The no-distillation baseline matched to an online-fresh run: fresh views, no teacher.
    assert _cfg(tiny_cache, tmp_path, "x", no_distill=True, online_views="fresh").view_source() == "fresh"
    assert _cfg(tiny_cache, tmp_path, "x", no_distill=True).view_source() == "cache"
    with pytest.raises(UserError, match="--exclude-view0 chooses among the cached views; fresh views are always"):
        check_cache_for_run(_cfg(tiny_cache, tmp_path, "x", no_distill=True, online_views="fresh", exclude_view0=True))


@pytest.mark.timeout(420)
def test_fresh_view_run_trains_resumes_and_refuses_another_mode(
    local_ray, tiny_cache, tiny_teacher, tmp_path, capsys
) -> None:
    """The teacher in the loop on fresh views through Ray Train: one epoch, a resume in
    another mode refused, and a short resume (one more epoch: the default suite's 1 + 1)."""
    online = dict(online_teacher="tokenpose-tiny", teacher_checkpoint=tiny_teacher, online_views="fresh")
    # One worker: the split over ranks and their lockstep are checked above without Ray.
    result = run_distill(_cfg(tiny_cache, tmp_path, "fresh", workers=1, **online))
    assert "online teacher tokenpose-tiny on fresh views" in capsys.readouterr().out
    rows = read_csv(Path(result.run_dir) / "logs" / "epochs.csv")
    assert [int(float(r["epoch"])) for r in rows] == [1]
    assert np.isfinite([float(rows[-1][f"train/{t}"]) for t in TERMS]).all()
    from distilpose.models.checkpoints import load_checkpoint

    _, extra = load_checkpoint(result.exported["latest"])
    assert extra["online_teacher"] == "tokenpose-tiny" and extra["online_views"] == "fresh"
    assert json.loads((Path(result.run_dir) / "run.json").read_text())["online_views"] == "fresh"
    with pytest.raises(UserError, match="online_views: run has 'fresh', this command 'cache'"):
        prepare_run(_cfg(tiny_cache, tmp_path, "fresh", **{**online, "online_views": "cache"}))
    resumed = run_distill(_cfg(tiny_cache, tmp_path, "fresh", workers=1, epochs=2, **online))
    assert "resuming from its last checkpoint" in capsys.readouterr().out and resumed.resumed
    assert resumed.metrics["step"] == 2 * result.metrics["step"]
    rows = read_csv(Path(result.run_dir) / "logs" / "epochs.csv")
    assert [int(float(r["epoch"])) for r in rows] == [1, 2]


@pytest.mark.heavy  # a third Train fit beside the default suite's fresh-view run: ~30 s
@pytest.mark.timeout(300)
def test_matched_baseline_trains_l_reg_only_on_fresh_views(local_ray, tiny_cache, tmp_path, capsys) -> None:
    # 3 epochs with checkpoints every 2: at 2, and at 3 (the last epoch always gets one).
    baseline = dict(workers=1, no_distill=True, online_views="fresh", checkpoint_every=2)
    result = run_distill(_cfg(tiny_cache, tmp_path, "none-fresh", epochs=3, **baseline))
    assert "no distillation (L_reg only) on fresh views" in capsys.readouterr().out
    rows = read_csv(Path(result.run_dir) / "logs" / "epochs.csv")
    assert [int(float(r["epoch"])) for r in rows] == [1, 2, 3]
    assert "train/reg" in rows[0] and not any(f"train/{t}" in rows[0] for t in TERMS if t != "reg")
    assert sorted(p.name for p in Path(result.run_dir).glob("epoch_*")) == ["epoch_0002", "epoch_0003"]
    assert json.loads((Path(result.run_dir) / "run.json").read_text())["online_views"] == "fresh"


def test_online_teacher_defaults_to_the_caches_teacher_checkpoint(tiny_cache, tmp_path, capsys) -> None:
    from pipeline.cache.manifest import TeacherInfo
    from pipeline.distill.checks import with_online_teacher_checkpoint

    cache_teacher = TeacherInfo(preset="tokenpose-tiny", checkpoint_sha256="abc", checkpoint="/ckpt/teacher.pt")
    online = _cfg(tiny_cache, tmp_path, "x", online_teacher="tokenpose-tiny")
    assert with_online_teacher_checkpoint(online, cache_teacher).teacher_checkpoint == "/ckpt/teacher.pt"
    given = _cfg(tiny_cache, tmp_path, "x", online_teacher="tokenpose-tiny", teacher_checkpoint="/mine.pt")
    assert with_online_teacher_checkpoint(given, cache_teacher).teacher_checkpoint == "/mine.pt"
    other = TeacherInfo(preset="tokenpose-w48", checkpoint_sha256="abc", checkpoint="/ckpt/w48.pt")
    assert with_online_teacher_checkpoint(online, other).teacher_checkpoint is None
    assert "runs a seeded random init" in capsys.readouterr().out
    cached = _cfg(tiny_cache, tmp_path, "x")
    assert with_online_teacher_checkpoint(cached, cache_teacher).teacher_checkpoint is None
