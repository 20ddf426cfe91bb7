"""Run the teacher once over a split and cache its outputs (Ray Data).

python jobs/cache_teacher.py --data DATA --teacher tokenpose-tiny --checkpoint T.pt --out runs/cache
ray job submit --working-dir . -- python jobs/cache_teacher.py --data s3://b/coco ... --out s3://b/cache
python jobs/cache_teacher.py --verify URI [--spot-check N]
"""

import argparse
import sys

import _bootstrap  # noqa: F401


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="data set root (local or s3://): COCO 2017 or synthetic layout")
    p.add_argument("--teacher", help="teacher preset, e.g. tokenpose-w48 or tokenpose-tiny")
    p.add_argument("--checkpoint", help="teacher checkpoint: ours or the official .pth (local or s3://)")
    p.add_argument("--out", help="cache root URI (local path or s3://bucket/prefix)")
    p.add_argument("--format", choices=["zarr", "wds"], default="zarr")
    p.add_argument("--views", type=int, default=1, help="cached views per instance (view 0 = un-augmented)")
    p.add_argument("--split", default="train")
    p.add_argument("--ann-file", help="override the split's annotation json")
    p.add_argument("--images", help="override the split's image folder")
    p.add_argument("--batch-size", type=int, default=32, help="teacher forward batch size")
    p.add_argument("--workers", type=int, default=1, help="teacher actors")
    p.add_argument("--gpus-per-worker", type=float, default=0.0)
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    p.add_argument("--store-crops", choices=["none", "jpeg"], default="none")
    p.add_argument("--shard-views", type=int, default=256, help="views per shard")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--heatmap-encoding", default="u8-thresh", choices=["u8-thresh", "u8-joint-scale", "fp16", "fp16-thresh"]
    )
    p.add_argument("--token-encoding", default="int8-token-scale", choices=["int8-token-scale", "fp16"])
    p.add_argument("--limit", type=int, help="cache only the first N instances (smoke runs)")
    p.add_argument(
        "--strict", action="store_true", help="stop at the first malformed annotation instead of skipping it"
    )
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS or a local Ray)")
    p.add_argument("--verify", metavar="URI", help="verify a cache's checksums instead of building one")
    p.add_argument(
        "--spot-check", type=int, default=0, metavar="N", help="with --verify: re-run the teacher on N views"
    )
    p.add_argument("--verbose", action="store_true", help="Ray progress bars and worker logs")
    args = p.parse_args(argv)
    if not args.verify:
        missing = [f"--{k}" for k in ("data", "teacher", "out") if not getattr(args, k)]
        if missing:
            p.error(f"missing {', '.join(missing)} (or use --verify URI)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from pipeline.ray_env import init_ray

    if args.verify:
        from pipeline.cache.verify import verify_cache
        from pipeline.teacher_stage import spot_check

        report = verify_cache(args.verify)
        print(report.summary())
        ok = report.ok
        if args.spot_check:
            init_ray(args.address, verbose=args.verbose)
            check = spot_check(args.verify, args.spot_check, args.checkpoint)
            print(check.summary())
            ok = ok and check.ok
        return 0 if ok else 1

    from pipeline.teacher_stage import CacheJobConfig, run_cache_job

    cfg = CacheJobConfig(
        data=args.data,
        teacher=args.teacher,
        out=args.out,
        checkpoint=args.checkpoint,
        format=args.format,
        views=args.views,
        split=args.split,
        batch_size=args.batch_size,
        workers=args.workers,
        gpus_per_worker=args.gpus_per_worker,
        cpus_per_worker=args.cpus_per_worker,
        store_crops=args.store_crops,
        shard_views=args.shard_views,
        seed=args.seed,
        heatmap_encoding=args.heatmap_encoding,
        token_encoding=args.token_encoding,
        ann_file=args.ann_file,
        images=args.images,
        limit=args.limit,
        strict=args.strict,
    )
    init_ray(args.address, verbose=args.verbose)
    summary = run_cache_job(cfg)
    print(summary.table())
    return 0 if summary.complete else 1


if __name__ == "__main__":
    sys.exit(main())
