"""Train a heatmap teacher (TokenPose, SimpleBaseline, HRNet) on a COCO-format data set, then evaluate it on val.

    python jobs/train_teacher.py --data /tmp/synth --teacher tokenpose-tiny --epochs 30 \
        --time-budget-s 210 --out runs/teacher-tiny

Data layouts: DIR/annotations/person_keypoints_{train,val}.json + DIR/images/{train,val}/
(synthetic) or DIR/annotations/person_keypoints_{train,val}2017.json + DIR/{train,val}2017/;
any other layout with --ann-file/--images (train) and --val-ann-file/--val-images (val).
Writes OUT/teacher.pt (our checkpoint format), OUT/train_log.csv and OUT/eval.json; the same
command with the same --out resumes from OUT/teacher.pt.
"""

import argparse
import sys

import _bootstrap  # noqa: F401

from distilpose.options import add_dataclass_args, option_values
from distilpose.teacher_training import RECIPES, TeacherTrainConfig
from pipeline.cli import JobParser, run_job
from pipeline.job_env import check_job_paths, data_inputs


def build_parser() -> argparse.ArgumentParser:
    p = JobParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_args(p, TeacherTrainConfig)
    p.add_argument(
        "--recipe",
        choices=list(RECIPES),
        default="spec",
        help="spec: the official recipe; fast: for minutes-long CPU runs (He init, lr 3e-3, no augmentation); "
        "fast-aug: fast with the students' augmentation (what the demo uses) (default: spec)",
    )
    return p


def main(argv=None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    try:
        cfg = TeacherTrainConfig.from_recipe(args.recipe, **option_values(TeacherTrainConfig, args))
    except ValueError as e:
        p.error(str(e))
    check_job_paths(outputs={"--out": cfg.out}, inputs=data_inputs(cfg))
    from distilpose.teacher_training import train_teacher

    result = train_teacher(cfg)
    state = result.state
    print(
        f"[teacher] done in {result.wall_s:.1f} s: {state.epoch} epochs, {state.iteration} iterations, "
        f"{state.elapsed_s:.0f} s training{' (stopped by the time budget)' if state.stopped_by_budget else ''}; "
        f"checkpoint {result.checkpoint}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(run_job(main))
