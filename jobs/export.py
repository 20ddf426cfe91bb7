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


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="student checkpoint (this project's format)")
    p.add_argument("--format", required=True, choices=["onnx", "torchscript"])
    p.add_argument("--out", help="output file (default: next to the checkpoint, .onnx / .torchscript.pt)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (>= 17)")
    p.add_argument("--tokens", action="store_true", help="also output kpt_tokens and vis_tokens")
    p.add_argument("--tolerance", type=float, default=1e-4, help="max abs diff accepted in the verification")
    args = p.parse_args(argv)
    if args.opset < 17:
        p.error("--opset must be >= 17")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from distilpose.export import export_student

    report = export_student(args.checkpoint, args.format, args.out, args.opset, args.tokens)
    print(report.summary())
    if report.worst_diff > args.tolerance:
        print(f"FAILED: max abs diff {report.worst_diff:.3e} > tolerance {args.tolerance:g}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
