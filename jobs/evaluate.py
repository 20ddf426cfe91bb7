"""Evaluate a teacher or student checkpoint on a COCO-format split (COCO keypoint AP).

    python jobs/evaluate.py --data /tmp/synth --model tokenpose-tiny --checkpoint runs/teacher/teacher.pt
    python jobs/evaluate.py --data coco --model distilpose-s --checkpoint distilpose_s.pth \
        --boxes coco/person_detection_results/COCO_val2017_detections_AP_H_56_person.json --out s.json

--checkpoint takes this project's format (jobs/train_teacher.py, jobs/distill.py) or an
official mmpose / DistilPose .pth file. --boxes is 'gt' or a person-detection results file.
--profile official reproduces the official code's student flip test (left/right joint scores
not swapped, x mirrored as 1 - x); the default 'intended' mirrors exactly and swaps them.
Teachers are evaluated the same way under both profiles.
"""

import argparse
import sys

import _bootstrap  # noqa: F401

from distilpose.profiles import DEFAULT_PROFILE, PROFILES
from pipeline.cli import JobParser, run_job
from pipeline.job_env import check_job_paths


def parse_args(argv=None) -> argparse.Namespace:
    p = JobParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="data set root (synthetic or COCO 2017 layout)")
    p.add_argument("--model", required=True, help="preset the checkpoint was made for")
    p.add_argument("--checkpoint", required=True, help="our checkpoint or an official .pth")
    p.add_argument("--boxes", default="gt", help="'gt' or a person-detection results json")
    p.add_argument("--score-thr", type=float, default=0.0, help="drop detections below this score")
    p.add_argument("--flip-test", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument(
        "--profile",
        choices=sorted(PROFILES),
        default=DEFAULT_PROFILE,
        help="'official': the official code's quirks; 'intended': the behaviour they were meant to have",
    )
    p.add_argument("--split", default="val")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--limit", type=int, help="evaluate only the first N images of the split")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--results-json", help="also write the COCO keypoint results here")
    p.add_argument("--out", help="write the metrics (and what was evaluated) as JSON here")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    boxes = None if args.boxes == "gt" else args.boxes
    check_job_paths(
        outputs={"--out": args.out, "--results-json": args.results_json},
        inputs={"--data": args.data, "--checkpoint": args.checkpoint, "--boxes": boxes},
    )
    from distilpose.evaluate import EvalRequest, run_evaluation

    request = EvalRequest(
        data=args.data,
        model=args.model,
        checkpoint=args.checkpoint,
        boxes=args.boxes,
        score_thr=args.score_thr,
        flip_test=args.flip_test,
        split=args.split,
        batch_size=args.batch_size,
        limit=args.limit,
        device=args.device,
        threads=args.threads,
        profile=args.profile,
        results_json=args.results_json,
        out=args.out,
    )
    report = run_evaluation(request)
    print(report.table())
    if args.out:
        print(f"[evaluate] metrics written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_job(main))
