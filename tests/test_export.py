"""Student export: ONNX and TorchScript files agree with the eager model on dynamic batches."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from distilpose.export import (
    OUTPUT_NAMES,
    TOKEN_OUTPUT_NAMES,
    export_model,
    export_student,
    onnx_opset,
    run_onnx,
)
from distilpose.models import build_model
from distilpose.models.checkpoints import save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def student_checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("export") / "student.pt"
    save_checkpoint(path, build_model("distilpose-tiny"))
    return path


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_matches_eager_on_batches_3_and_5(student_checkpoint: Path, tmp_path: Path, fmt: str) -> None:
    out = tmp_path / f"student.{fmt}"
    report = export_student(student_checkpoint, fmt, out, verify_batches=(3, 5))
    assert out.is_file()
    assert report.output_names == OUTPUT_NAMES
    assert sorted(report.max_abs_diff) == [3, 5]
    for diffs in report.max_abs_diff.values():
        assert set(diffs) == set(OUTPUT_NAMES)
    assert report.worst_diff < TOLERANCE, report.summary()


def test_onnx_declares_opset_and_dynamic_batch(student_checkpoint: Path, tmp_path: Path) -> None:
    import onnx

    out = tmp_path / "student.onnx"
    export_student(student_checkpoint, "onnx", out, opset=17, verify_batches=())
    assert onnx_opset(out) >= 17
    graph = onnx.load(str(out)).graph
    for value in [*graph.input, *graph.output]:
        assert value.type.tensor_type.shape.dim[0].dim_param == "batch", value.name
    outputs = run_onnx(out, np.zeros((4, 3, 128, 96), np.float32))
    assert outputs["coords"].shape == (4, 17, 2)
    assert outputs["score"].shape == (4, 17)


def test_tokens_are_optional_outputs(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model("distilpose-tiny")
    report = export_model(
        model, tmp_path / "tokens.torchscript.pt", "torchscript", with_tokens=True, verify_batches=(3,)
    )
    assert report.output_names == OUTPUT_NAMES + TOKEN_OUTPUT_NAMES
    assert report.worst_diff < TOLERANCE


def test_rejects_low_opset_and_teachers(student_checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="opset"):
        export_student(student_checkpoint, "onnx", tmp_path / "x.onnx", opset=13)
    with pytest.raises(ValueError, match="student"):
        export_model(build_model("tokenpose-tiny"), tmp_path / "t.pt", "torchscript")


def test_export_job_prints_diffs(student_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "job.onnx"
    result = subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "export.py"), "--checkpoint", str(student_checkpoint),
         "--format", "onnx", "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "max abs diff overall" in result.stdout
    assert out.is_file()
