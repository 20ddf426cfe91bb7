"""Driver side of a distillation run: check it, build the Ray Train trainer, fit (or reuse a
run that already finished) and export the student.

Storage writes: Ray Train uploads checkpoints itself (pyarrow `copy_files`; on S3 every
request is retried by the AWS SDK's retry strategy, which `build_trainer` sets to
`pipeline.storage.S3_RETRY_ATTEMPTS`; an upload that still fails fails the report, and the
worker group restarts from the last committed checkpoint). Everything else a run writes
(metrics logs, run record, exported students) goes through `pipeline.storage`, which
retries transient S3 errors.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from pipeline import storage
from pipeline.distill.checks import prepare_run
from pipeline.distill.config import DistillConfig, export_uri, resolve_paths, run_dir, worker_resources
from pipeline.distill.hooks import WorkerHooks
from pipeline.distill.logs import EpochProgress
from pipeline.distill.state import export_checkpoints, finished_run
from pipeline.distill.worker import train_loop_config, train_loop_per_worker


@dataclass
class DistillResult:
    run_dir: str
    metrics: dict
    exported: dict[str, str]
    resumed: bool
    wall_s: float


def build_trainer(cfg: DistillConfig, callbacks=None, hooks: WorkerHooks | None = None):
    """The TorchTrainer of a run; `hooks` are test hooks (pipeline.distill.hooks), None in production."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    cfg = resolve_paths(cfg)
    storage_path, filesystem = storage.ray_storage(cfg.storage)
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
        train_loop_config=train_loop_config(cfg, hooks),
        scaling_config=ScalingConfig(
            num_workers=cfg.workers,
            use_gpu=cfg.gpu,
            resources_per_worker=worker_resources(cfg),
            placement_strategy=cfg.placement_strategy,
        ),
        run_config=run_config,
    )


def run_distill(cfg: DistillConfig, hooks: WorkerHooks | None = None) -> DistillResult:
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
        result = build_trainer(cfg, hooks=hooks).fit()
    if result.error:
        raise result.error
    exported = export_checkpoints(cfg, result)
    metrics = dict(result.metrics or {})
    return DistillResult(run_dir(cfg), metrics, exported, resumed, time.perf_counter() - t0)
