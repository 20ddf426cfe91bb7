"""Distillation from the teacher cache: the view stream, the lr schedule, driver-side checks,
and 2-worker DDP runs on a local Ray (checkpoints, logs, export, resume, loss terms,
online teacher).

Runs share the session's local Ray (3 logical CPUs: 2 workers + headroom) and tiny cache
(tests/pipeline_fixtures.py). The default suite makes 4 fits of ~20-40 s each; the bitwise
resume comparison (3 more fits) is a heavy test.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from pipeline_fixtures import ensure_local_ray, epochs_of, read_csv

from distilpose.errors import UserError
from distilpose.losses import DistillLoss
from distilpose.models import get_config
from distilpose.schedule import step_schedule
from pipeline.cache import open_reader
from pipeline.cache.schema import CacheMismatchError
from pipeline.cache_loader import BASE_FIELDS, CachedViewStream, steps_per_epoch
from pipeline.distill import DistillConfig, prepare_run, run_distill
from pipeline.distill.state import export_extra
from pipeline.distill.worker import build_student

STUDENT = "distilpose-tiny"
RAY_TIMEOUT = pytest.mark.timeout(300)  # one fit (plus the module's Ray start / first run)
TERMS = ("reg", "kt", "vt", "sh", "cs")


def _stream(reader, data_root=None, rank=0, world=2, batch=4, seed=0, fields=()):
    from distilpose.data.coco import load_coco

    _, images = load_coco(reader.manifest.data.ann_file)
    return CachedViewStream(
        reader,
        image_root=reader.manifest.data.image_root,
        image_files={i: info.file_name for i, info in images.items()},
        input_size=(128, 96),
        teacher_fields=fields,
        rank=rank,
        world_size=world,
        batch_size=batch,
        seed=seed,
    )


class SpyReader:
    """A cache reader that records which fields every shard read asked for."""

    def __init__(self, reader):
        self._reader, self.requests = reader, []

    def __getattr__(self, name):
        return getattr(self._reader, name)

    def read_shard(self, index, fields=None, decode=True, view=None):
        assert view is not None, "the loader reads one view's unit, never a whole shard"
        self.requests.append(tuple(fields))
        return self._reader.read_shard(index, fields=fields, decode=decode, view=view)


# ----------------------------------------------------------------------------- unit tests


def test_lr_schedule_warmup_then_steps() -> None:
    f = step_schedule(warmup_iters=10, milestones=(20, 30))
    assert f(0) == pytest.approx(0.001)
    assert f(5) == pytest.approx(0.001 + 0.999 * 0.5)
    assert [f(s) for s in (10, 19)] == [1.0, 1.0]
    assert f(20) == pytest.approx(0.1) and f(29) == pytest.approx(0.1)
    assert f(30) == pytest.approx(0.01) and f(10_000) == pytest.approx(0.01)
    assert step_schedule(0, ())(0) == 1.0
    # The recipe's defaults: x0.1 at 2/3 and 13/15 of the epochs (200 and 260 of 300).
    assert DistillConfig(cache="c", student=STUDENT, epochs=300).milestones() == (200, 260)
    assert DistillConfig(cache="c", student=STUDENT, lr_steps=(3,)).milestones() == (3,)


def test_short_run_warmup_is_scaled_to_the_schedule_and_logged() -> None:
    from distilpose.schedule import scaled_warmup
    from pipeline.distill.checks import warmup_line

    # 1 epoch of 100 steps with the recipe's 500-iteration warm-up: cut to 10% of the run,
    # so the run trains at the full lr instead of ending at lr x 0.2.
    assert scaled_warmup(500, 100) == 10
    f = step_schedule(scaled_warmup(500, 100), milestones=())
    assert f(99) == 1.0
    assert step_schedule(500, ())(99) == pytest.approx(0.001 + 0.999 * 99 / 500)
    assert scaled_warmup(500, 300 * 3000) == 500  # a full run keeps the recipe's warm-up
    assert (scaled_warmup(500, 5), scaled_warmup(0, 100)) == (1, 0)
    cfg = DistillConfig(cache="c", student=STUDENT, epochs=1)
    assert warmup_line(cfg, 100) == (
        "[distill] lr warm-up scaled to 10 of 100 iterations (--warmup-iters 500 is more than 10% of this run)"
    )
    assert warmup_line(cfg, 100_000) == "[distill] lr warm-up: 500 of 100000 iterations"


def test_stream_equal_steps_one_view_per_instance(tiny_cache) -> None:
    reader = open_reader(tiny_cache)
    views = reader.manifest.views
    streams = [_stream(reader, rank=r) for r in range(2)]
    steps = steps_per_epoch(reader, 2, 4)
    assert steps > 0 and all(s.steps == steps for s in streams)
    # Ranks own disjoint shards; each yields exactly `steps` full batches per epoch.
    seen_by_rank = []
    for stream in streams:
        ids = []
        for epoch in range(2):
            batches = list(stream.epoch(epoch))
            assert len(batches) == steps and all(len(b["image"]) == 4 for b in batches)
            epoch_ids = torch.cat([b["instance_id"] for b in batches]).tolist()
            assert len(epoch_ids) == len(set(epoch_ids)), "an instance came twice in one epoch"
            ids += epoch_ids
        seen_by_rank.append(set(ids))
    assert not seen_by_rank[0] & seen_by_rank[1]
    # One cached view per instance per epoch, and over epochs the other views get used.
    stream, chosen = streams[0], {}
    for epoch in range(6):
        for shard in stream.assignment.shards:
            rows = stream._load_shard(shard, ("instance_id", "view"), epoch)
            assert len(rows["instance_id"]) == len(set(rows["instance_id"].tolist()))
            assert len(rows["instance_id"]) * views == reader.shard_info(shard).rows
            for i, v in zip(rows["instance_id"].tolist(), rows["view"].tolist()):
                chosen.setdefault(i, set()).add(v)
    assert set().union(*chosen.values()) == set(range(views))


def test_device_normalization_gives_the_cpu_batches(tiny_cache) -> None:
    """A GPU worker's loader leaves the images uint8 (normalize=False) and `on_device`
    normalizes them: the same float32 values the CPU loader hands over, bitwise."""
    from pipeline.student_batch import on_device

    reader = open_reader(tiny_cache)
    cpu, deferred = _stream(reader), _stream(reader)
    deferred.normalize = False
    for x, y in zip(cpu.epoch(2), deferred.epoch(2), strict=True):
        assert y["image"].dtype == torch.uint8 and y["image"].shape == x["image"].shape
        y = on_device(y, torch.device("cpu"))
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


@pytest.mark.timeout(240)
def test_loader_processes_build_the_same_batches_and_stop(tiny_cache, tmp_path) -> None:
    """Batches read and built in 2 loader processes are the in-process ones, bitwise and in
    order (crops rebuilt from the images, teacher fields, label flips), over several epochs,
    after an epoch abandoned early; a failure in a process reaches the training process;
    close() stops the processes."""

    from distilpose.data.coco import ImageError
    from distilpose.losses import DistillLoss

    reader = open_reader(tiny_cache)
    fields = DistillLoss().needed_teacher_fields
    # One shard per shuffle pool and batches of 3 (shards of 16, 16, 15 rows): several pools,
    # rows carried from pool to pool, read buffers handed back and reused.
    plain, parallel = (_stream(reader, world=1, batch=3, fields=fields) for _ in range(2))
    for stream in (plain, parallel):
        stream.maker.label_flip = True
        stream.shuffle_shards = 1
    parallel.processes = 2
    try:
        abandoned = parallel.epoch(3)  # an epoch left after two batches: nothing of it comes back later
        next(abandoned), next(abandoned)
        abandoned.close()
        for epoch in (0, 1):
            a, b = list(plain.epoch(epoch)), list(parallel.epoch(epoch))
            assert len(a) == len(b) == plain.steps
            for x, y in zip(a, b):
                assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
        procs = parallel._pool.procs
        assert len(procs) == 2 and all(p.is_alive() for p in procs)
        # An image that is gone: the process's error is raised in the training process.
        images = tmp_path / "images"
        shutil.copytree(reader.manifest.data.image_root, images)
        broken = _stream(reader, fields=fields)
        broken.maker.image_root, broken.processes = str(images), 2
        for name in os.listdir(images):
            os.remove(images / name)
        with pytest.raises(ImageError):
            list(broken.epoch(0))
        broken.close()
    finally:
        parallel.close()
    assert not any(p.is_alive() for p in procs)


def test_prefetch_keeps_the_order_and_stops_cleanly(tiny_cache) -> None:
    import threading

    from pipeline.cache_loader import _prefetched

    reader = open_reader(tiny_cache)
    plain, ahead = _stream(reader), _stream(reader)
    plain.prefetch, ahead.prefetch = 0, 2
    a, b = list(plain.epoch(1)), list(ahead.epoch(1))
    assert len(a) == len(b) == plain.steps
    for x, y in zip(a, b):
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)

    def failing():
        yield 1
        raise OSError("shard unreadable")

    with pytest.raises(OSError, match="shard unreadable"):
        list(_prefetched(failing(), 2))
    # A consumer that stops early stops the producer (no thread left blocked on the queue).
    for _ in _prefetched(iter(range(1000)), 2):
        break
    assert not any(t.name == "cache-prefetch" and t.is_alive() for t in threading.enumerate())
    # Distillation turns it on where a worker has CPU to spare for it.
    from pipeline.distill import loader_prefetch

    assert loader_prefetch(DistillConfig(cache="c", student=STUDENT)) == 0
    assert loader_prefetch(DistillConfig(cache="c", student=STUDENT, gpu=True)) == 2
    assert loader_prefetch(DistillConfig(cache="c", student=STUDENT, cpus_per_worker=4)) == 2
    assert loader_prefetch(DistillConfig(cache="c", student=STUDENT, gpu=True, prefetch=0)) == 0


def test_stream_is_deterministic_per_seed_and_epoch(tiny_cache) -> None:
    reader = open_reader(tiny_cache)

    def order(seed, epoch):
        batches = _stream(reader, seed=seed).epoch(epoch)
        return [(tuple(b["instance_id"].tolist()), float(b["image"].sum())) for b in batches]

    first = order(0, 1)
    assert order(0, 1) == first  # a restarted worker replays the same epoch
    assert order(0, 2) != first
    assert order(1, 1) != first


def test_stream_reads_only_needed_teacher_fields(tiny_cache) -> None:
    """Columnar reads: the loss's teacher fields, nothing more (none for --no-distill)."""
    no_distill = DistillLoss(0.0, 0.0, 0.0, 0.0).needed_teacher_fields
    sh_only = DistillLoss(alpha_kt=0.0, alpha_vt=0.0, alpha_sh=1.0, alpha_cs=0.0).needed_teacher_fields
    assert no_distill == () and sh_only == ("heatmaps",)
    for needed in (no_distill, sh_only, DistillLoss().needed_teacher_fields):
        spy = SpyReader(open_reader(tiny_cache))
        batch = next(iter(_stream(spy, fields=needed).epoch(0)))
        assert spy.requests and all(set(r) == set(BASE_FIELDS) | set(needed) for r in spy.requests)
        teacher_keys = {"heatmaps", "kpt_tokens", "vis_tokens"} & set(batch)
        assert teacher_keys == set(needed)


def test_rebuilt_views_are_the_cached_ones(tiny_cache, tiny_teacher) -> None:
    """The crop rebuilt from the image is the one the teacher saw: the teacher (built the way
    the online-teacher mode builds it) reproduces the cached outputs of exactly these views,
    up to one quantization step of the cache's encodings."""
    from distilpose.teacher_forward import build_teacher
    from pipeline.cache.encodings import decode_field, encode_field

    reader = open_reader(tiny_cache)
    fields = ("heatmaps", "kpt_tokens", "vis_tokens")
    batch = next(iter(_stream(reader, world=1, batch=8, fields=fields).epoch(0)))
    with torch.random.fork_rng():
        teacher = build_teacher("tokenpose-tiny", tiny_teacher)
    with torch.no_grad():
        out = teacher(batch["image"])
    for name in fields:
        ours = getattr(out, name).numpy()
        stored = decode_field(name, encode_field(name, ours, reader.spec), reader.spec)
        cached = batch[name].numpy()
        # Coarser of the u8 / int8 steps; the per-token scales of two encodings of nearly equal
        # outputs differ in the last fp32 bits, hence the relative epsilon.
        step = np.abs(cached).max() / 127 * (1 + 1e-5)
        assert np.abs(stored - cached).max() <= step, name
        assert np.abs(np.roll(stored, 1, axis=0) - cached).max() > 10 * step, name  # other views differ


def test_stream_refuses_impossible_splits(tiny_cache) -> None:
    reader = open_reader(tiny_cache)
    with pytest.raises(ValueError, match="3 shard\\(s\\) for 4 workers"):
        steps_per_epoch(reader, 4, 1)
    with pytest.raises(ValueError, match="lower --batch-size or --workers"):
        steps_per_epoch(reader, 2, 64)


# ----------------------------------------------------------------------------- driver checks


def _cfg(cache, storage, name, **kw) -> DistillConfig:
    base = dict(student=STUDENT, epochs=2, batch_size=4, workers=2, warmup_iters=2, log_every=1, max_failures=0)
    return DistillConfig(cache=cache, storage=str(storage), name=name, **{**base, **kw})


def test_cache_mismatch_refused_before_training(tiny_cache, tmp_path) -> None:
    # Paper-size student against the tiny teacher's cache: crops, heatmaps, tokens differ.
    with pytest.raises(CacheMismatchError, match="does not fit the teacher cache") as err:
        run_distill(_cfg(tiny_cache, tmp_path, "big", student="distilpose-s"))
    dim = get_config("tokenpose-tiny").dim
    for what in (
        "input size: teacher (128, 96), student (256, 192)",
        f"token dim: teacher {dim}, student 192",
        "heatmap size",
    ):
        assert what in str(err.value)
    # A cache made by another teacher checkpoint than the one asked for.
    with pytest.raises(CacheMismatchError, match="teacher checkpoint") as err:
        run_distill(_cfg(tiny_cache, tmp_path, "t", expect_teacher={"teacher.checkpoint_sha256": "ab" * 32}))
    assert open_reader(tiny_cache).manifest.teacher.checkpoint_sha256 in str(err.value)
    # Images from another data set than the cached one.
    from distilpose.data.synthetic import make_synthetic_coco

    other = tmp_path / "other-data"
    make_synthetic_coco(str(other), 2, 0, seed=5)
    with pytest.raises(CacheMismatchError, match="not the annotation file the cache"):
        run_distill(_cfg(tiny_cache, tmp_path, "d", data=str(other)))
    assert not (tmp_path / "big").exists() and not (tmp_path / "t").exists()


def test_incomplete_cache_refused(tiny_cache, tmp_path) -> None:
    partial = tmp_path / "partial-cache"
    shutil.copytree(tiny_cache, partial)
    (partial / "manifest.json").unlink()  # the job died before finalizing (3 shards x 2 views)
    with pytest.raises(FileNotFoundError, match="not finalized \\(6 shard-view\\(s\\) committed\\)"):
        run_distill(_cfg(str(partial), tmp_path, "p"))
    with pytest.raises(UserError, match="cache .*nothing does not exist"):  # not "not finalized"
        run_distill(_cfg(str(tmp_path / "nothing"), tmp_path, "p"))


def test_profile_sets_the_loss_and_flip_test_and_the_run_record_says_both(tiny_cache, tmp_path, capsys) -> None:
    default = _cfg(tiny_cache, tmp_path, "official")
    assert (default.profile, default.loss_sh_weighting(), default.flip_mode()) == ("official", "official", "official")
    intended = _cfg(tiny_cache, tmp_path, "intended", profile="intended")
    assert (intended.loss_sh_weighting(), intended.flip_mode()) == ("per-sample", "exact")
    # An explicit --sh-weighting overrides the profile's; the run record states both.
    cfg, _ = prepare_run(_cfg(tiny_cache, tmp_path, "mixed", sh_weighting="per-sample"))
    record = json.loads((tmp_path / "mixed" / "run.json").read_text())
    assert (record["profile"], record["sh_weighting"]) == ("official", "per-sample")
    assert "profile official" in capsys.readouterr().out
    assert export_extra(cfg, 1, {}, ())["profile"] == "official"
    # Resuming under another profile is another run.
    (tmp_path / "mixed" / "last_checkpoint.json").write_text("{}")
    with pytest.raises(ValueError, match="profile: run has 'official', this command 'intended'"):
        prepare_run(_cfg(tiny_cache, tmp_path, "mixed", sh_weighting="per-sample", profile="intended"))


def test_l_student_starts_from_the_cache_teacher(tiny_cache, tiny_teacher, tmp_path, capsys) -> None:
    """DistilPose-L default: the teacher checkpoint the cache manifest records. The driver
    records the choice; the worker's build_student loads it (a fit is not needed to see it)."""
    cfg, _ = prepare_run(_cfg(tiny_cache, tmp_path, "l", student="distilpose-l-tiny"))
    driver_out = capsys.readouterr().out
    assert "WARNING" not in driver_out
    record = json.loads((tmp_path / "l" / "run.json").read_text())
    assert record["backbone"] == {"source": "the cache's teacher", "checkpoint": tiny_teacher}
    student, line = build_student(cfg, open_reader(tiny_cache).manifest.teacher, fresh=True)
    sha256 = hashlib.sha256(Path(tiny_teacher).read_bytes()).hexdigest()
    tensors = student.backbone.state_dict()
    assert line.startswith(f"backbone: {len(tensors)} tensors from teacher {tiny_teacher} (sha256 {sha256[:12]}")
    # The driver prints the workers' decision once, by default (worker output is hidden).
    assert driver_out.count("backbone:") == 1 and f"[distill] {line}\n" in driver_out
    teacher = torch.load(tiny_teacher, map_location="cpu", weights_only=False)["state_dict"]
    for name, tensor in tensors.items():
        torch.testing.assert_close(tensor, teacher[f"backbone.{name}"], msg=name)
    # A resumed run loads every weight from its checkpoint: no teacher init then.
    assert build_student(cfg, open_reader(tiny_cache).manifest.teacher, fresh=False)[1] == ""
    # --init-backbone none starts from scratch ("none" is not a path to make absolute).
    scratch, _ = prepare_run(_cfg(tiny_cache, tmp_path, "l0", student="distilpose-l-tiny", init_backbone="none"))
    assert scratch.init_backbone == "none"
    assert json.loads((tmp_path / "l0" / "run.json").read_text())["backbone"]["checkpoint"] == ""
    _, line = build_student(scratch, open_reader(tiny_cache).manifest.teacher, fresh=True)
    assert line == "backbone: from scratch (--init-backbone none)"
    assert "[distill] backbone: from scratch (--init-backbone none)\n" in capsys.readouterr().out
    # Resuming loads the checkpoint's weights: no backbone decision to report.
    (tmp_path / "l0" / "last_checkpoint.json").write_text("{}")
    prepare_run(_cfg(tiny_cache, tmp_path, "l0", student="distilpose-l-tiny", init_backbone="none"))
    assert "backbone:" not in capsys.readouterr().out


# ----------------------------------------------------------------------------- Ray runs


@pytest.fixture(scope="module")
def ddp_run(s3_server, tiny_cache, tiny_data, tmp_path_factory):
    """2 workers, 2 epochs, L_KT switched off (alpha 0), val AP every epoch (rank 0 evaluates
    while rank 1 waits)."""
    ensure_local_ray()  # module scope: the function-scoped `local_ray` fixture cannot serve
    storage = tmp_path_factory.mktemp("distill-runs")
    # One loader process per worker: the batches are the in-process ones (checked without
    # Ray above); here the processes start and stop inside Ray Train's workers.
    cfg = _cfg(tiny_cache, storage, "ddp", alpha_kt=0.0, val=tiny_data, eval_every=1, flip_test=False)
    cfg = dataclasses.replace(cfg, loader_processes=1)
    return cfg, run_distill(cfg)


def _terms(rows: list[dict]) -> set[str]:
    return {k.split("/", 1)[1] for k in rows[0] if k.startswith("train/") and k != "train/loss"}


@RAY_TIMEOUT
def test_ddp_two_workers_checkpoints_logs_export(ddp_run) -> None:
    from distilpose.models.checkpoints import load_checkpoint

    cfg, result = ddp_run
    run = Path(result.run_dir)
    assert not result.resumed and result.metrics["epoch"] == 2
    assert sorted(p.name for p in run.glob("epoch_*")) == ["epoch_0001", "epoch_0002"]  # one per epoch
    assert (run / "checkpoint_manager_snapshot.json").exists() and (run / "run.json").exists()
    assert json.loads((run / "last_checkpoint.json").read_text())["epochs_done"] == 2  # our resume record
    rows = read_csv(run / "logs" / "epochs.csv")
    assert epochs_of(run) == [1, 2]
    # Loss terms follow the alphas: L_KT (alpha 0) is absent, the others are present.
    assert _terms(rows) == {"reg", "vt", "sh", "cs"}
    for row in rows:
        total = sum(float(row[f"train/{t}"]) for t in ("reg", "vt", "sh", "cs"))
        assert float(row["train/loss"]) == pytest.approx(total, rel=1e-4)
    steps = read_csv(run / "logs" / "steps.csv")
    assert [int(r["step"]) for r in steps] == list(range(1, 2 * steps_per_epoch(open_reader(cfg.cache), 2, 4) + 1))
    assert list((run / "logs" / "tensorboard").glob("events.out.tfevents.*"))
    model, extra = load_checkpoint(result.exported["latest"])
    assert model.config.name == STUDENT and extra["epoch"] == 2 and extra["run"] == "ddp"
    assert extra["teacher_fields"] == ["vis_tokens", "heatmaps"]
    # Val AP on every epoch; the best epoch's student was exported when it was reached.
    assert all(0.0 <= float(r["AP"]) <= 1.0 for r in rows) and result.metrics["best_AP"] >= 0.0
    best, best_extra = load_checkpoint(result.exported["best"])
    assert best_extra["metrics"]["AP"] == result.metrics["best_AP"]


@pytest.mark.heavy  # a second Train run on top of the DDP run: ~30 s
@RAY_TIMEOUT
def test_resume_continues_at_next_epoch(ddp_run, local_ray, capsys) -> None:
    cfg, first = ddp_run
    capsys.readouterr()
    result = run_distill(DistillConfig(**{**cfg.__dict__, "epochs": 3}))
    out = capsys.readouterr().out
    assert "resuming from its last checkpoint" in out and result.resumed
    assert result.metrics["epoch"] == 3 and result.metrics["step"] == 3 * first.metrics["step"] // 2
    assert epochs_of(first.run_dir) == [1, 2, 3]  # continued, no duplicated rows
    # Only num_to_keep=2 checkpoints stay.
    assert sorted(p.name for p in Path(first.run_dir).glob("epoch_*")) == ["epoch_0002", "epoch_0003"]
    # Another loss on the same run name is refused instead of silently mixed in.
    with pytest.raises(ValueError, match="started with another configuration"):
        run_distill(DistillConfig(**{**cfg.__dict__, "epochs": 4, "alpha_kt": 5e-4}))


@pytest.mark.heavy  # a second Train fit beside the DDP run: ~30 s
@RAY_TIMEOUT
def test_no_distill_fresh_run_reads_no_teacher(ddp_run, local_ray, tiny_cache, capsys) -> None:
    cfg, _ = ddp_run
    capsys.readouterr()
    result = run_distill(_cfg(tiny_cache, cfg.storage, "no-kd", no_distill=True, epochs=1))
    assert "starting new run 'no-kd'" in capsys.readouterr().out and not result.resumed
    run = Path(result.run_dir)
    assert epochs_of(run) == [1]
    assert _terms(read_csv(run / "logs" / "epochs.csv")) == {"reg"}
    from distilpose.models.checkpoints import load_checkpoint

    _, extra = load_checkpoint(result.exported["latest"])
    assert extra["teacher_fields"] == []  # the stream was built without any teacher field


@pytest.mark.heavy  # a second online-teacher fit (the fresh-view one is in the default suite): ~30 s
@RAY_TIMEOUT
def test_online_teacher_runs_on_the_same_views(ddp_run, local_ray, tiny_cache, tiny_teacher) -> None:
    """--online-views cache: the teacher in the loop on the cache's views (fresh views: test_fresh_views.py)."""
    cfg, _ = ddp_run
    online = dict(online_teacher="tokenpose-tiny", teacher_checkpoint=tiny_teacher, online_views="cache")
    result = run_distill(_cfg(tiny_cache, cfg.storage, "online", workers=1, batch_size=8, epochs=1, **online))
    rows = read_csv(Path(result.run_dir) / "logs" / "epochs.csv")
    assert _terms(rows) == set(TERMS)
    assert np.isfinite([float(rows[0][f"train/{t}"]) for t in TERMS]).all()
    from distilpose.models.checkpoints import load_checkpoint

    _, extra = load_checkpoint(result.exported["latest"])
    assert extra["online_teacher"] == "tokenpose-tiny" and extra["online_views"] == "cache"
    assert json.loads((Path(result.run_dir) / "run.json").read_text())["online_views"] == "cache"


def test_job_cli_builds_the_config(monkeypatch) -> None:
    import importlib.util
    import sys

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "jobs"))
    spec = importlib.util.spec_from_file_location("distill_job", Path(sys.path[0]) / "distill.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    import argparse

    parser = argparse.ArgumentParser()
    job.add_distill_args(parser)
    args = parser.parse_args(
        ["--cache", "c", "--student", STUDENT, "--placement-strategy", "SPREAD", "--lr-steps", "3", "5"]
        + ["--expect", "views=2", "--expect", "teacher.preset=tokenpose-tiny", "--no-distill"]
        + ["--prefetch", "3"]
    )
    cfg = job.config_from_args(args)
    assert cfg.placement_strategy == "SPREAD" and cfg.lr_steps == (3, 5) and cfg.no_distill
    assert cfg.prefetch == 3 and job.config_from_args(parser.parse_args(["--cache", "c"])).prefetch is None
    assert cfg.expect_teacher == {"views": 2, "teacher.preset": "tokenpose-tiny"}
    with pytest.raises(ValueError, match="--expect 'views': use KEY=VALUE"):
        job.config_from_args(parser.parse_args(["--cache", "c", "--expect", "views"]))
