"""Evaluate a teacher or student checkpoint on a COCO-format split (COCO keypoint AP).

    python jobs/evaluate.py --data /tmp/synth --model tokenpose-tiny --checkpoint runs/teacher/teacher.pt
    python jobs/evaluate.py --ann-file posetrack/annotations/val.json --images posetrack --model ... --checkpoint ...
    python jobs/evaluate.py --data coco --model distilpose-s --checkpoint distilpose_s.pth \
        --boxes coco/person_detection_results/COCO_val2017_detections_AP_H_56_person.json --out s.json

--checkpoint takes this project's format (jobs/train_teacher.py, jobs/distill.py) or an
official mmpose / DistilPose .pth file. --boxes is 'gt' or a person-detection results file.
The default --profile official reproduces the official code's student flip test (left/right
joint scores not swapped, x mirrored as 1 - x); 'intended' mirrors exactly and swaps them.
Teachers are evaluated the same way under both profiles.
"""

import argparse
import sys

import _bootstrap  # noqa: F401

from distilpose.evaluate import EvalRequest, run_evaluation
from distilpose.options import add_dataclass_args, config_from_args
from pipeline.cli import JobParser, run_job
from pipeline.job_env import check_job_paths, data_inputs


def build_parser() -> argparse.ArgumentParser:
    p = JobParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_args(p, EvalRequest)
    return p


def main(argv=None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    try:
        request = config_from_args(EvalRequest, args)
    except ValueError as e:
        p.error(str(e))
    boxes = None if request.boxes == "gt" else request.boxes
    check_job_paths(
        outputs={"--out": request.out, "--results-json": request.results_json},
        inputs={"--checkpoint": request.checkpoint, "--boxes": boxes, **data_inputs(request)},
    )
    report = run_evaluation(request)
    print(report.table())
    if request.out:
        print(f"[evaluate] metrics written to {request.out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_job(main))
