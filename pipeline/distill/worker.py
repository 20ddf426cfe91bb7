"""The training loop of one Ray Train worker (rank): read this rank's share of the cache,
rebuild the cached views (or draw fresh ones for the online teacher), minimise the
distillation loss, and let rank 0 commit a checkpoint (`TrainState`), the metrics logs and
the best student every epoch.

Three pieces: `build` (seeding, the batch stream, the student, optimizer and schedule, the
resume), `train_one_epoch` (the steps) and `end_of_epoch` (metrics, evaluation, the best
student, the checkpoint). What they share is one `WorkerRun`.
"""

from __future__ import annotations

import dataclasses
import os
import random
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline import storage
from pipeline.distill.config import (
    DistillConfig,
    cached_split_files,
    export_uri,
    loader_prefetch,
    run_dir,
    val_split_files,
)
from pipeline.distill.hooks import WorkerHooks
from pipeline.distill.logs import MetricsLogger, epoch_line, resume_line
from pipeline.distill.state import (
    CHECKPOINT_FILE,
    TrainState,
    checkpoint_dir_name,
    export_extra,
    gather_rng_states,
    load_state,
    save_student,
    upload_checkpoint,
    write_checkpoint_record,
)


def train_loop_per_worker(config: dict) -> None:
    """Ray Train's entry point; `config` is `train_loop_config(cfg, hooks)`."""
    run = build(DistillConfig(**config["config"]), WorkerHooks.from_dict(config.get("hooks")))
    try:
        for epoch in range(run.start_epoch, run.cfg.epochs):
            stats = train_one_epoch(run, epoch)
            end_of_epoch(run, epoch, stats)
    finally:
        run.stream.close()  # stops the loader processes, if any
    if run.logger:
        run.logger.close()


def train_loop_config(cfg: DistillConfig, hooks: WorkerHooks | None = None) -> dict:
    """What the driver hands every worker: the run's config and the (test-only) hooks."""
    return {"config": dataclasses.asdict(cfg), "hooks": hooks.to_dict() if hooks else None}


@dataclass
class WorkerRun:
    """One worker's training state between the three pieces."""

    cfg: DistillConfig
    hooks: WorkerHooks
    rank: int
    world: int
    device: Any
    stream: Any  # CachedViewStream or FreshViewStream: .steps, .epoch(e)
    loss_fn: Any
    needed: tuple[str, ...]  # teacher fields the loss reads
    teacher: Any  # the online teacher (images -> teacher fields), or None
    model: Any  # the DDP-wrapped student
    core: Any  # the student itself
    optimizer: Any
    scheduler: Any
    scaler: Any
    start_epoch: int = 0
    step: int = 0
    best: dict = field(default_factory=dict)
    logger: MetricsLogger | None = None


@dataclass
class EpochStats:
    sums: dict[str, float]  # summed loss terms over the epoch's steps
    seen: int  # samples this rank trained on
    elapsed_s: float


def build(cfg: DistillConfig, hooks: WorkerHooks) -> WorkerRun:
    """Everything before the first step, in an order a resume reproduces bitwise: seeds, the
    student, the stream, the optimizer and schedule, then the checkpoint's state (RNGs included)."""
    import ray.train
    import torch
    from ray.train.torch import prepare_model

    from distilpose.losses import DistillLoss
    from distilpose.schedule import scaled_warmup, step_schedule
    from pipeline.cache import open_reader

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    hooks.worker_started(rank)
    torch.manual_seed(cfg.seed + rank)
    np.random.seed(cfg.seed + rank)
    random.seed(cfg.seed + rank)
    if not cfg.gpu:
        torch.set_num_threads(max(1, round(cfg.cpus_per_worker)))
    device = ray.train.torch.get_device()

    reader = open_reader(cfg.cache)
    loss_fn = DistillLoss(**cfg.alphas(), sh_weighting=cfg.loss_sh_weighting())
    needed = tuple(loss_fn.needed_teacher_fields)
    checkpoint = ray.train.get_checkpoint()
    # The driver has printed the backbone line (checks.backbone_line): worker output is hidden by default.
    student, _ = build_student(cfg, reader.manifest.teacher, fresh=checkpoint is None)
    stream = batch_stream(cfg, reader, student.config.input_size, needed, rank, world, device)
    teacher = online_teacher(cfg, device) if cfg.online_teacher and needed else None

    model = prepare_model(student)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    milestones = tuple(m * stream.steps for m in cfg.milestones())
    warmup = scaled_warmup(cfg.warmup_iters, stream.steps * cfg.epochs)  # the driver logs which
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, step_schedule(warmup, milestones))
    scaler = torch.amp.GradScaler("cuda", enabled=cfg.amp and device.type == "cuda")
    run = WorkerRun(
        cfg=cfg,
        hooks=hooks,
        rank=rank,
        world=world,
        device=device,
        stream=stream,
        loss_fn=loss_fn,
        needed=needed,
        teacher=teacher,
        model=model,
        core=model.module if hasattr(model, "module") else model,
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=scaler,
    )
    if checkpoint:
        resume(run, checkpoint)
    hooks.training_starts(rank, run.start_epoch)
    run.logger = MetricsLogger(run_dir(cfg), completed_epochs=run.start_epoch) if rank == 0 else None
    return run


def resume(run: WorkerRun, checkpoint) -> None:
    """Restore the model, optimizer, schedule, scaler and this rank's RNG states."""
    state = load_state(checkpoint)
    state.restore(run.core, run.optimizer, run.scheduler, run.scaler, run.rank)
    run.start_epoch, run.step, run.best = state.epochs_done, state.step, state.best
    if run.rank == 0:
        print(resume_line(run.start_epoch, run.step, run.cfg.epochs), flush=True)


def batch_stream(cfg: DistillConfig, reader, input_size, needed: tuple[str, ...], rank: int, world: int, device):
    """This rank's batches: fresh augmentations of the cache's instances, or the cached views."""
    from pipeline.cache_loader import CachedViewStream
    from pipeline.fresh_views import fresh_stream_for_rank

    pin_memory = device.type == "cuda"  # pinned in the loader thread: the step's copy is async
    if cfg.view_source() == "fresh":
        ann_file, image_root = data_files(cfg, reader)
        return fresh_stream_for_rank(
            reader,
            ann_file,
            image_root,
            input_size=input_size,
            rank=rank,
            world_size=world,
            batch_size=cfg.batch_size,
            seed=cfg.seed,
            prefetch=loader_prefetch(cfg),
            pin_memory=pin_memory,
        )
    layout = image_layout(cfg, reader)
    return CachedViewStream(
        reader,
        image_root=layout["image_root"],
        image_files=layout["image_files"],
        input_size=input_size,
        teacher_fields=() if cfg.online_teacher else needed,  # columnar: only what the loss reads
        rank=rank,
        world_size=world,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        cache_views=cfg.cache_views,
        exclude_view0=cfg.exclude_view0,
        label_flip=cfg.label_flip,
        prefetch=loader_prefetch(cfg),
        pin_memory=pin_memory,
        normalize=device.type != "cuda",  # a GPU normalizes the uint8 images (student_batch.on_device)
        processes=cfg.loader_processes,
    )


def train_one_epoch(run: WorkerRun, epoch: int) -> EpochStats:
    """The epoch's steps; step metrics rows go to rank 0's log every `log_every` steps."""
    import torch

    from pipeline.student_batch import on_device

    cfg, model, optimizer, scheduler, scaler = run.cfg, run.model, run.optimizer, run.scheduler, run.scaler
    model.train()
    sums: dict[str, float] = {}
    t0, seen = time.perf_counter(), 0
    for batch in run.stream.epoch(epoch):
        batch = on_device(batch, run.device)
        with torch.autocast(run.device.type, dtype=torch.float16, enabled=scaler.is_enabled()):
            out = model(batch["image"])
            targets = run.teacher(batch["image"]) if run.teacher is not None else batch
            total, terms = run.loss_fn(out, batch["target"], batch["target_weight"], targets)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(total).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        run.step += 1
        seen += len(batch["image"])
        losses = {k: float(v.detach()) for k, v in {"loss": total, **terms}.items()}
        for k, v in losses.items():
            sums[k] = sums.get(k, 0.0) + v
        if run.logger and run.step % cfg.log_every == 0:
            run.logger.step(run.step, epoch, losses, scheduler.get_last_lr()[0])
        run.hooks.step_done()
    return EpochStats(sums, seen, time.perf_counter() - t0)


def end_of_epoch(run: WorkerRun, epoch: int, stats: EpochStats) -> None:
    """Metrics (mean over ranks), evaluation and the best student on rank 0, then the report
    to Ray Train, with a checkpoint every `checkpoint_every` epochs and after the last."""
    import ray.train

    cfg = run.cfg
    metrics = epoch_metrics(run, epoch, stats)
    final = epoch + 1 == cfg.epochs
    if run.rank == 0 and cfg.has_val_source() and (final or (cfg.eval_every and (epoch + 1) % cfg.eval_every == 0)):
        metrics.update(evaluate(run.core, cfg, run.device))
        if "AP" in metrics and metrics["AP"] >= run.best.get("AP", -1.0):
            run.best = {"AP": metrics["AP"], "epoch": epoch + 1}
            # Written now: with num_to_keep checkpoints the best epoch's may be gone later.
            save_student(export_uri(cfg, "best"), run.core, export_extra(cfg, epoch + 1, metrics, run.needed))
    metrics["best_AP"] = run.best.get("AP", -1.0)
    if run.rank == 0:
        run.logger.epoch(metrics)
        print(epoch_line(metrics), flush=True)
    if not (final or (epoch + 1) % cfg.checkpoint_every == 0):
        ray.train.report(metrics)
        return
    # Built on every rank: gathering the ranks' RNG states is a collective.
    state = TrainState(
        model=run.core.state_dict(),
        optimizer=run.optimizer.state_dict(),
        scheduler=run.scheduler.state_dict(),
        scaler=run.scaler.state_dict(),
        epochs_done=epoch + 1,
        step=run.step,
        best=run.best,
        rng=gather_rng_states(run.world),
        metrics=metrics,
        teacher_fields=list(run.needed),
        config=dataclasses.asdict(cfg),
        student_config=dataclasses.asdict(run.core.config),
    )
    if run.rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as d:
        state.save(os.path.join(d, CHECKPOINT_FILE))
        write_checkpoint_record(cfg, epoch + 1, run.step)
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(d),
            checkpoint_dir_name=checkpoint_dir_name(epoch + 1),
            checkpoint_upload_fn=upload_checkpoint(cfg),
        )


def epoch_metrics(run: WorkerRun, epoch: int, stats: EpochStats) -> dict:
    # Every rank saw a different part of the data: report the mean over all of them.
    means = mean_over_ranks({k: v / max(1, run.stream.steps) for k, v in stats.sums.items()}, run.device)
    metrics: dict = {f"train/{k}": v for k, v in means.items()}
    metrics.update(
        {
            "epoch": epoch + 1,
            "epochs": run.cfg.epochs,
            "step": run.step,
            "lr": run.scheduler.get_last_lr()[0],
            "epoch_time_s": stats.elapsed_s,
            "samples_per_s": stats.seen * run.world / max(stats.elapsed_s, 1e-9),
        }
    )
    return metrics


def build_student(cfg: DistillConfig, cache_teacher, fresh: bool):
    """The student as training starts: the conv init, then on a fresh start the backbone start
    the recipe or --init-backbone chooses (pipeline.backbone_start; a resumed run loads every
    weight from its checkpoint). Returns (model, the backbone log line or "")."""
    from distilpose.models import build_model
    from distilpose.models.conv_init import apply_conv_init
    from pipeline.backbone_start import apply_backbone_start, resolve_backbone_start

    student = build_model(cfg.student)
    apply_conv_init(student, cfg.conv_init)  # before a teacher init, which overwrites it
    if not fresh:
        return student, ""
    choice = resolve_backbone_start(cfg.student, cfg.init_backbone, cache_teacher)
    return student, apply_backbone_start(student, choice)


def mean_over_ranks(values: dict[str, float], device) -> dict[str, float]:
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    keys = sorted(values)  # every rank has the same loss terms
    totals = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(totals)
    return {k: float(v) / dist.get_world_size() for k, v in zip(keys, totals.tolist())}


def data_files(cfg: DistillConfig, reader) -> tuple[str, str]:
    """Annotation file and image root of the cached split: as recorded, or the data source's."""
    files = cached_split_files(cfg, reader.manifest.data)
    return files.ann_file, files.image_root


def image_layout(cfg: DistillConfig, reader) -> dict:
    """Image root and image-id -> file map for rebuilding views (not needed with stored crops)."""
    from distilpose.data.coco import load_coco

    if reader.spec.store_crops:
        return {"image_root": None, "image_files": {}}
    ann_file, image_root = data_files(cfg, reader)
    _, images = load_coco(ann_file)
    return {"image_root": image_root, "image_files": {i: info.file_name for i, info in images.items()}}


def online_teacher(cfg: DistillConfig, device):
    """The teacher in the loop: a callable batch -> dict of teacher fields (no grad)."""
    import torch

    from distilpose.teacher_forward import build_teacher

    # build_teacher seeds a checkpoint-less (random) teacher exactly like the cache job does,
    # so every rank - and the cache - has the same teacher; fork_rng keeps that seeding
    # from touching this worker's own RNG stream.
    with torch.random.fork_rng():
        checkpoint = storage.local_copy(cfg.teacher_checkpoint) if cfg.teacher_checkpoint else None
        teacher = build_teacher(cfg.online_teacher, checkpoint)
    teacher.to(device).eval()

    def run(images):
        with torch.no_grad():
            out = teacher(images)
        # A heatmap teacher (SimpleBaseline, HRNet) has no tokens: only the fields it outputs.
        names = ("heatmaps", "kpt_tokens", "vis_tokens")
        return {name: getattr(out, name).float() for name in names if hasattr(out, name)}

    return run


def evaluate(model, cfg: DistillConfig, device) -> dict:
    from distilpose.evaluate import evaluate_model

    layout = val_split_files(cfg)
    was_training = model.training
    model.eval()
    stats = evaluate_model(
        model,
        layout.ann_file,
        layout.image_root,
        boxes=cfg.val_boxes,
        flip_test=cfg.flip_test,
        flip_mode=cfg.flip_mode(),
        device=device,
    )
    model.train(was_training)
    return {k: float(v) for k, v in stats.items() if isinstance(v, int | float) and not isinstance(v, bool)}
