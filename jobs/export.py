"""Export a student checkpoint to ONNX or TorchScript and verify it against eager PyTorch.

    python jobs/export.py --checkpoint runs/s/best.pt --format onnx [--out s.onnx] [--opset 17] [--tokens]
    python jobs/export.py --checkpoint runs/s/best.pt --format torchscript

The exported model takes `image` (N, 3, H, W) normalized and returns coords, sigma, score
(+ kpt_tokens, vis_tokens with --tokens), batch axis dynamic. Prints the max abs difference
to the eager model on two batch sizes; exits 1 if it exceeds --tolerance.
"""

import argparse
import sys

import _bootstrap  # noqa: F401

from distilpose.export import ExportRequest, export_student
from distilpose.options import add_dataclass_args, config_from_args
from pipeline.cli import JobParser, run_job
from pipeline.job_env import check_job_paths


def main(argv=None) -> int:
    p = JobParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_args(p, ExportRequest)
    try:
        req = config_from_args(ExportRequest, p.parse_args(argv))
    except ValueError as e:
        p.error(str(e))
    check_job_paths(outputs={"--out": req.out}, inputs={"--checkpoint": req.checkpoint})
    report = export_student(req.checkpoint, req.format, req.out, req.opset, req.tokens, preset=req.model)
    print(report.summary())
    if report.worst_diff > req.tolerance:
        print(f"FAILED: max abs diff {report.worst_diff:.3e} > tolerance {req.tolerance:g}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(run_job(main))
