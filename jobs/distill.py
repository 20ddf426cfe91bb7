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


def add_distill_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cache", required=True, help="teacher cache URI (from jobs/cache_teacher.py)")
    p.add_argument("--student", default="distilpose-s", help="student preset")
    p.add_argument("--epochs", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=32, help="per worker")
    p.add_argument("--workers", type=int, default=1, help="Ray Train workers (one per GPU with --gpu)")
    p.add_argument("--gpu", action="store_true", help="one GPU per worker, NCCL")
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    p.add_argument("--amp", action="store_true", help="mixed precision (GPU only)")
    p.add_argument("--storage", default="runs", help="checkpoint/log root (local or s3://)")
    p.add_argument("--name", default="distill", help="run name; the same name resumes")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup-iters", type=int, default=500)
    p.add_argument("--lr-steps", type=int, nargs="*", help="epochs at which lr x0.1 (default 2/3, 13/15 of epochs)")
    p.add_argument("--alpha-kt", type=float, default=5e-4)
    p.add_argument("--alpha-vt", type=float, default=5e-4)
    p.add_argument("--alpha-sh", type=float, default=1.0)
    p.add_argument("--alpha-cs", type=float, default=0.01)
    p.add_argument("--sh-weighting", choices=["per-sample", "official"], default="per-sample")
    p.add_argument("--no-distill", action="store_true", help="L_reg only (the paper's no-teacher row)")
    p.add_argument("--online-teacher", metavar="PRESET", help="run this teacher in the loop instead of the cache")
    p.add_argument("--teacher-checkpoint", help="checkpoint for --online-teacher")
    p.add_argument("--init-backbone", metavar="CKPT", help="initialise the student backbone from a teacher checkpoint")
    p.add_argument(
        "--backbone-init",
        choices=["official", "kaiming"],
        default="official",
        help="student conv init: official N(0, 0.001) or He init (much faster in short runs)",
    )
    p.add_argument(
        "--prefetch",
        type=int,
        help="batches a loader thread builds ahead (default: 2 with --gpu or >= 2 CPUs per worker, else 0)",
    )
    p.add_argument("--data", help="data set root holding the cached split's images (default: as recorded)")
    p.add_argument("--val", help="data set root whose val split is evaluated (pycocotools)")
    p.add_argument("--val-boxes", default="gt", help="'gt' or a detector results json")
    p.add_argument("--eval-every", type=int, default=0, help="also evaluate every N epochs")
    p.add_argument("--no-flip-test", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-failures", type=int, default=2, help="worker-group restarts before giving up")
    p.add_argument("--log-every", type=int, default=10, help="steps between step-metric rows")
    p.add_argument(
        "--placement-strategy",
        choices=["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"],
        default="PACK",
        help="how Ray places the workers on nodes (SPREAD: one per node where possible)",
    )
    p.add_argument(
        "--expect",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="refuse a cache whose manifest differs, e.g. teacher.checkpoint_sha256=<sha> (repeatable)",
    )
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS or a local Ray)")
    p.add_argument("--verbose", action="store_true")
    # Test hooks (fault-injection tests): not part of the user interface.
    p.add_argument("--pid-dir", help=argparse.SUPPRESS)
    p.add_argument("--step-sleep-s", type=float, default=0.0, help=argparse.SUPPRESS)


def parse_expect(items: list[str]) -> dict:
    """["teacher.preset=tokenpose-w48", "views=8"] -> dotted-key dict (values parsed as JSON when they can be)."""
    import json

    expected = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--expect {item!r}: use KEY=VALUE, e.g. teacher.preset=tokenpose-w48")
        try:
            expected[key] = json.loads(value)
        except json.JSONDecodeError:
            expected[key] = value
    return expected


def config_from_args(args):
    from pipeline.distill import DistillConfig

    return DistillConfig(
        cache=args.cache,
        student=args.student,
        storage=args.storage,
        name=args.name,
        epochs=args.epochs,
        batch_size=args.batch_size,
        workers=args.workers,
        gpu=args.gpu,
        cpus_per_worker=args.cpus_per_worker,
        lr=args.lr,
        warmup_iters=args.warmup_iters,
        lr_steps=tuple(args.lr_steps) if args.lr_steps else None,
        alpha_kt=args.alpha_kt,
        alpha_vt=args.alpha_vt,
        alpha_sh=args.alpha_sh,
        alpha_cs=args.alpha_cs,
        sh_weighting=args.sh_weighting,
        no_distill=args.no_distill,
        online_teacher=args.online_teacher,
        teacher_checkpoint=args.teacher_checkpoint,
        init_backbone=args.init_backbone,
        backbone_init=args.backbone_init,
        data=args.data,
        val=args.val,
        val_boxes=args.val_boxes,
        eval_every=args.eval_every,
        flip_test=not args.no_flip_test,
        amp=args.amp,
        seed=args.seed,
        max_failures=args.max_failures,
        log_every=args.log_every,
        prefetch=args.prefetch,
        placement_strategy=args.placement_strategy,
        expect_teacher=parse_expect(args.expect),
        pid_dir=args.pid_dir,
        step_sleep_s=args.step_sleep_s,
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_distill_args(p)
    args = p.parse_args(argv)
    from distilpose.coco_metrics import format_table
    from pipeline.distill import run_distill
    from pipeline.ray_env import init_ray

    cfg = config_from_args(args)
    init_ray(args.address, num_cpus=None, verbose=args.verbose)
    result = run_distill(cfg)
    keys = ["AP", "AP50", "AP75", "APM", "APL", "AR", "train/loss", "samples_per_s", "epoch"]
    print(format_table([{"run": cfg.name, **{k: result.metrics.get(k) for k in keys}}]))
    for kind, uri in result.exported.items():
        print(f"[distill] exported {kind} student: {uri}")
    print(f"[distill] done in {result.wall_s:.1f} s; run dir {result.run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
