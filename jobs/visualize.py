"""Pictures of a student's predictions and of a run's training curves.

    python jobs/visualize.py --data DATA --checkpoint S.pt [--teacher-checkpoint T.pt] --out DIR [--num N]
    python jobs/visualize.py --ann-file ANN.json --images ROOT --checkpoint S.pt --out DIR
    python jobs/visualize.py --curves RUN_DIR [--out DIR]

With --data: overlay_<image_id>.png (skeletons, joint colour/size = confidence) for the first
N instances of the split and, with a teacher, heatmaps_<instance_id>.png (teacher heatmaps
next to the student's simulated heatmaps). With --curves: curves.png from RUN_DIR/logs.
An official teacher .pth needs --teacher PRESET; our checkpoints record their preset.
"""

import argparse
import sys
from dataclasses import dataclass

import _bootstrap  # noqa: F401

from distilpose.data.layout import DataOptions
from distilpose.options import add_dataclass_args, config_from_args, option
from pipeline.cli import JobParser, run_job
from pipeline.job_env import check_job_paths, data_inputs


@dataclass
class VisualizeRequest(DataOptions):
    """What to draw: predictions on a split (the data source) and/or a run's curves."""

    split: str = option("val", help="data split")
    checkpoint: str | None = option(None, help="student checkpoint (this project's format)")
    teacher_checkpoint: str | None = option(None, help="teacher checkpoint: ours or an official .pth")
    teacher: str | None = option(None, help="teacher preset (needed for an official .pth)")
    num: int = option(8, help="number of instances to draw")
    curves: str | None = option(None, metavar="RUN_DIR", help="plot RUN_DIR/logs/{steps,epochs}.csv")
    out: str = option("viz", help="output folder")


def parse_args(argv=None) -> VisualizeRequest:
    p = JobParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_args(p, VisualizeRequest)
    args = p.parse_args(argv)
    request = config_from_args(VisualizeRequest, args)
    if not request.has_data_source() and not request.curves:
        p.error("give --data (or --ann-file and --images) with --checkpoint, or --curves RUN_DIR")
    if request.has_data_source() and not request.checkpoint:
        p.error("--data needs --checkpoint (the student)")
    if request.num < 1:
        p.error("--num must be >= 1")
    return request


def load_teacher_model(path: str, preset: str | None):
    from distilpose.models.checkpoints import load_model

    return load_model(path, preset)


def main(argv=None) -> int:
    args = parse_args(argv)
    inputs = {"--checkpoint": args.checkpoint, "--curves": args.curves, **data_inputs(args)}
    check_job_paths(outputs={"--out": args.out}, inputs={**inputs, "--teacher-checkpoint": args.teacher_checkpoint})
    from pathlib import Path

    written = []
    if args.has_data_source():
        from distilpose.data.coco import load_instances
        from distilpose.models.checkpoints import load_checkpoint
        from distilpose.visualize import visualize_predictions
        from pipeline.dataset_layout import resolve_layout

        student, _ = load_checkpoint(args.checkpoint)
        teacher = load_teacher_model(args.teacher_checkpoint, args.teacher) if args.teacher_checkpoint else None
        layout = resolve_layout(args.data, args.split, args.ann_file, args.images)
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
