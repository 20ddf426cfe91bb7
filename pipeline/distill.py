"""Distill a student from the teacher cache with Ray Train (V2 TorchTrainer, DDP).

Each worker reads its shards of the cache (pipeline.distill_data), rebuilds the exact
cached view of every image, and minimises

    L = L_reg + a_KT L_KT + a_VT L_VT + a_SH L_SH + a_CS L_CS      (distilpose.losses)

A checkpoint (model, optimizer, scheduler, epoch, step, RNG states) is committed to
`<storage>/<name>` every epoch; relaunching the same command with the same name resumes
from it, and a killed worker makes Ray Train restart the worker group from it.
`online_teacher` runs the teacher in the loop on the same views (the official code's way,
the baseline the cache is measured against); `no_distill` trains with L_reg alone.

Storage writes: Ray Train uploads checkpoints itself (pyarrow `copy_files`; on S3 every
request is retried by the AWS SDK's retry strategy, which `build_trainer` sets to
`S3_RETRY_ATTEMPTS`; an upload that still fails fails the report, and the worker group
restarts from the last committed checkpoint). Everything this module writes (metrics logs,
run record, exported students) goes through `pipeline.storage`, which retries transient S3
errors.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np

from pipeline import storage
from pipeline.progress import Poller

CHECKPOINT_FILE = "state.pt"
RUN_FILE = "run.json"  # what the run is; a resume must match it
S3_RETRY_ATTEMPTS = 10  # per S3 request of Ray's checkpoint uploads (the SDK default is 3)
LOCAL_PATH_FIELDS = ("storage", "cache", "data", "val", "teacher_checkpoint", "init_backbone", "pid_dir")
# Config fields that change what a run trains; resuming a run with other values would mix two runs.
IDENTITY_FIELDS = (
    "student",
    "no_distill",
    "alpha_kt",
    "alpha_vt",
    "alpha_sh",
    "alpha_cs",
    "sh_weighting",
    "online_teacher",
    "seed",
)


@dataclass
class DistillConfig:
    cache: str
    student: str
    storage: str = "runs"
    name: str = "distill"
    epochs: int = 300
    batch_size: int = 32
    workers: int = 1
    gpu: bool = False
    cpus_per_worker: float = 1.0
    lr: float = 1e-3
    warmup_iters: int = 500
    lr_steps: tuple[int, ...] | None = None  # default: 2/3 and 13/15 of the epochs (200, 260 of 300)
    alpha_kt: float = 5e-4
    alpha_vt: float = 5e-4
    alpha_sh: float = 1.0
    alpha_cs: float = 0.01
    sh_weighting: str = "per-sample"
    no_distill: bool = False
    online_teacher: str | None = None
    teacher_checkpoint: str | None = None
    init_backbone: str | None = None
    # "official" keeps the N(0, 0.001) convs of the official code; "kaiming" (He init) learns
    # much faster in short runs (see distilpose.teacher_training.reinit_backbone).
    backbone_init: str = "official"
    data: str | None = None  # data set root for images; defaults to the one the cache records
    val: str | None = None  # data set root whose val split is evaluated at the end
    val_boxes: str = "gt"
    eval_every: int = 0
    flip_test: bool = True
    amp: bool = False
    seed: int = 0
    max_failures: int = 2
    log_every: int = 10
    # Batches built ahead in a loader thread; None: 2 on GPU workers or with >= 2 CPUs per
    # worker, else 0 (on one CPU the thread competes with the training step).
    prefetch: int | None = None
    placement_strategy: str = "PACK"  # "SPREAD": one worker per node where the cluster allows
    expect_teacher: dict = field(default_factory=dict)  # manifest keys the cache must match
    # Test hooks: a worker writes its pid (rank<r>.pid) and where it started training
    # (start-rank<r>-<pid>.json) here so fault tests can kill it and check the restart.
    pid_dir: str | None = None
    step_sleep_s: float = 0.0

    def alphas(self) -> dict[str, float]:
        if self.no_distill:
            return {"alpha_kt": 0.0, "alpha_vt": 0.0, "alpha_sh": 0.0, "alpha_cs": 0.0}
        return {k: getattr(self, k) for k in ("alpha_kt", "alpha_vt", "alpha_sh", "alpha_cs")}

    def milestones(self) -> tuple[int, ...]:
        if self.lr_steps is not None:
            return tuple(self.lr_steps)
        return (round(self.epochs * 2 / 3), round(self.epochs * 13 / 15))

    def teacher_fields(self) -> tuple[str, ...]:
        """Teacher fields the enabled loss terms read (from the cache or the online teacher)."""
        from distilpose.losses import DistillLoss

        return tuple(DistillLoss(**self.alphas(), sh_weighting=self.sh_weighting).needed_teacher_fields)


def run_dir(cfg: DistillConfig) -> str:
    return storage.join(cfg.storage, cfg.name)


def export_uri(cfg: DistillConfig, which: str) -> str:
    """Where the run's exported student is: which = "latest" or "best"."""
    return storage.join(run_dir(cfg), "export", f"student_{which}.pt")


def resolve_paths(cfg: DistillConfig) -> DistillConfig:
    """A copy with local paths made absolute. Ray workers do not share the driver's working
    directory (and Tune trials chdir into their trial folder), so a relative path would
    point somewhere else there."""
    changes = {}
    for name in LOCAL_PATH_FIELDS:
        value = getattr(cfg, name)
        if value and storage.is_local(value):
            changes[name] = storage.local_path(value)
    if cfg.val_boxes != "gt" and storage.is_local(cfg.val_boxes):
        changes["val_boxes"] = storage.local_path(cfg.val_boxes)
    return dataclasses.replace(cfg, **changes)


# ----------------------------------------------------------------------------- worker side


def lr_lambda_factory(warmup_iters: int, milestones_steps: tuple[int, ...]):
    """Linear warm-up from 0.001 x lr, then x0.1 at each milestone (per-iteration schedule)."""

    def factor(step: int) -> float:
        decay = 0.1 ** sum(step >= m for m in milestones_steps)
        if warmup_iters and step < warmup_iters:
            return decay * (0.001 + (1 - 0.001) * step / warmup_iters)
        return decay

    return factor


def _rng_state() -> dict:
    import torch

    name, keys, pos, has_gauss, gauss = np.random.get_state()
    version, mt, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        # The whole generator state (key, position, cached gaussian), not only the key.
        "numpy": [keys.tolist(), int(pos), int(has_gauss), float(gauss)],
        "python": [int(version), list(mt), gauss_next],
    }


def _set_rng_state(state: dict) -> None:
    import torch

    torch.set_rng_state(state["torch"])
    keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state(("MT19937", np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, mt, gauss_next = state["python"]
    random.setstate((version, tuple(mt), gauss_next))


def train_loop_per_worker(config: dict) -> None:
    import ray.train
    import torch
    from ray.train.torch import prepare_model

    from distilpose.losses import DistillLoss
    from distilpose.models import build_model
    from distilpose.teacher_training import reinit_backbone
    from pipeline.cache import open_reader
    from pipeline.cache_loader import CachedViewStream

    cfg = DistillConfig(**config)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if cfg.pid_dir:
        _write_pid(cfg.pid_dir, rank)
    torch.manual_seed(cfg.seed + rank)
    np.random.seed(cfg.seed + rank)
    random.seed(cfg.seed + rank)
    if not cfg.gpu:
        torch.set_num_threads(max(1, round(cfg.cpus_per_worker)))
    device = ray.train.torch.get_device()

    reader = open_reader(cfg.cache)
    loss_fn = DistillLoss(**cfg.alphas(), sh_weighting=cfg.sh_weighting)
    needed = tuple(loss_fn.needed_teacher_fields)
    layout = _image_layout(cfg, reader)
    student = build_model(cfg.student)
    reinit_backbone(student, cfg.backbone_init)  # before a teacher init, which overwrites it
    if cfg.init_backbone:
        from distilpose.models.checkpoints import init_student_backbone_from_teacher

        init_student_backbone_from_teacher(student, storage.local_copy(cfg.init_backbone))
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
        prefetch=loader_prefetch(cfg),
    )
    teacher = _online_teacher(cfg, device) if cfg.online_teacher and needed else None

    model = prepare_model(student)
    core = model.module if hasattr(model, "module") else model
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    milestones = tuple(m * stream.steps for m in cfg.milestones())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda_factory(cfg.warmup_iters, milestones))
    scaler = torch.amp.GradScaler("cuda", enabled=cfg.amp and device.type == "cuda")

    start_epoch, step, best = 0, 0, {}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            state = torch.load(os.path.join(d, CHECKPOINT_FILE), map_location="cpu", weights_only=True)
        core.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, step = state["epoch"] + 1, state["step"]
        best = json.loads(state["best"])
        _set_rng_state(state["rng"][rank] if rank < len(state["rng"]) else state["rng"][0])
        if rank == 0:
            print(_resume_line(start_epoch, step, cfg.epochs), flush=True)
    if cfg.pid_dir:
        _record_start(cfg.pid_dir, rank, start_epoch)

    logger = MetricsLogger(run_dir(cfg), completed_epochs=start_epoch) if rank == 0 else None
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        sums: dict[str, float] = {}
        t0, seen = time.perf_counter(), 0
        for batch in stream.epoch(epoch):
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
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
        means = _mean_over_ranks({k: v / max(1, stream.steps) for k, v in sums.items()}, device)
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
            metrics.update(_evaluate(core, cfg, device))
            if "AP" in metrics and metrics["AP"] >= best.get("AP", -1.0):
                best = {"AP": metrics["AP"], "epoch": epoch + 1}
                # Written now: with num_to_keep checkpoints the best epoch's may be gone later.
                save_student(
                    export_uri(cfg, "best"),
                    core,
                    _export_extra(cfg, epoch + 1, metrics, needed),
                )
        metrics["best_AP"] = best.get("AP", -1.0)
        rng_states = _gather_rng_states(world)
        if rank == 0:
            logger.epoch(metrics)
            print(_epoch_line(metrics), flush=True)
            with tempfile.TemporaryDirectory() as d:
                torch.save(
                    {
                        "model": core.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "epoch": epoch,
                        "step": step,
                        "best": json.dumps(best),
                        "rng": rng_states,
                        "config": json.dumps(dataclasses.asdict(cfg)),
                        "student_config": json.dumps(dataclasses.asdict(core.config)),
                        "metrics": json.dumps(metrics),
                        "teacher_fields": json.dumps(list(needed)),
                    },
                    os.path.join(d, CHECKPOINT_FILE),
                )
                ray.train.report(
                    metrics,
                    checkpoint=ray.train.Checkpoint.from_directory(d),
                    checkpoint_dir_name=f"epoch_{epoch + 1:04d}",
                )
        else:
            ray.train.report(metrics)
    if logger:
        logger.close()


def loader_prefetch(cfg: DistillConfig) -> int:
    if cfg.prefetch is not None:
        return cfg.prefetch
    return 2 if cfg.gpu or cfg.cpus_per_worker >= 2 else 0


def _write_pid(pid_dir: str, rank: int) -> None:
    # Atomic: a reader never sees an empty file.
    storage.atomic_write_bytes(os.path.join(pid_dir, f"rank{rank}.pid"), str(os.getpid()).encode())


def _record_start(pid_dir: str, rank: int, start_epoch: int) -> None:
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


def _resume_line(start_epoch: int, step: int, epochs: int) -> str:
    if start_epoch >= epochs:
        return f"[distill] resumed: all {epochs} epochs are already trained (step {step}); nothing to do"
    return (
        f"[distill] resuming at epoch {start_epoch + 1}/{epochs} from the epoch {start_epoch} checkpoint (step {step})"
    )


def _mean_over_ranks(values: dict[str, float], device) -> dict[str, float]:
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    keys = sorted(values)  # every rank has the same loss terms
    totals = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(totals)
    return {k: float(v) / dist.get_world_size() for k, v in zip(keys, totals.tolist())}


def _gather_rng_states(world: int) -> list:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        states = [None] * world
        dist.all_gather_object(states, _rng_state())
        return states
    return [_rng_state()]


def _epoch_line(metrics: dict) -> str:
    parts = [
        f"[distill] epoch {int(metrics['epoch'])}/{int(metrics.get('epochs', 0)) or '?'}",
        f"loss {metrics.get('train/loss', 0):.5f}",
        f"{metrics['samples_per_s']:.1f} samples/s",
        f"lr {metrics['lr']:.2e}",
    ]
    if "AP" in metrics:
        parts.append(f"val AP {metrics['AP']:.4f}")
    return "  ".join(parts)


def _image_layout(cfg: DistillConfig, reader) -> dict:
    """Image root and image-id -> file map for rebuilding views (not needed with stored crops)."""
    from distilpose.data.coco import load_coco

    if reader.spec.store_crops:
        return {"image_root": None, "image_files": {}}
    data = reader.manifest.data
    ann_file, image_root = data.ann_file, data.image_root
    if cfg.data:
        from pipeline.dataset_layout import resolve_layout

        layout = resolve_layout(cfg.data, data.split)
        ann_file, image_root = layout.ann_file, layout.image_root
    _, images = load_coco(ann_file)
    return {"image_root": image_root, "image_files": {i: info.file_name for i, info in images.items()}}


def _online_teacher(cfg: DistillConfig, device):
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


def _evaluate(model, cfg: DistillConfig, device) -> dict:
    from distilpose.evaluate import evaluate_model
    from pipeline.dataset_layout import resolve_layout

    layout = resolve_layout(cfg.val, "val")
    was_training = model.training
    model.eval()
    stats = evaluate_model(
        model, layout.ann_file, layout.image_root, boxes=cfg.val_boxes, flip_test=cfg.flip_test, device=device
    )
    model.train(was_training)
    return {k: float(v) for k, v in stats.items() if isinstance(v, int | float) and not isinstance(v, bool)}


def _export_extra(cfg: DistillConfig, epoch: int, metrics: dict, teacher_fields) -> dict:
    return {
        "run": cfg.name,
        "epoch": int(epoch),
        "metrics": {k: float(v) for k, v in metrics.items() if isinstance(v, int | float)},
        "teacher_fields": list(teacher_fields),
        "online_teacher": cfg.online_teacher or "",
    }


def save_student(uri: str, model, extra: dict) -> None:
    """The student in our checkpoint format (distilpose.models.checkpoints) at a local or S3 URI."""
    from distilpose.models.checkpoints import save_checkpoint

    with tempfile.TemporaryDirectory() as d:
        local = os.path.join(d, "student.pt")
        save_checkpoint(local, model, extra=extra)
        with open(local, "rb") as f:
            data = f.read()
    storage.atomic_write_bytes(uri, data)


class MetricsLogger:
    """Rank 0's per-step and per-epoch metrics: CSV + TensorBoard under `<run dir>/logs`.

    Files are written locally and copied to the run dir after each epoch, so the same code
    serves local and s3:// storage. On resume the history is kept up to the epoch the
    checkpoint holds (rows of an epoch that was not committed are dropped).
    """

    def __init__(self, run_uri: str, completed_epochs: int = 0):
        from torch.utils.tensorboard import SummaryWriter

        self.remote = storage.join(run_uri, "logs")
        self.local = tempfile.mkdtemp(prefix="distill-logs-")
        self.rows: dict[str, list[dict]] = {}
        for name in ("steps.csv", "epochs.csv"):
            uri = storage.join(self.remote, name)
            old = list(csv.DictReader(io.StringIO(storage.read_bytes(uri).decode()))) if storage.exists(uri) else []
            self.rows[name] = [r for r in old if int(float(r["epoch"])) <= completed_epochs]
            self._write(name)
        self.tb = SummaryWriter(os.path.join(self.local, "tensorboard"))

    def _write(self, name: str) -> None:
        rows = self.rows[name]
        columns = list(dict.fromkeys(k for row in rows for k in row))  # union, first-seen order
        with open(os.path.join(self.local, name), "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)

    def step(self, step: int, epoch: int, losses: dict, lr: float) -> None:
        row = {"step": step, "epoch": epoch + 1, "lr": lr, **losses}
        rows = self.rows["steps.csv"]
        rows.append(row)
        if len(rows) == 1 or list(rows[-2]) != list(row):
            self._write("steps.csv")  # (new) header
        else:
            with open(os.path.join(self.local, "steps.csv"), "a", newline="") as f:  # same columns: append
                csv.DictWriter(f, fieldnames=list(row)).writerow(row)
        for k, v in losses.items():
            self.tb.add_scalar(f"step/{k}", v, step)

    def epoch(self, metrics: dict) -> None:
        self.rows["epochs.csv"].append(metrics)
        self._write("epochs.csv")  # AP columns appear only on evaluated epochs: rewrite
        for k, v in metrics.items():
            if isinstance(v, int | float):
                self.tb.add_scalar(f"epoch/{k}", v, metrics["epoch"])
        self.tb.flush()
        self._upload()

    def _upload(self) -> None:
        for root, _, files in os.walk(self.local):
            for name in files:
                rel = os.path.relpath(os.path.join(root, name), self.local)
                with open(os.path.join(root, name), "rb") as f:
                    storage.atomic_write_bytes(storage.join(self.remote, *rel.split(os.sep)), f.read())

    def close(self) -> None:
        self.tb.close()
        shutil.rmtree(self.local, ignore_errors=True)


# ----------------------------------------------------------------------------- driver side


@dataclass
class DistillResult:
    run_dir: str
    metrics: dict
    exported: dict[str, str]
    resumed: bool
    wall_s: float


def check_cache_for_run(cfg: DistillConfig):
    """Refuse early (on the driver) a cache that is incomplete, made for another
    teacher/data, or whose teacher does not fit the student. Returns the cache's manifest."""
    from pipeline.cache import open_reader
    from pipeline.cache.manifest import check_compatible
    from pipeline.cache_loader import steps_per_epoch

    reader = open_reader(cfg.cache)  # no manifest yet: "not finalized" error naming the commits
    if not reader.manifest.complete:
        raise ValueError(f"cache {cfg.cache} is not complete; finish it with jobs/cache_teacher.py (it resumes)")
    if cfg.expect_teacher:
        check_compatible(reader.manifest, cfg.expect_teacher, uri=cfg.cache)
    check_student_fits(cfg, reader.manifest)
    if cfg.data:
        check_data_matches(cfg, reader.manifest)
    steps_per_epoch(reader, cfg.workers, cfg.batch_size)  # raises when a worker would get no batch
    return reader.manifest


def check_student_fits(cfg: DistillConfig, manifest) -> None:
    """The student's crops, joints and tokens must line up with the teacher's, or the loss
    would compare unrelated tensors (or fail deep inside a worker)."""
    from distilpose.models import get_config
    from pipeline.cache.schema import CacheMismatchError

    student = get_config(cfg.student)
    if student.kind != "student":
        raise ValueError(f"--student {cfg.student!r} is a {student.kind} preset, not a student")
    fields = cfg.teacher_fields()
    if cfg.online_teacher:
        source, teacher = f"online teacher {cfg.online_teacher!r}", get_config(cfg.online_teacher)
        have = {
            "input size": tuple(teacher.input_size),
            "joints": teacher.num_joints,
            "heatmap size": tuple(teacher.heatmap_size),
            "token dim": teacher.dim,
            "visual tokens": teacher.num_patches,
        }
    else:
        spec = manifest.spec
        source = f"teacher cache {cfg.cache} (teacher {manifest.teacher.preset!r})"
        have = {
            "input size": tuple(manifest.teacher.config.get("input_size", student.input_size)),
            "joints": spec.num_joints,
            "heatmap size": tuple(spec.heatmap_size),
            "token dim": spec.dim,
            "visual tokens": spec.num_patches,
        }
    want = {
        "input size": tuple(student.input_size),  # cached joints / crops are in this crop's pixels
        "joints": student.num_joints,
        "heatmap size": tuple(student.heatmap_size) if "heatmaps" in fields else have["heatmap size"],
        "token dim": student.dim if {"kpt_tokens", "vis_tokens"} & set(fields) else have["token dim"],
        "visual tokens": student.num_patches if "vis_tokens" in fields else have["visual tokens"],
    }
    differences = [f"{key}: {have[key]} vs student {want[key]}" for key in want if have[key] != want[key]]
    if differences:
        raise CacheMismatchError(
            f"student {cfg.student!r} does not fit the {source}:\n  - "
            + "\n  - ".join(differences)
            + "\nUse a cache made by a matching teacher, or pick a student preset of the same size."
        )


def check_data_matches(cfg: DistillConfig, manifest) -> None:
    """Views are rebuilt from --data's images: its annotation file must be the cached one."""
    from distilpose.data.coco import data_fingerprint
    from pipeline.cache.schema import CacheMismatchError
    from pipeline.dataset_layout import resolve_layout

    layout = resolve_layout(cfg.data, manifest.data.split)
    found = data_fingerprint(layout.ann_file).sha256
    if found != manifest.data.ann_file_sha256:
        raise CacheMismatchError(
            f"--data {cfg.data}: {layout.ann_file} (sha256 {found[:12]}...) is not the annotation file the "
            f"cache {cfg.cache} was built from (sha256 {manifest.data.ann_file_sha256[:12]}..., "
            f"{manifest.data.ann_file}); the cached views would be cut from the wrong images"
        )


def run_identity(cfg: DistillConfig, manifest) -> dict:
    identity = {k: getattr(cfg, k) for k in IDENTITY_FIELDS}
    identity["cache_teacher"] = f"{manifest.teacher.preset}:{manifest.teacher.checkpoint_sha256}"
    identity["cache_data"] = manifest.data.ann_file_sha256
    return json.loads(json.dumps(identity))


def check_run_record(cfg: DistillConfig, manifest, resumed: bool) -> None:
    """Write `<run>/run.json` on a fresh start; on resume refuse a different student, loss
    or teacher cache (the checkpoint would be continued with another objective)."""
    uri = storage.join(run_dir(cfg), RUN_FILE)
    identity = run_identity(cfg, manifest)
    if resumed and storage.exists(uri):
        recorded = json.loads(storage.read_bytes(uri))
        differences = [
            f"{k}: run has {recorded.get(k)!r}, this command {v!r}" for k, v in identity.items() if recorded.get(k) != v
        ]
        if differences:
            raise ValueError(
                f"run '{cfg.name}' at {run_dir(cfg)} was started with another configuration:\n  - "
                + "\n  - ".join(differences)
                + "\nUse a new --name to start a separate run (or the original settings to resume it)."
            )
        return
    storage.atomic_write_bytes(uri, (json.dumps(identity, indent=2) + "\n").encode())


def prepare_run(cfg: DistillConfig) -> tuple[DistillConfig, bool]:
    """Driver-side checks before a fit: absolute paths, cache, resume or fresh start.
    Returns the resolved config and whether the run resumes."""
    cfg = resolve_paths(cfg)
    manifest = check_cache_for_run(cfg)
    resumed = is_resume(cfg)
    check_run_record(cfg, manifest, resumed)
    if resumed:
        print(
            f"[distill] run '{cfg.name}' exists at {run_dir(cfg)}: resuming from its last checkpoint "
            "(use a new --name to start fresh)",
            flush=True,
        )
    else:
        print(f"[distill] starting new run '{cfg.name}' at {run_dir(cfg)}", flush=True)
    warn_if_cluster_too_small(cfg)
    return cfg, resumed


def worker_resources(cfg: DistillConfig) -> dict[str, float]:
    """What each training worker asks Ray for (a run needs `workers` times this)."""
    resources = {"CPU": cfg.cpus_per_worker}
    if cfg.gpu:
        resources["GPU"] = 1
    return resources


def warn_if_cluster_too_small(cfg: DistillConfig) -> None:
    """Ray Train waits, silently and forever, for resources that never come."""
    import ray

    if not ray.is_initialized():
        return
    have = ray.cluster_resources()
    need = {k: cfg.workers * v for k, v in worker_resources(cfg).items()}
    short = {k: (v, have.get(k, 0.0)) for k, v in need.items() if v and have.get(k, 0.0) < v}
    if short:
        text = ", ".join(f"{k} {v:g} needed, {h:g} in the cluster" for k, (v, h) in short.items())
        print(f"[distill] WARNING: {text}; training waits until the cluster grows (autoscaler)", flush=True)


def build_trainer(cfg: DistillConfig, callbacks=None):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    cfg = resolve_paths(cfg)
    storage_path, filesystem = ray_storage(cfg.storage)
    run_config = RunConfig(
        name=cfg.name,
        storage_path=storage_path,
        storage_filesystem=filesystem,
        failure_config=FailureConfig(max_failures=cfg.max_failures),
        checkpoint_config=CheckpointConfig(num_to_keep=2),
        callbacks=callbacks,
    )
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=dataclasses.asdict(cfg),
        scaling_config=ScalingConfig(
            num_workers=cfg.workers,
            use_gpu=cfg.gpu,
            resources_per_worker=worker_resources(cfg),
            placement_strategy=cfg.placement_strategy,
        ),
        run_config=run_config,
    )


def ray_storage(uri: str):
    """(storage_path, storage_filesystem) for Ray Train's RunConfig.

    Local: an absolute path. S3: `bucket/prefix` plus a pyarrow S3FileSystem with a stronger
    per-request retry strategy for checkpoint uploads; endpoint and region come from the same
    environment as `pipeline.storage`, credentials from the AWS chain on each node (the
    filesystem is pickled to the workers without them).
    """
    if storage.is_local(uri):
        return storage.local_path(uri), None
    import pyarrow.fs

    options = {"retry_strategy": pyarrow.fs.AwsStandardS3RetryStrategy(max_attempts=S3_RETRY_ATTEMPTS)}
    endpoint = os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        scheme, _, host = endpoint.rpartition("://")
        options.update(endpoint_override=host.rstrip("/"), scheme=scheme or "https")
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        options["region"] = region
    _, path = storage.open_fs(uri)
    return path, pyarrow.fs.S3FileSystem(**options)


def is_resume(cfg: DistillConfig) -> bool:
    return storage.exists(storage.join(run_dir(cfg), "checkpoint_manager_snapshot.json"))


def finished_run(cfg: DistillConfig) -> dict | None:
    """The exported student's record when the run already trained all its epochs, else None."""
    from distilpose.models.checkpoints import load_checkpoint

    latest = export_uri(cfg, "latest")
    if not storage.exists(latest):
        return None
    _, extra = load_checkpoint(storage.local_copy(latest))
    return extra if extra and int(extra.get("epoch", -1)) >= cfg.epochs else None


def run_distill(cfg: DistillConfig) -> DistillResult:
    cfg, resumed = prepare_run(cfg)
    t0 = time.perf_counter()
    done = finished_run(cfg) if resumed else None
    if done is not None:
        # Nothing left to train: no worker group is started (a fit would cost ~15 s for nothing).
        print(f"[distill] run '{cfg.name}' already finished {done['epoch']} epochs; reusing it", flush=True)
        exported = {"latest": export_uri(cfg, "latest")}
        best = export_uri(cfg, "best")
        if storage.exists(best):
            exported["best"] = best
        return DistillResult(run_dir(cfg), dict(done["metrics"]), exported, True, time.perf_counter() - t0)
    with EpochProgress(run_dir(cfg)):
        result = build_trainer(cfg).fit()
    if result.error:
        raise result.error
    exported = export_checkpoints(cfg, result)
    metrics = dict(result.metrics or {})
    return DistillResult(run_dir(cfg), metrics, exported, resumed, time.perf_counter() - t0)


def export_checkpoints(cfg: DistillConfig, result) -> dict[str, str]:
    """Latest student in our checkpoint format, plus the best-by-AP one when evaluated
    (written by rank 0 when it was reached)."""
    import torch

    from distilpose.models import build_model

    if result.checkpoint is None:
        raise RuntimeError(f"run '{cfg.name}' finished without a committed checkpoint in {run_dir(cfg)}")
    with result.checkpoint.as_directory() as d:
        state = torch.load(os.path.join(d, CHECKPOINT_FILE), map_location="cpu", weights_only=True)
    model = build_model(cfg.student)
    model.load_state_dict(state["model"])
    fields = json.loads(state.get("teacher_fields", "[]"))
    extra = _export_extra(cfg, state["epoch"] + 1, json.loads(state["metrics"]), fields)
    exported = {"latest": export_uri(cfg, "latest")}
    save_student(exported["latest"], model, extra)
    best_uri = export_uri(cfg, "best")
    if json.loads(state["best"]) and storage.exists(best_uri):
        exported["best"] = best_uri
    return exported


class EpochProgress(Poller):
    """Prints each new row of the run's epochs.csv and the latest step from steps.csv."""

    def __init__(self, run_uri: str, interval_s: float = 10.0):
        super().__init__(self._report, interval_s)
        self.epochs_uri = storage.join(run_uri, "logs", "epochs.csv")
        self.steps_uri = storage.join(run_uri, "logs", "steps.csv")
        self.seen_epochs = len(self._rows(self.epochs_uri))
        self.last_step = None

    @staticmethod
    def _rows(uri: str) -> list[dict]:
        if not storage.exists(uri):
            return []
        return list(csv.DictReader(io.StringIO(storage.read_bytes(uri).decode())))

    def _report(self) -> None:
        epochs = self._rows(self.epochs_uri)
        # A resumed run first drops the rows of epochs that were never committed.
        for row in epochs[min(self.seen_epochs, len(epochs)) :]:
            metrics = {k: float(v) for k, v in row.items() if v not in ("", None)}
            print(_epoch_line(metrics), flush=True)
        self.seen_epochs = len(epochs)
        steps = self._rows(self.steps_uri)
        if steps and steps[-1].get("step") != self.last_step:
            last = steps[-1]
            self.last_step = last.get("step")
            print(f"[distill]   step {last['step']} (epoch {last['epoch']}) loss {float(last['loss']):.5f}", flush=True)
