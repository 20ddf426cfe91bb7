"""Ray Tune sweeps of students against one teacher cache (resumable).

    python jobs/sweep.py --cache runs/cache --space sweeps/ablation.yaml --storage runs --name ablation \
        --val DATA --set student=distilpose-tiny --set epochs=8
"""

import argparse
import sys

import _bootstrap  # noqa: F401
import yaml


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", required=True)
    p.add_argument("--space", required=True, help="sweep YAML (base / trials / grid)")
    p.add_argument("--trials", type=int, help="run only the first N trials")
    p.add_argument("--storage", default="runs")
    p.add_argument("--name", default="sweep")
    p.add_argument("--val", help="data set root whose val split scores each trial")
    p.add_argument("--data", help="data set root holding the cached split's images")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override a DistillConfig field on every trial (YAML value)",
    )
    p.add_argument("--max-concurrent", type=int, default=1)
    p.add_argument("--address")
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)

    from distilpose.coco_metrics import format_table
    from pipeline.ray_env import init_ray
    from pipeline.sweep import RESULT_COLUMNS, SweepConfig, run_sweep

    overrides = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or not key:
            p.error(f"--set {item!r}: use FIELD=VALUE, e.g. --set epochs=8")
        overrides[key] = yaml.safe_load(value)
    for key in ("val", "data"):
        if getattr(args, key):
            overrides[key] = getattr(args, key)
    init_ray(args.address, verbose=args.verbose)
    rows = run_sweep(
        SweepConfig(
            cache=args.cache,
            space=args.space,
            storage=args.storage,
            name=args.name,
            trials=args.trials,
            max_concurrent=args.max_concurrent,
            overrides=overrides,
        )
    )
    print(format_table(rows, columns=list(RESULT_COLUMNS) + ["error"]))
    return 0 if all(not r["error"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
