"""Pictures of a student's predictions and of a run's training curves.

    python jobs/visualize.py --data DATA --checkpoint S.pt [--teacher-checkpoint T.pt] --out DIR [--num N]
    python jobs/visualize.py --curves RUN_DIR [--out DIR]

With --data: overlay_<image_id>.png (skeletons, joint colour/size = confidence) for the first
N instances of the split and, with a teacher, heatmaps_<instance_id>.png (teacher heatmaps
next to the student's simulated heatmaps). With --curves: curves.png from RUN_DIR/logs.
An official teacher .pth needs --teacher PRESET; our checkpoints record their preset.
"""

import argparse
import sys

import _bootstrap  # noqa: F401

from pipeline.cli import JobParser, run_job
from pipeline.job_env import check_job_paths


def parse_args(argv=None) -> argparse.Namespace:
    p = JobParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="data set root (local or s3://): COCO 2017 or synthetic layout")
    p.add_argument("--split", default="val", help="data split (default: val)")
    p.add_argument("--checkpoint", help="student checkpoint (this project's format)")
    p.add_argument("--teacher-checkpoint", help="teacher checkpoint: ours or an official .pth")
    p.add_argument("--teacher", help="teacher preset (needed for an official .pth)")
    p.add_argument("--num", type=int, default=8, help="number of instances to draw")
    p.add_argument("--curves", metavar="RUN_DIR", help="plot RUN_DIR/logs/{steps,epochs}.csv")
    p.add_argument("--out", default="viz", help="output folder (default: viz)")
    args = p.parse_args(argv)
    if not args.data and not args.curves:
        p.error("give --data with --checkpoint, or --curves RUN_DIR")
    if args.data and not args.checkpoint:
        p.error("--data needs --checkpoint (the student)")
    if args.num < 1:
        p.error("--num must be >= 1")
    return args


def load_teacher_model(path: str, preset: str | None):
    from distilpose.models.checkpoints import load_model

    return load_model(path, preset)


def main(argv=None) -> int:
    args = parse_args(argv)
    inputs = {"--data": args.data, "--checkpoint": args.checkpoint, "--curves": args.curves}
    check_job_paths(outputs={"--out": args.out}, inputs={**inputs, "--teacher-checkpoint": args.teacher_checkpoint})
    from pathlib import Path

    written = []
    if args.data:
        from distilpose.data.coco import load_instances
        from distilpose.models.checkpoints import load_checkpoint
        from distilpose.visualize import visualize_predictions
        from pipeline.dataset_layout import resolve_layout

        student, _ = load_checkpoint(args.checkpoint)
        teacher = load_teacher_model(args.teacher_checkpoint, args.teacher) if args.teacher_checkpoint else None
        layout = resolve_layout(args.data, args.split)
        instances, _ = load_instances(layout.ann_file, "val", input_size=tuple(student.config.input_size))
        written += visualize_predictions(student, instances, layout.image_root, args.out, teacher, args.num)
    if args.curves:
        from distilpose.visualize import plot_training_curves

        written.append(plot_training_curves(args.curves, Path(args.out) / "curves.png"))
    for path in written:
        print(f"[visualize] wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(run_job(main))
