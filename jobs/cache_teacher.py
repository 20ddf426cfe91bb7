"""Run the teacher once over a split and cache its outputs (Ray Data).

python jobs/cache_teacher.py --data DATA --teacher tokenpose-tiny --checkpoint T.pt --out runs/cache
ray job submit --working-dir . -- python jobs/cache_teacher.py --data s3://b/coco ... --out s3://b/cache
python jobs/cache_teacher.py --verify URI [--spot-check N]
"""

import argparse
import sys

import _bootstrap  # noqa: F401

from distilpose.options import add_dataclass_args, config_from_args
from pipeline.cli import JobParser, run_job
from pipeline.job_env import check_job_paths, data_inputs
from pipeline.teacher_stage import CacheJobConfig


def build_parser() -> argparse.ArgumentParser:
    p = JobParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_args(p, CacheJobConfig, required=False)  # --verify needs none of them
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS or a local Ray)")
    p.add_argument("--verify", metavar="URI", help="verify a cache's checksums instead of building one")
    p.add_argument(
        "--spot-check",
        type=int,
        default=0,
        metavar="N",
        help="with --verify: re-run the teacher on N views (default: 0)",
    )
    return p


def parse_args(argv=None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    if not args.verify:
        missing = [f"--{k}" for k in ("teacher", "out") if k not in vars(args)]
        if not ({"ann_file", "images"} <= set(vars(args)) or "data" in vars(args)):
            missing.insert(0, "--data (or both --ann-file and --images)")
        if missing:
            p.error(f"missing {', '.join(missing)} (or use --verify URI)")
        try:
            args.config = config_from_args(CacheJobConfig, args)
        except ValueError as e:
            p.error(str(e))
    return args


def check_paths(args: argparse.Namespace) -> None:
    """Under `ray job submit --working-dir`: outputs and inputs must be outside the upload."""
    if args.verify:
        check_job_paths(outputs={}, inputs={"--verify": args.verify, "--checkpoint": getattr(args, "checkpoint", None)})
        return
    cfg = args.config
    check_job_paths(outputs={"--out": cfg.out}, inputs={"--checkpoint": cfg.checkpoint, **data_inputs(cfg)})


def main(argv=None) -> int:
    args = parse_args(argv)
    check_paths(args)
    if args.verify:
        from pipeline.cache.verify import spot_check, verify_cache

        report = verify_cache(args.verify)
        print(report.summary())
        ok = report.ok
        if args.spot_check:  # runs the teacher here, on N views: no Ray to start
            check = spot_check(args.verify, args.spot_check, getattr(args, "checkpoint", None))
            print(check.summary())
            ok = ok and check.ok
        return 0 if ok else 1

    from pipeline.ray_env import init_ray
    from pipeline.teacher_stage import run_cache_job

    summary = run_cache_job(args.config, start_ray=lambda: init_ray(args.address, verbose=args.verbose))
    print(summary.table())
    return 0 if summary.complete else 1


if __name__ == "__main__":
    sys.exit(run_job(main))
