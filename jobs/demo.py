"""The embedded demo: synthetic data -> teacher -> cache -> distill -> evaluate -> table.

    make demo            (or: python jobs/demo.py [--out runs/demo] [--quick])

Rerunning reuses every finished stage.
"""

import argparse
import sys

import _bootstrap  # noqa: F401


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--quick", action="store_true", help="a much smaller run (smoke test; AP is not meaningful)")
    p.add_argument("--teacher-epochs", type=int)
    p.add_argument("--student-epochs", type=int)
    args = p.parse_args(argv)

    from pipeline.demo import DemoConfig, run_demo
    from pipeline.ray_env import init_ray

    cfg = DemoConfig(out=args.out)
    if args.quick:
        cfg = DemoConfig(
            out=args.out,
            train_images=40,
            val_images=12,
            teacher_epochs=1,
            student_epochs=1,
            batch_size=8,
            visualize=2,
            shard_views=16,
        )
    if args.teacher_epochs is not None:
        cfg.teacher_epochs = args.teacher_epochs
    if args.student_epochs is not None:
        cfg.student_epochs = args.student_epochs
    init_ray(num_cpus=2)
    print(run_demo(cfg))
    return 0


if __name__ == "__main__":
    sys.exit(main())
