"""Everything a resumed distillation needs, saved and restored in one place (`TrainState`),
and the students a run exports.

A checkpoint is taken at an epoch boundary. The data position is the number of epochs done:
each epoch's batches are a pure function of (seed, epoch, rank) (pipeline.cache_loader,
pipeline.fresh_views), so a resumed run reads exactly the batches the uninterrupted one
would have read. RNG states are kept per rank (each rank has its own stream) and restored
on the rank that saved them.

Checkpoint files travel through `pipeline.storage` both ways (`upload_checkpoint`, handed to
Ray Train's report as its upload function, and `load_state`): the same retries, budget and
outage line as every other read and write. Ray's own upload (pyarrow's `copy_files`) is not
used: it swallows a failed S3 upload (the error is only logged while its output stream is
destroyed), so Ray would record a checkpoint that is not in storage.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from dataclasses import dataclass

from distilpose.rng import rng_state, set_rng_state
from pipeline import storage
from pipeline.distill.config import DistillConfig, export_uri, run_dir

CHECKPOINT_FILE = "state.pt"
# Our own record that the run reached a checkpoint: written by rank 0 just before it hands
# the checkpoint to Ray Train, so it exists whenever Ray can have committed one (a run
# stopped in between restarts from Ray's last committed checkpoint, or from scratch).
CHECKPOINT_RECORD = "last_checkpoint.json"


@dataclass
class TrainState:
    model: dict
    optimizer: dict
    scheduler: dict
    scaler: dict  # AMP loss scale (empty when AMP is off)
    epochs_done: int
    step: int
    best: dict  # {"AP", "epoch"} of the best evaluated epoch, {} before one
    rng: list[dict]  # one per rank, see rng_state
    # What the checkpoint holds, for the exported student.
    metrics: dict
    teacher_fields: list[str]
    config: dict
    student_config: dict

    def save(self, path: str) -> None:
        import torch

        # Plain dicts of tensors and JSON strings: loadable with weights_only=True.
        torch.save(
            {
                "model": self.model,
                "optimizer": self.optimizer,
                "scheduler": self.scheduler,
                "scaler": self.scaler,
                "epoch": self.epochs_done - 1,  # index of the last epoch done
                "step": self.step,
                "best": json.dumps(self.best),
                "rng": self.rng,
                "metrics": json.dumps(self.metrics),
                "teacher_fields": json.dumps(self.teacher_fields),
                "config": json.dumps(self.config),
                "student_config": json.dumps(self.student_config),
            },
            path,
        )

    @classmethod
    def load(cls, path: str | io.BytesIO) -> TrainState:
        import torch

        raw = torch.load(path, map_location="cpu", weights_only=True)
        return cls(
            model=raw["model"],
            optimizer=raw["optimizer"],
            scheduler=raw["scheduler"],
            scaler=raw.get("scaler", {}),
            epochs_done=raw["epoch"] + 1,
            step=raw["step"],
            best=json.loads(raw["best"]),
            rng=raw["rng"],
            metrics=json.loads(raw["metrics"]),
            teacher_fields=json.loads(raw.get("teacher_fields", "[]")),
            config=json.loads(raw["config"]),
            student_config=json.loads(raw["student_config"]),
        )

    def restore(self, model, optimizer, scheduler, scaler, rank: int) -> None:
        """Put the state back into the training objects and this rank's RNGs."""
        model.load_state_dict(self.model)
        optimizer.load_state_dict(self.optimizer)
        scheduler.load_state_dict(self.scheduler)
        if self.scaler:
            scaler.load_state_dict(self.scaler)
        # A run resumed on more ranks than it saved: the new ranks take rank 0's stream.
        set_rng_state(self.rng[rank] if rank < len(self.rng) else self.rng[0])


def gather_rng_states(world: int) -> list[dict]:
    """Every rank's RNG state, in rank order (a collective: all ranks call it)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        states = [None] * world
        dist.all_gather_object(states, rng_state())
        return states
    return [rng_state()]


def checkpoint_uri(checkpoint) -> str:
    """Where a Ray Train checkpoint (a pyarrow filesystem and a path on it) is, as a URI."""
    import pyarrow.fs

    if isinstance(checkpoint.filesystem, pyarrow.fs.S3FileSystem):
        return "s3://" + checkpoint.path
    return checkpoint.path


def load_state(checkpoint) -> TrainState:
    """The TrainState of a committed Ray Train checkpoint, read from the run's storage."""
    uri = storage.join(checkpoint_uri(checkpoint), CHECKPOINT_FILE)
    return TrainState.load(io.BytesIO(storage.read_bytes(uri)))


def upload_checkpoint(cfg: DistillConfig):
    """Ray Train's `checkpoint_upload_fn` for this run: each file of the local checkpoint
    folder written to <run>/<checkpoint_dir_name>/ by `pipeline.storage` (retried; when the
    budget is spent, a TransientIOError fails the report, so Ray commits nothing and the worker
    group restarts from the last committed checkpoint)."""

    def upload(checkpoint, checkpoint_dir_name: str):
        import ray.train

        dest = storage.join(run_dir(cfg), checkpoint_dir_name)
        for name in sorted(os.listdir(checkpoint.path)):
            with open(os.path.join(checkpoint.path, name), "rb") as f:
                storage.atomic_write_bytes(storage.join(dest, name), f.read())
        path, filesystem = storage.ray_storage(dest)
        return ray.train.Checkpoint(path=path, filesystem=filesystem)

    return upload


def write_checkpoint_record(cfg: DistillConfig, epochs_done: int, step: int) -> None:
    record = {"epochs_done": epochs_done, "step": step, "checkpoint_dir": checkpoint_dir_name(epochs_done)}
    storage.atomic_write_bytes(storage.join(run_dir(cfg), CHECKPOINT_RECORD), json.dumps(record).encode())


def checkpoint_dir_name(epochs_done: int) -> str:
    return f"epoch_{epochs_done:04d}"


def has_checkpoint(cfg: DistillConfig) -> bool:
    """Whether the run reached a checkpoint (so Ray Train resumes it on the next fit)."""
    return storage.exists(storage.join(run_dir(cfg), CHECKPOINT_RECORD))


# ----------------------------------------------------------------------------- exported students


def export_extra(cfg: DistillConfig, epoch: int, metrics: dict, teacher_fields) -> dict:
    return {
        "run": cfg.name,
        "epoch": int(epoch),
        "metrics": {k: float(v) for k, v in metrics.items() if isinstance(v, int | float)},
        "teacher_fields": list(teacher_fields),
        "online_teacher": cfg.online_teacher or "",
        "online_views": cfg.view_source() if cfg.online_teacher else "",
        "profile": cfg.profile,
        "sh_weighting": cfg.loss_sh_weighting(),
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


def export_checkpoints(cfg: DistillConfig, result) -> dict[str, str]:
    """Latest student in our checkpoint format, plus the best-by-AP one when evaluated
    (written by rank 0 when it was reached)."""
    from distilpose.models import build_model

    if result.checkpoint is None:
        raise RuntimeError(f"run '{cfg.name}' finished without a committed checkpoint in {run_dir(cfg)}")
    state = load_state(result.checkpoint)
    model = build_model(cfg.student)
    model.load_state_dict(state.model)
    extra = export_extra(cfg, state.epochs_done, state.metrics, state.teacher_fields)
    exported = {"latest": export_uri(cfg, "latest")}
    save_student(exported["latest"], model, extra)
    best_uri = export_uri(cfg, "best")
    if state.best and storage.exists(best_uri):
        exported["best"] = best_uri
    return exported


def finished_run(cfg: DistillConfig) -> dict | None:
    """The exported student's record when the run already trained all its epochs, else None."""
    from distilpose.models.checkpoints import load_checkpoint

    latest = export_uri(cfg, "latest")
    if not storage.exists(latest):
        return None
    _, extra = load_checkpoint(storage.local_copy(latest))
    return extra if extra and int(extra.get("epoch", -1)) >= cfg.epochs else None
