"""The training loop of one Ray Train worker (rank): read this rank's share of the cache,
rebuild the cached views (or draw fresh ones for the online teacher), minimise the
distillation loss, and let rank 0 commit a checkpoint (`TrainState`), the metrics logs and
the best student every epoch."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import tempfile
import time

import numpy as np

from pipeline import storage
from pipeline.distill.config import DistillConfig, export_uri, loader_prefetch, run_dir
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
    import ray.train
    import torch
    from ray.train.torch import prepare_model

    from distilpose.device import to_device
    from distilpose.losses import DistillLoss
    from distilpose.schedule import scaled_warmup, step_schedule
    from pipeline.cache import open_reader
    from pipeline.cache_loader import CachedViewStream
    from pipeline.fresh_views import fresh_stream_for_rank

    cfg = DistillConfig(**config)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if cfg.pid_dir:
        write_pid(cfg.pid_dir, rank)
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
    if cfg.view_source() == "fresh":
        ann_file, image_root = data_files(cfg, reader)
        stream = fresh_stream_for_rank(
            reader,
            ann_file,
            image_root,
            input_size=student.config.input_size,
            rank=rank,
            world_size=world,
            batch_size=cfg.batch_size,
            seed=cfg.seed,
            prefetch=loader_prefetch(cfg),
            pin_memory=device.type == "cuda",
        )
    else:
        layout = image_layout(cfg, reader)
        stream = CachedViewStream(
            reader,
            image_root=layout["image_root"],
            image_files=layout["image_files"],
            input_size=student.config.input_size,
            teacher_fields=() if cfg.online_teacher else needed,  # columnar: only what the loss reads
            rank=rank,
            world_size=world,
            batch_size=cfg.batch_size,
            seed=cfg.seed,
            cache_views=cfg.cache_views,
            exclude_view0=cfg.exclude_view0,
            label_flip=cfg.label_flip,
            prefetch=loader_prefetch(cfg),
            pin_memory=device.type == "cuda",  # pinned in the loader thread: the copy below is async
        )
    teacher = online_teacher(cfg, device) if cfg.online_teacher and needed else None

    model = prepare_model(student)
    core = model.module if hasattr(model, "module") else model
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    milestones = tuple(m * stream.steps for m in cfg.milestones())
    warmup = scaled_warmup(cfg.warmup_iters, stream.steps * cfg.epochs)  # the driver logs which
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, step_schedule(warmup, milestones))
    scaler = torch.amp.GradScaler("cuda", enabled=cfg.amp and device.type == "cuda")

    start_epoch, step, best = 0, 0, {}
    if checkpoint:
        state = load_state(checkpoint)
        state.restore(core, optimizer, scheduler, scaler, rank)
        start_epoch, step, best = state.epochs_done, state.step, state.best
        if rank == 0:
            print(resume_line(start_epoch, step, cfg.epochs), flush=True)
    if cfg.pid_dir:
        record_start(cfg.pid_dir, rank, start_epoch)

    logger = MetricsLogger(run_dir(cfg), completed_epochs=start_epoch) if rank == 0 else None
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        sums: dict[str, float] = {}
        t0, seen = time.perf_counter(), 0
        for batch in stream.epoch(epoch):
            batch = to_device(batch, device)
            with torch.autocast(device.type, dtype=torch.float16, enabled=scaler.is_enabled()):
                out = model(batch["image"])
                targets = teacher(batch["image"]) if teacher is not None else batch
                total, terms = loss_fn(out, batch["target"], batch["target_weight"], targets)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(total).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            step += 1
            seen += len(batch["image"])
            losses = {k: float(v.detach()) for k, v in {"loss": total, **terms}.items()}
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + v
            if logger and step % cfg.log_every == 0:
                logger.step(step, epoch, losses, scheduler.get_last_lr()[0])
            if cfg.step_sleep_s:
                time.sleep(cfg.step_sleep_s)
        elapsed = time.perf_counter() - t0
        # Every rank saw a different part of the data: report the mean over all of them.
        means = mean_over_ranks({k: v / max(1, stream.steps) for k, v in sums.items()}, device)
        metrics = {f"train/{k}": v for k, v in means.items()}
        metrics.update(
            {
                "epoch": epoch + 1,
                "epochs": cfg.epochs,
                "step": step,
                "lr": scheduler.get_last_lr()[0],
                "epoch_time_s": elapsed,
                "samples_per_s": seen * world / max(elapsed, 1e-9),
            }
        )
        final = epoch + 1 == cfg.epochs
        if rank == 0 and cfg.val and (final or (cfg.eval_every and (epoch + 1) % cfg.eval_every == 0)):
            metrics.update(evaluate(core, cfg, device))
            if "AP" in metrics and metrics["AP"] >= best.get("AP", -1.0):
                best = {"AP": metrics["AP"], "epoch": epoch + 1}
                # Written now: with num_to_keep checkpoints the best epoch's may be gone later.
                save_student(
                    export_uri(cfg, "best"),
                    core,
                    export_extra(cfg, epoch + 1, metrics, needed),
                )
        metrics["best_AP"] = best.get("AP", -1.0)
        if rank == 0:
            logger.epoch(metrics)
            print(epoch_line(metrics), flush=True)
        if not (final or (epoch + 1) % cfg.checkpoint_every == 0):
            ray.train.report(metrics)
            continue
        # Built on every rank: gathering the ranks' RNG states is a collective.
        state = TrainState(
            model=core.state_dict(),
            optimizer=optimizer.state_dict(),
            scheduler=scheduler.state_dict(),
            scaler=scaler.state_dict(),
            epochs_done=epoch + 1,
            step=step,
            best=best,
            rng=gather_rng_states(world),
            metrics=metrics,
            teacher_fields=list(needed),
            config=dataclasses.asdict(cfg),
            student_config=dataclasses.asdict(core.config),
        )
        if rank == 0:
            with tempfile.TemporaryDirectory() as d:
                state.save(os.path.join(d, CHECKPOINT_FILE))
                write_checkpoint_record(cfg, epoch + 1, step)
                ray.train.report(
                    metrics,
                    checkpoint=ray.train.Checkpoint.from_directory(d),
                    checkpoint_dir_name=checkpoint_dir_name(epoch + 1),
                    checkpoint_upload_fn=upload_checkpoint(cfg),
                )
        else:
            ray.train.report(metrics)
    if logger:
        logger.close()


def build_student(cfg: DistillConfig, cache_teacher, fresh: bool):
    """The student as training starts: the conv init, then on a fresh start the backbone start
    the recipe or --init-backbone chooses (pipeline.backbone_init; a resumed run loads every
    weight from its checkpoint). Returns (model, the backbone log line or "")."""
    from distilpose.models import build_model
    from distilpose.teacher_training import reinit_backbone
    from pipeline.backbone_init import apply_backbone_init, resolve_backbone_init

    student = build_model(cfg.student)
    reinit_backbone(student, cfg.backbone_init)  # before a teacher init, which overwrites it
    if not fresh:
        return student, ""
    choice = resolve_backbone_init(cfg.student, cfg.init_backbone, cache_teacher)
    return student, apply_backbone_init(student, choice)


def write_pid(pid_dir: str, rank: int) -> None:
    """Test hook: this worker's pid, for fault tests to kill it (atomic: never read empty)."""
    storage.atomic_write_bytes(os.path.join(pid_dir, f"rank{rank}.pid"), str(os.getpid()).encode())


def record_start(pid_dir: str, rank: int, start_epoch: int) -> None:
    """Test hook: which process started training where (fault tests read these)."""
    import ray

    record = {
        "rank": rank,
        "pid": os.getpid(),
        "node_id": ray.get_runtime_context().get_node_id(),
        "start_epoch": start_epoch,
        "time": time.time(),
    }
    path = os.path.join(pid_dir, f"start-rank{rank}-{os.getpid()}.json")
    storage.atomic_write_bytes(path, json.dumps(record).encode())


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
    """Annotation file and image root of the cached split: as recorded, or under --data."""
    data = reader.manifest.data
    if not cfg.data:
        return data.ann_file, data.image_root
    from pipeline.dataset_layout import resolve_layout

    layout = resolve_layout(cfg.data, data.split)
    return layout.ann_file, layout.image_root


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
        return {
            "heatmaps": out.heatmaps.float(),
            "kpt_tokens": out.kpt_tokens.float(),
            "vis_tokens": out.vis_tokens.float(),
        }

    return run


def evaluate(model, cfg: DistillConfig, device) -> dict:
    from distilpose.evaluate import evaluate_model
    from pipeline.dataset_layout import resolve_layout

    layout = resolve_layout(cfg.val, "val")
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
