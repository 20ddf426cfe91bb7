"""Distill a student from a teacher cache with Ray Train (multi-worker DDP, resumable).

    python jobs/distill.py --cache runs/cache --student distilpose-tiny --epochs 10 --workers 2 \
        --storage runs --name tiny-kd --val DATA
    ray job submit --working-dir . -- python jobs/distill.py --cache s3://b/cache --student distilpose-s \
        --workers 8 --gpu --storage s3://b/runs --name s-kd

Relaunching the same command with the same --name resumes from the last checkpoint.
"""

import argparse
import sys

import _bootstrap  # noqa: F401

from distilpose import options
from distilpose.options import add_dataclass_args
from pipeline.cli import JobParser, run_job
from pipeline.distill.config import DistillConfig
from pipeline.job_env import check_job_paths, data_inputs


def add_distill_args(p: argparse.ArgumentParser) -> None:
    add_dataclass_args(p, DistillConfig)
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS or a local Ray)")


def config_from_args(args: argparse.Namespace) -> DistillConfig:
    return options.config_from_args(DistillConfig, args)


def check_paths(cfg: DistillConfig) -> None:
    """Under `ray job submit --working-dir`: outputs and inputs must be outside the upload."""
    boxes = None if cfg.val_boxes == "gt" else cfg.val_boxes
    inputs = {"--cache": cfg.cache, "--val-boxes": boxes, **data_inputs(cfg)}
    inputs |= {"--teacher-checkpoint": cfg.teacher_checkpoint, "--init-backbone": cfg.init_backbone}
    check_job_paths(outputs={"--storage": cfg.storage}, inputs=inputs)


def main(argv=None) -> int:
    p = JobParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_distill_args(p)
    args = p.parse_args(argv)
    try:
        cfg = config_from_args(args)
    except ValueError as e:
        p.error(str(e))
    from distilpose.coco_metrics import format_table
    from pipeline.distill import check_cache_for_run, resolve_paths, run_distill
    from pipeline.distill.hooks import WorkerHooks
    from pipeline.ray_env import init_ray

    check_paths(cfg)
    check_cache_for_run(resolve_paths(cfg))  # a wrong cache or student costs seconds, not Ray's start-up

    init_ray(args.address, num_cpus=None, verbose=args.verbose)
    result = run_distill(cfg, hooks=WorkerHooks.from_env())  # test hooks: None unless a test sets them
    keys = ["AP", "AP50", "AP75", "APM", "APL", "AR", "train/loss", "samples_per_s", "epoch"]
    print(format_table([{"run": cfg.name, **{k: result.metrics.get(k) for k in keys}}]))
    for kind, uri in result.exported.items():
        print(f"[distill] exported {kind} student: {uri}")
    print(f"[distill] done in {result.wall_s:.1f} s; run dir {result.run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(run_job(main))
