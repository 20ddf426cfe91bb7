"""Distill a student from the teacher cache with Ray Train (V2 TorchTrainer, DDP).

Each worker reads its shards of the cache (pipeline.cache_loader), rebuilds the exact
cached view of every image, and minimises

    L = L_reg + a_KT L_KT + a_VT L_VT + a_SH L_SH + a_CS L_CS      (distilpose.losses)

A checkpoint (`TrainState`: model, optimizer, scheduler, epoch, step, RNG states) is
committed to `<storage>/<name>` every epoch; relaunching the same command with the same
name resumes from it, and a killed worker makes Ray Train restart the worker group from it.
`online_teacher` runs the teacher in the loop (the baseline the cache is measured against):
on a fresh augmentation of every instance every epoch (pipeline.fresh_views, the official
code's way) or, with `online_views="cache"`, on the cached views; `no_distill` trains with
L_reg alone.

Modules: config (DistillConfig, run paths), worker (the per-rank training loop), state
(TrainState: save/restore for resume; exported students), checks (preflight checks, run
record), logs (metrics logs, driver progress), run (trainer, run_distill).
"""

from pipeline.distill.checks import check_cache_for_run, prepare_run
from pipeline.distill.config import DistillConfig, loader_prefetch, resolve_paths, run_dir, worker_resources
from pipeline.distill.run import DistillResult, build_trainer, run_distill
from pipeline.distill.state import TrainState, export_checkpoints

__all__ = [
    "DistillConfig",
    "DistillResult",
    "TrainState",
    "build_trainer",
    "check_cache_for_run",
    "export_checkpoints",
    "loader_prefetch",
    "prepare_run",
    "resolve_paths",
    "run_dir",
    "run_distill",
    "worker_resources",
]
