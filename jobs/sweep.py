"""Ray Tune sweeps of students against one teacher cache (resumable).

    python jobs/sweep.py --cache runs/cache --space sweeps/ablation.yaml --storage runs --name ablation \
        --val DATA --set student=distilpose-tiny --set epochs=8

--set FIELD=VALUE: VALUE is read as JSON when it parses (8, 1e-3, true, [4,6], null), else
taken as written (distilpose-tiny).
"""

import argparse
import sys
from dataclasses import dataclass

import _bootstrap  # noqa: F401

from distilpose.data.layout import DataOptions, ValDataOptions
from distilpose.options import add_dataclass_args, config_from_args, option_values
from pipeline.cli import JobParser, run_job
from pipeline.job_env import check_job_paths
from pipeline.sweep import SweepConfig, check_sweep, load_space

# Inputs given by --set (or the data-source options).
PATH_OVERRIDES = ("data", "ann_file", "images", "val", "val_ann_file", "val_images", "val_boxes")
PATH_OVERRIDES += ("teacher_checkpoint", "init_backbone")


@dataclass
class SweepData(DataOptions, ValDataOptions):
    """The distillation's data-source options, for every trial (the same as --set FIELD=...)."""

    OPTION_HELP = {"data": "data set root holding the cached split's images (default: the files the cache recorded)"}


def main(argv=None) -> int:
    p = JobParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_args(p, SweepConfig)
    add_dataclass_args(p, SweepData)
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS or a local Ray)")
    args = p.parse_args(argv)
    try:
        cfg = config_from_args(SweepConfig, args)
        load_space(cfg.space)  # a bad space is one error line, before Ray starts
    except ValueError as e:
        p.error(str(e))
    cfg.overrides.update(option_values(SweepData, args))
    inputs = {"--cache": cfg.cache, "--space": cfg.space}
    inputs |= {f"--set {k}": v for k, v in cfg.overrides.items() if k in PATH_OVERRIDES and isinstance(v, str)}
    check_job_paths(outputs={"--storage": cfg.storage}, inputs=inputs)
    check_sweep(cfg)  # a wrong cache or student costs seconds, not Ray's start-up

    from distilpose.coco_metrics import format_table
    from pipeline.distill.hooks import WorkerHooks
    from pipeline.ray_env import init_ray
    from pipeline.sweep import RESULT_COLUMNS, run_sweep

    init_ray(args.address, verbose=args.verbose)
    rows = run_sweep(cfg, hooks=WorkerHooks.from_env())  # test hooks: None unless a test sets them
    print(format_table(rows, columns=list(RESULT_COLUMNS) + ["error"]))
    return 0 if all(not r["error"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(run_job(main))
