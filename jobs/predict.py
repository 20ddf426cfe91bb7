"""Run a student (trained or exported) or a teacher on your own images; write COCO keypoint results.

    python jobs/predict.py --images photos/ --checkpoint runs/s-kd/export/student_best.onnx --out preds.json
    python jobs/predict.py --images s3://bucket/val2017 --checkpoint student.pt \
        --boxes COCO_val2017_detections_AP_H_56_person.json --out s3://bucket/preds.json --overlays viz/

--images: a folder of images, one image, or a text file listing image paths/URIs (relative to
the list file). --boxes: 'image' (default: the whole image is one person), a COCO person-
detection results file (images matched by id: the number in the file name, or --ann-file's
ids), or a COCO annotation file (its GT boxes). --checkpoint: this project's checkpoint
(student or teacher), an official .pth (with --model), or a .onnx / TorchScript file from
jobs/export.py. Writes COCO keypoint results after OKS-NMS, each with its image's file_name;
--overlays also draws the poses on each image. An image that does not decode is skipped and named.
"""

import argparse
import os
import sys

import _bootstrap  # noqa: F401

from distilpose.options import add_dataclass_args, config_from_args
from distilpose.predict import WHOLE_IMAGE, PredictRequest, run_predict
from pipeline import storage
from pipeline.cli import JobParser, run_job
from pipeline.job_env import check_job_paths


def main(argv=None) -> int:
    p = JobParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_args(p, PredictRequest)
    try:
        request = config_from_args(PredictRequest, p.parse_args(argv))
    except ValueError as e:
        p.error(str(e))
    boxes = None if request.boxes == WHOLE_IMAGE else request.boxes
    check_job_paths(
        outputs={"--out": request.out, "--overlays": request.overlays},
        inputs={"--images": request.images, "--checkpoint": request.checkpoint, "--boxes": boxes},
    )
    if os.path.isdir(request.checkpoint):
        raise FileNotFoundError(f"--checkpoint {request.checkpoint} is a folder: give the checkpoint file in it")
    if not storage.exists(request.checkpoint):
        raise FileNotFoundError(f"--checkpoint {request.checkpoint}: no such file")
    # torch.load and onnxruntime read local files: an s3:// checkpoint is downloaded once.
    request.checkpoint = storage.local_copy(request.checkpoint)
    stats = run_predict(request)
    if stats.skipped_boxes:
        print(f"[predict] boxes: {stats.skipped_boxes}")
    print(f"[predict] done: {stats.summary()}")
    print(
        f"[predict] results written to {request.out}"
        + (f", overlays to {request.overlays}" if request.overlays else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(run_job(main))
