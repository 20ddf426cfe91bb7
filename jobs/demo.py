"""The embedded demo: synthetic data -> teacher -> cache -> distill -> evaluate -> table.

    make demo            (or: python jobs/demo.py [--out runs/demo] [--quick])

Rerunning reuses every finished stage.
"""

import argparse
import sys

import _bootstrap  # noqa: F401

from distilpose.options import add_dataclass_args, option_values
from pipeline.cli import JobParser, run_job
from pipeline.demo import QUICK, DemoConfig, run_demo


def main(argv=None) -> int:
    p = JobParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_args(p, DemoConfig)
    p.add_argument("--quick", action="store_true", help="a much smaller run (smoke test; AP is not meaningful)")
    args = p.parse_args(argv)
    try:
        cfg = DemoConfig(**{**(QUICK if args.quick else {}), **option_values(DemoConfig, args)})
    except ValueError as e:
        p.error(str(e))

    from pipeline.ray_env import init_ray

    print(run_demo(cfg, start_ray=lambda: init_ray(num_cpus=2, verbose=args.verbose)))
    return 0


if __name__ == "__main__":
    sys.exit(run_job(main))
