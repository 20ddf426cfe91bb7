"""Write the synthetic COCO-format person-keypoints data set (rendered stick figures).

    python jobs/make_synthetic.py --out data/synthetic --train 2000 --val 200 --seed 0 [--size 256]

Layout: images/{train,val}/*.jpg, annotations/person_keypoints_{train,val}.json,
annotations/val_detections.json. The same seed gives byte-identical files.
"""

import argparse
import sys

import _bootstrap  # noqa: F401

from pipeline.cli import JobParser, run_job
from pipeline.job_env import check_job_paths


def parse_args(argv=None) -> argparse.Namespace:
    p = JobParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder (local)")
    p.add_argument("--train", type=int, required=True, help="number of training images")
    p.add_argument("--val", type=int, required=True, help="number of validation images")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--size", type=int, default=256, help="square image side in px, >= 64 (default: 256)")
    args = p.parse_args(argv)
    if args.train < 0 or args.val < 0:
        p.error("--train and --val must be >= 0")
    if args.size < 64:
        p.error("--size must be >= 64")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    check_job_paths(outputs={"--out": args.out}, inputs={})
    from distilpose.data.synthetic import make_synthetic_coco

    def progress(split: str, done: int, total: int) -> None:
        if done == total or done % max(1, total // 10) == 0:
            print(f"[synthetic] {split}: {done}/{total} images", flush=True)

    summary = make_synthetic_coco(args.out, args.train, args.val, args.seed, (args.size, args.size), progress)
    print(summary.table())
    return 0


if __name__ == "__main__":
    sys.exit(run_job(main))
