"""Distill a student from the teacher cache with Ray Train (V2 TorchTrainer, DDP).

Each worker reads its shards of the cache (pipeline.distill_data), rebuilds the exact
cached view of every image, and minimises

    L = L_reg + a_KT L_KT + a_VT L_VT + a_SH L_SH + a_CS L_CS      (distilpose.losses)

A checkpoint (model, optimizer, scheduler, epoch, step, RNG states) is committed to
`<storage>/<name>` every epoch; relaunching the same command with the same name resumes
from it, and a killed worker makes Ray Train restart the worker group from it.
`online_teacher` runs the teacher in the loop on the same views (the official code's way,
the baseline the cache is measured against); `no_distill` trains with L_reg alone.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import random
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np

from pipeline import storage
from pipeline.progress import Poller

CHECKPOINT_FILE = "state.pt"


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
    data: str | None = None  # data set root for images; defaults to the one the cache records
    val: str | None = None  # data set root whose val split is evaluated at the end
    val_boxes: str = "gt"
    eval_every: int = 0
    flip_test: bool = True
    amp: bool = False
    seed: int = 0
    max_failures: int = 2
    log_every: int = 10
    expect_teacher: dict = field(default_factory=dict)  # manifest keys the cache must match
    # Test hooks: a worker writes its pid here so fault tests can kill it.
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


def run_dir(cfg: DistillConfig) -> str:
    return storage.join(cfg.storage, cfg.name)


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

    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state()[1].tolist(), "python": random.getstate()[1]}


def _set_rng_state(state: dict) -> None:
    import torch

    torch.set_rng_state(state["torch"])
    np_state = np.random.get_state()
    np.random.set_state((np_state[0], np.asarray(state["numpy"], dtype=np.uint32), *np_state[2:]))
    py_state = random.getstate()
    random.setstate((py_state[0], tuple(state["python"]), py_state[2]))


def train_loop_per_worker(config: dict) -> None:
    import ray.train
    import torch
    import torch.distributed as dist
    from ray.train.torch import prepare_model

    from distilpose.losses import DistillLoss
    from distilpose.models import build_model
    from pipeline.cache import open_reader
    from pipeline.distill_data import CachedViewStream

    cfg = DistillConfig(**config)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if cfg.pid_dir:
        os.makedirs(cfg.pid_dir, exist_ok=True)
        with open(os.path.join(cfg.pid_dir, f"rank{rank}.pid"), "w") as f:
            f.write(str(os.getpid()))
    torch.manual_seed(cfg.seed + rank)
    np.random.seed(cfg.seed + rank)
    random.seed(cfg.seed + rank)
    if not cfg.gpu:
        torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    device = ray.train.torch.get_device()

    reader = open_reader(cfg.cache)
    loss_fn = DistillLoss(**cfg.alphas(), sh_weighting=cfg.sh_weighting)
    teacher_fields = () if cfg.online_teacher else tuple(loss_fn.needed_teacher_fields)
    layout = _image_layout(cfg, reader)
    student = build_model(cfg.student)
    if cfg.init_backbone:
        from distilpose.models.checkpoints import init_student_backbone_from_teacher

        init_student_backbone_from_teacher(student, storage.local_copy(cfg.init_backbone))
    stream = CachedViewStream(
        reader,
        image_root=layout["image_root"],
        image_files=layout["image_files"],
        input_size=student.config.input_size,
        teacher_fields=teacher_fields,
        rank=rank,
        world_size=world,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
    )
    teacher = _online_teacher(cfg, device) if cfg.online_teacher and loss_fn.needed_teacher_fields else None

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
            print(f"[distill] resumed from epoch {state['epoch'] + 1} checkpoint (step {step})", flush=True)

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
            for k, v in {"loss": total, **terms}.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
            if logger and step % cfg.log_every == 0:
                logger.step(
                    step,
                    epoch,
                    {k: float(v.detach()) for k, v in {"loss": total, **terms}.items()},
                    scheduler.get_last_lr()[0],
                )
            if cfg.step_sleep_s:
                time.sleep(cfg.step_sleep_s)
        elapsed = time.perf_counter() - t0
        metrics = {f"train/{k}": v / max(1, stream.steps) for k, v in sums.items()}
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
        metrics["best_AP"] = best.get("AP", -1.0)
        if dist.is_available() and dist.is_initialized():
            rng_states = [None] * world
            dist.all_gather_object(rng_states, _rng_state())
        else:
            rng_states = [_rng_state()]
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

    data = reader.manifest.data
    ann_file, image_root = data.ann_file, data.image_root
    if cfg.data:
        from pipeline.dataset_layout import resolve_layout

        layout = resolve_layout(cfg.data, data.split)
        ann_file, image_root = layout.ann_file, layout.image_root
    if reader.spec.store_crops:
        return {"image_root": None, "image_files": {}}
    _, images = load_coco(ann_file)
    return {"image_root": image_root, "image_files": {i: info.file_name for i, info in images.items()}}


def _online_teacher(cfg: DistillConfig, device):
    """The teacher in the loop: a callable batch -> dict of teacher fields (no grad)."""
    import torch

    from distilpose.models.checkpoints import load_teacher

    teacher = load_teacher(
        cfg.online_teacher, storage.local_copy(cfg.teacher_checkpoint) if cfg.teacher_checkpoint else None
    )
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
    from distilpose.validation import evaluate_model
    from pipeline.dataset_layout import resolve_layout

    layout = resolve_layout(cfg.val, "val")
    was_training = model.training
    model.eval()
    stats = evaluate_model(
        model, layout.ann_file, layout.image_root, boxes=cfg.val_boxes, flip_test=cfg.flip_test, device=device
    )
    model.train(was_training)
    return {k: float(v) for k, v in stats.items() if isinstance(v, int | float)}


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
        self.rows["steps.csv"].append(row)
        if len(self.rows["steps.csv"]) == 1:
            self._write("steps.csv")  # header
        else:
            with open(os.path.join(self.local, "steps.csv"), "a", newline="") as f:  # fixed columns: append
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
        for root, _, files in os.walk(self.local):
            for name in files:
                rel = os.path.relpath(os.path.join(root, name), self.local)
                with open(os.path.join(root, name), "rb") as f:
                    storage.atomic_write_bytes(storage.join(self.remote, *rel.split(os.sep)), f.read())


# ----------------------------------------------------------------------------- driver side


@dataclass
class DistillResult:
    run_dir: str
    metrics: dict
    exported: dict[str, str]
    resumed: bool
    wall_s: float


def check_cache_for_run(cfg: DistillConfig) -> None:
    """Refuse early (on the driver) a cache that is incomplete or made for another teacher/data."""
    from pipeline.cache import open_reader
    from pipeline.cache.schema import check_compatible

    reader = open_reader(cfg.cache)
    if not reader.manifest.complete:
        raise ValueError(f"cache {cfg.cache} is not complete; finish it with jobs/cache_teacher.py (it resumes)")
    if cfg.expect_teacher:
        check_compatible(reader.manifest, cfg.expect_teacher, uri=cfg.cache)


def build_trainer(cfg: DistillConfig, callbacks=None):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    run_config = RunConfig(
        name=cfg.name,
        storage_path=_ray_storage_path(cfg.storage),
        failure_config=FailureConfig(max_failures=cfg.max_failures),
        checkpoint_config=CheckpointConfig(num_to_keep=2),
        callbacks=callbacks,
    )
    resources = {"CPU": cfg.cpus_per_worker}
    if cfg.gpu:
        resources["GPU"] = 1
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=dataclasses.asdict(cfg),
        scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=cfg.gpu, resources_per_worker=resources),
        run_config=run_config,
    )


def _ray_storage_path(uri: str) -> str:
    # Ray Train wants an absolute local path or a URI it can hand to pyarrow.
    return uri if "://" in uri else os.path.abspath(uri)


def is_resume(cfg: DistillConfig) -> bool:
    return storage.exists(storage.join(run_dir(cfg), "checkpoint_manager_snapshot.json"))


def run_distill(cfg: DistillConfig) -> DistillResult:
    check_cache_for_run(cfg)
    resumed = is_resume(cfg)
    if resumed:
        print(
            f"[distill] run '{cfg.name}' exists at {run_dir(cfg)}: resuming from its last checkpoint "
            "(use a new --name to start fresh)",
            flush=True,
        )
    else:
        print(f"[distill] starting new run '{cfg.name}' at {run_dir(cfg)}", flush=True)
    t0 = time.perf_counter()
    with EpochProgress(run_dir(cfg)):
        result = build_trainer(cfg).fit()
    if result.error:
        raise result.error
    exported = export_checkpoints(cfg, result)
    metrics = dict(result.metrics or {})
    return DistillResult(run_dir(cfg), metrics, exported, resumed, time.perf_counter() - t0)


def export_checkpoints(cfg: DistillConfig, result) -> dict[str, str]:
    """Latest (and best-by-AP when evaluated) student in our checkpoint format."""
    import torch

    from distilpose.models import build_model
    from distilpose.models.checkpoints import save_checkpoint

    exported = {}
    with result.checkpoint.as_directory() as d:
        state = torch.load(os.path.join(d, CHECKPOINT_FILE), map_location="cpu", weights_only=True)
    model = build_model(cfg.student)
    model.load_state_dict(state["model"])
    extra = {"run": cfg.name, "epoch": state["epoch"] + 1, "metrics": json.loads(state["metrics"])}
    with tempfile.TemporaryDirectory() as d:
        local = os.path.join(d, "student.pt")
        save_checkpoint(local, model, extra=extra)
        with open(local, "rb") as f:
            data = f.read()
    exported["latest"] = storage.join(run_dir(cfg), "export", "student_latest.pt")
    storage.atomic_write_bytes(exported["latest"], data)
    best = json.loads(state["best"])
    if best and best.get("epoch") == state["epoch"] + 1:
        exported["best"] = storage.join(run_dir(cfg), "export", "student_best.pt")
        storage.atomic_write_bytes(exported["best"], data)
    return exported


class EpochProgress(Poller):
    """Prints each new row of the run's epochs.csv and the latest step from steps.csv."""

    def __init__(self, run_uri: str, interval_s: float = 10.0):
        super().__init__(self._report, interval_s)
        self.epochs_uri = storage.join(run_uri, "logs", "epochs.csv")
        self.steps_uri = storage.join(run_uri, "logs", "steps.csv")
        self.seen_epochs = self._rows(self.epochs_uri)
        self.last_step = None

    @staticmethod
    def _rows(uri: str) -> list[dict]:
        if not storage.exists(uri):
            return []
        return list(csv.DictReader(io.StringIO(storage.read_bytes(uri).decode())))

    def _report(self) -> None:
        epochs = self._rows(self.epochs_uri)
        for row in epochs[len(self.seen_epochs) :]:
            metrics = {k: float(v) for k, v in row.items() if v not in ("", None)}
            print(_epoch_line(metrics), flush=True)
        self.seen_epochs = epochs
        steps = self._rows(self.steps_uri)
        if steps and steps[-1].get("step") != self.last_step and len(epochs) == len(self.seen_epochs):
            last = steps[-1]
            self.last_step = last.get("step")
            print(f"[distill]   step {last['step']} (epoch {last['epoch']}) loss {float(last['loss']):.5f}", flush=True)
