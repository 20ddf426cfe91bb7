"""jobs/predict.py and distilpose.predict: a model on a user's images -> COCO keypoint results.

The evaluation path is the reference: with the same boxes, predict must write exactly the
results `evaluate_model` scores (same crops, decoding, flip test, OKS-NMS)."""

from __future__ import annotations

import functools
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from distilpose.data.synthetic import make_synthetic_coco
from distilpose.errors import UserError
from distilpose.evaluate import evaluate_model, load_model
from distilpose.export import export_onnx
from distilpose.models import build_model
from distilpose.models.checkpoints import save_checkpoint
from distilpose.predict import ImageRef, PredictRequest, assign_ids, list_images, run_predict

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """A tiny synthetic val split, a tiny student (checkpoint + ONNX) and a tiny teacher."""
    root = tmp_path_factory.mktemp("predict")
    make_synthetic_coco(root / "data", 0, 6, seed=3, image_size=(160, 128))
    torch.manual_seed(0)
    student, teacher = build_model("distilpose-tiny"), build_model("tokenpose-tiny")
    save_checkpoint(root / "student.pt", student)
    save_checkpoint(root / "teacher.pt", teacher)
    export_onnx(student, root / "student.onnx")
    data = root / "data"
    return {
        "root": root,
        "images": data / "images" / "val",
        "ann": data / "annotations" / "person_keypoints_val.json",
        "dets": data / "annotations" / "val_detections.json",
        "student": root / "student.pt",
        "teacher": root / "teacher.pt",
        "onnx": root / "student.onnx",
    }


def _request(files, tmp_path, **fields) -> PredictRequest:
    fields.setdefault("images", str(files["images"]))
    fields.setdefault("checkpoint", str(files["student"]))
    return PredictRequest(out=str(tmp_path / "preds.json"), threads=1, batch_size=4, **fields)


def _by_key(results: list[dict]) -> list[tuple]:
    return sorted((r["image_id"], round(r["score"], 9), tuple(np.round(r["keypoints"], 6))) for r in results)


@pytest.mark.parametrize("model, boxes", [("student", "ann"), ("teacher", "dets")])
def test_writes_what_evaluate_scores(files, tmp_path, model, boxes):
    """Student with GT boxes, teacher (DARK decoding) with detector boxes: the same results
    as the evaluation's, crop for crop, and each names its image file."""
    net = load_model("distilpose-tiny" if model == "student" else "tokenpose-tiny", files[model])
    reference = tmp_path / "eval.json"
    evaluate_model(
        net,
        str(files["ann"]),
        str(files["images"]),
        boxes="gt" if boxes == "ann" else str(files["dets"]),
        out_json=reference,
        batch_size=4,
        flip_mode="official",
    )
    # Detection results name images by id: here the number in the COCO-style file name.
    request = _request(files, tmp_path, checkpoint=str(files[model]), boxes=str(files[boxes]))
    stats = run_predict(request)
    predicted = json.loads(Path(request.out).read_text())
    expected = json.loads(reference.read_text())
    assert stats.persons > stats.images > 0 and stats.results == len(predicted) > 0
    assert _by_key(predicted) == _by_key(expected)
    names = {p.name for p in files["images"].iterdir()}
    assert all(r["file_name"] in names and f"{r['image_id']:012d}.jpg" == r["file_name"] for r in predicted)


def test_exported_student_gives_the_eager_results(files, tmp_path):
    eager = run_predict(_request(files, tmp_path / "eager"))
    onnx = run_predict(_request(files, tmp_path / "onnx", checkpoint=str(files["onnx"])))
    assert eager.persons == onnx.persons == eager.images  # whole-image boxes: one person per image
    a = json.loads((tmp_path / "eager" / "preds.json").read_text())
    b = json.loads((tmp_path / "onnx" / "preds.json").read_text())
    a_kpts = np.array([r["keypoints"] for r in sorted(a, key=lambda r: r["image_id"])])
    b_kpts = np.array([r["keypoints"] for r in sorted(b, key=lambda r: r["image_id"])])
    # image px (x, y) and joint scores; 160x128 images: 1e-3 px is far below one pixel
    np.testing.assert_allclose(b_kpts, a_kpts, atol=1e-3)


def test_bad_images_are_skipped_and_named_overlays_written(files, tmp_path, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    good = sorted(files["images"].iterdir())[:2]
    for path in good:
        shutil.copy(path, folder / path.name)
    (folder / "000099000001.jpg").write_bytes(good[0].read_bytes()[:300])  # truncated JPEG
    (folder / "000099000002.png").write_text("not an image")
    stats = run_predict(_request(files, tmp_path, images=str(folder), overlays=str(tmp_path / "viz")))
    assert stats.images == 2 and stats.bad_images == ["000099000001.jpg", "000099000002.png"]
    assert "2 skipped (not decodable: 000099000001.jpg, 000099000002.png)" in stats.summary()
    assert stats.overlays == 2 and "; 2 overlays in " in stats.summary()
    out = capsys.readouterr().out
    assert "skipped image '" in out and "[predict] drawing overlays into" in out
    assert sorted(p.name for p in (tmp_path / "viz").iterdir()) == [f"overlay_{p.stem}.png" for p in good]


def test_list_file_and_image_ids(files, tmp_path):
    first, second = sorted(files["images"].iterdir())[:2]
    listing = tmp_path / "list.txt"
    listing.write_text(f"# two images\n{first}\n\n../{tmp_path.name}/b.jpg\n")
    shutil.copy(second, tmp_path / "b.jpg")
    refs = list_images(str(listing))
    assert [r.name for r in refs] == [first.name, "b.jpg"]
    # Not all names are numbers: whole-image boxes number the images; detections cannot.
    assert [r.image_id for r in assign_ids(refs, None, need_ids=False)] == [1, 2]
    with pytest.raises(UserError, match="'b.jpg' is not named by a number"):
        assign_ids(refs, None, need_ids=True)
    assert assign_ids([ImageRef("7.jpg", "x/7.jpg")], None, True)[0].image_id == 7
    assert assign_ids(refs, {first.name: 5, "b.jpg": 9}, True)[1].image_id == 9


def test_job_end_to_end(files, tmp_path):
    out = tmp_path / "preds.json"
    cmd = [sys.executable, str(ROOT / "jobs" / "predict.py"), "--threads", "1", "--images", str(files["images"])]
    result = subprocess.run(
        [*cmd, "--checkpoint", str(files["onnx"]), "--out", str(out)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert "[predict] done: 6 images" in result.stdout and "persons/s" in result.stdout
    assert len(json.loads(out.read_text())) == 6


@pytest.fixture
def job(monkeypatch):
    import importlib.util

    monkeypatch.syspath_prepend(str(ROOT / "jobs"))
    spec = importlib.util.spec_from_file_location("predict_job", ROOT / "jobs" / "predict.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_user_mistakes_are_one_line(files, tmp_path, job, capsys):
    from pipeline.cli import run_job

    base = ["--threads", "1", "--images", str(files["images"]), "--out", str(tmp_path / "p.json")]
    mistakes = {
        "none.json: file not found": ["--checkpoint", str(files["student"]), "--boxes", str(tmp_path / "none.json")],
        "holds a 'distilpose-tiny' model, expected preset 'distilpose-l-tiny'": [
            "--checkpoint",
            str(files["onnx"]),
            "--model",
            "distilpose-l-tiny",
        ],
        "not a readable PyTorch checkpoint": ["--checkpoint", str(files["ann"])],
        "no such folder or file": ["--checkpoint", str(files["student"]), "--images", str(tmp_path / "none")],
        "is a folder: give the checkpoint file in it": ["--checkpoint", str(tmp_path)],
    }
    for message, args in mistakes.items():
        argv = [*base, *args]
        assert run_job(functools.partial(job.main, argv), argv) == 2, message
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_s3_images_boxes_and_outputs(files, tmp_path, s3_bucket):
    import fsspec

    fs = fsspec.filesystem("s3")
    for path in sorted(files["images"].iterdir())[:3]:
        fs.put(str(path), f"{s3_bucket}/imgs/{path.name}")
    fs.put(str(files["dets"]), f"{s3_bucket}/dets.json")
    request = _request(
        files,
        tmp_path,
        images=f"{s3_bucket}/imgs",
        boxes=f"{s3_bucket}/dets.json",
        overlays=f"{s3_bucket}/viz",
    )
    request.out = f"{s3_bucket}/out/preds.json"
    stats = run_predict(request)
    results = json.loads(fs.cat(request.out))
    assert stats.images == 3 and len(results) == stats.results > 0
    assert len(fs.ls(f"{s3_bucket}/viz")) == len({r["image_id"] for r in results})
