"""Student export: ONNX and TorchScript files agree with the eager model on dynamic batches."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from distilpose.data.coco import load_instances
from distilpose.data.dataset import TopDownDataset
from distilpose.data.synthetic import make_synthetic_coco
from distilpose.export import (
    OUTPUT_NAMES,
    TOKEN_OUTPUT_NAMES,
    TOLERANCE,
    export_model,
    export_onnx,
    export_student,
    export_torchscript,
    load_exported,
    max_abs_diffs,
    onnx_opset,
    run_eager,
    run_onnx,
)
from distilpose.inference import predict
from distilpose.models import build_model
from distilpose.models.checkpoints import CheckpointError, save_checkpoint, to_official_state_dict

ROOT = Path(__file__).resolve().parents[1]


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


def test_an_official_pth_exports_with_its_preset(tmp_path: Path) -> None:
    # One loader for every job: the file's format is told by content, the preset names the model.
    torch.manual_seed(1)
    source = build_model("distilpose-tiny").eval()
    official = tmp_path / "official.pth"
    torch.save({"state_dict": to_official_state_dict(source)}, official)
    report = export_student(official, "torchscript", tmp_path / "o.pt", verify_batches=(2,), preset="distilpose-tiny")
    assert report.worst_diff < TOLERANCE
    exported = load_exported(tmp_path / "o.pt")
    image = torch.randn(2, 3, 128, 96)
    with torch.no_grad():
        assert torch.allclose(exported(image).coords, source(image).coords, atol=TOLERANCE)
    with pytest.raises(CheckpointError, match="records no model: name its preset"):
        export_student(official, "torchscript", tmp_path / "p.pt", preset=None)


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


@pytest.fixture(scope="module")
def real_batch(tmp_path_factory) -> dict[str, torch.Tensor]:
    """7 identity crops (128x96, the tiny presets' input) of synthetic people, as evaluation
    builds them: real image statistics instead of noise."""
    root = tmp_path_factory.mktemp("crops")
    make_synthetic_coco(root, 0, 4, seed=5, image_size=(160, 128))
    instances, _ = load_instances(str(root / "annotations" / "person_keypoints_val.json"), "val", input_size=(128, 96))
    dataset = TopDownDataset(instances[:7], str(root / "images" / "val"), (128, 96), train=False)
    samples = [dataset[i] for i in range(len(dataset))]
    assert len(samples) == 7
    return {key: torch.stack([torch.as_tensor(s[key]) for s in samples]) for key in ("image", "affine", "image_id")}


@pytest.mark.parametrize("preset", ["distilpose-tiny", "distilpose-l-tiny"])
def test_onnx_runtime_matches_pytorch_on_real_crops(preset: str, real_batch, tmp_path: Path) -> None:
    """Every student's ONNX file in onnxruntime: raw outputs within TOLERANCE at batch 1 and 7
    (neither is the trace batch), and the decoded joints in image px too."""
    torch.manual_seed(0)
    model = build_model(preset).eval()
    path = tmp_path / f"{preset}.onnx"
    export_onnx(model, path)
    images = real_batch["image"].numpy()
    for batch in (1, 7):
        diffs = max_abs_diffs(run_onnx(path, images[:batch]), run_eager(model, images[:batch]))
        assert set(diffs) == set(OUTPUT_NAMES)
        assert max(diffs.values()) < TOLERANCE, (batch, diffs)

    exported = load_exported(path)  # the preset comes from the file
    assert exported.config.name == preset
    batches = [{**real_batch, "box_score": torch.ones(7)}]
    eager_preds = predict(model, batches, flip_test=True)
    onnx_preds = predict(exported, batches, flip_test=True)
    # image px: TOLERANCE x crop size (<= 1.25 x 160 px here) = 0.02 px; allow 0.05
    np.testing.assert_allclose(onnx_preds["coords_img"], eager_preds["coords_img"], atol=0.05)
    np.testing.assert_allclose(onnx_preds["joint_scores"], eager_preds["joint_scores"], atol=TOLERANCE)


def test_exported_files_record_their_preset(tmp_path: Path) -> None:
    torch.manual_seed(0)
    student, teacher = build_model("distilpose-tiny"), build_model("tokenpose-tiny")
    export_torchscript(student, tmp_path / "s.torchscript.pt")
    export_onnx(teacher, tmp_path / "t.onnx")  # teachers export their heatmaps (bench_speed)
    assert load_exported(tmp_path / "s.torchscript.pt").config.name == "distilpose-tiny"
    loaded = load_exported(tmp_path / "t.onnx")
    x = torch.randn(3, 3, 128, 96)
    with torch.no_grad():
        expected = teacher.eval()(x).heatmaps
    assert (loaded(x).heatmaps - expected).abs().max() < TOLERANCE
    with pytest.raises(CheckpointError, match="holds a 'distilpose-tiny' model, expected preset 'distilpose-s'"):
        load_exported(tmp_path / "s.torchscript.pt", "distilpose-s")
    (tmp_path / "broken.onnx").write_bytes(b"not a model")
    with pytest.raises(CheckpointError, match="not a readable onnx model"):
        load_exported(tmp_path / "broken.onnx")
