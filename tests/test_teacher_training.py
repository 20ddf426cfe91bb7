"""Teacher training: loss, schedule, layouts, a smoke run that checkpoints and resumes, the CLI."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from distilpose.data.layout import split_files
from distilpose.data.synthetic import make_synthetic_coco
from distilpose.data.transforms import AugmentConfig
from distilpose.evaluate import detections_file
from distilpose.models import build_model
from distilpose.models.checkpoints import CheckpointError, load_checkpoint
from distilpose.models.conv_init import apply_conv_init
from distilpose.teacher_training import (
    AUG_PRESETS,
    CHECKPOINT_FILE,
    EVAL_FILE,
    LOG_FILE,
    TRAIN_STATE_FILE,
    TeacherProgress,
    TeacherTrainConfig,
    TeacherTrainState,
    Trainer,
    _save,
    joints_mse_loss,
    lr_factor,
    train_teacher,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("teacherdata") / "synth"
    make_synthetic_coco(root, 6, 3, seed=2, image_size=(160, 160))
    return root


def _config(data: Path, out: Path, **kwargs) -> TeacherTrainConfig:
    base = dict(data=str(data), out=str(out), epochs=1, batch_size=4, workers=0, threads=1, evaluate=False)
    return TeacherTrainConfig(**{**base, **kwargs})


def test_joints_mse_matches_the_per_joint_mmpose_formula():
    torch.manual_seed(0)
    pred, target = torch.randn(3, 17, 8, 6), torch.rand(3, 17, 8, 6)
    weight = (torch.rand(3, 17) > 0.3).float()
    per_joint = [
        torch.nn.functional.mse_loss(pred[:, k] * weight[:, k, None, None], target[:, k] * weight[:, k, None, None])
        for k in range(17)
    ]
    torch.testing.assert_close(joints_mse_loss(pred, target, weight), sum(per_joint) / 17)
    assert joints_mse_loss(pred, target, torch.zeros(3, 17)) == 0


def test_lr_schedule_warms_up_then_steps_down():
    decay_at = (0.5, 0.8)
    assert lr_factor(0, 0.0, 10, 0.05, decay_at) == pytest.approx(0.001)
    assert lr_factor(5, 0.0, 10, 0.05, decay_at) == pytest.approx(0.001 + 0.999 * 0.5)
    # The warm-up also ends after warmup_frac of the run (e.g. of a time budget).
    assert lr_factor(5, 0.05, 10, 0.05, decay_at) == 1.0
    assert lr_factor(10, 0.4, 10, 0.05, decay_at) == 1.0
    assert lr_factor(50, 0.5, 10, 0.05, decay_at) == pytest.approx(0.1)
    assert lr_factor(90, 0.9, 10, 0.05, decay_at) == pytest.approx(0.01)


def test_recipes_set_defaults_that_explicit_values_override():
    spec = TeacherTrainConfig(data="d")
    assert (spec.lr, spec.aug, spec.conv_init) == (1e-3, AUG_PRESETS["spec"], "official")
    fast = TeacherTrainConfig.from_recipe("fast", data="d", lr=None, epochs=3)
    assert (fast.lr, fast.aug, fast.conv_init, fast.epochs) == (3e-3, AUG_PRESETS["none"], "kaiming", 3)
    assert TeacherTrainConfig.from_recipe("fast", data="d", lr=5e-4, aug="light").lr == 5e-4
    # The demo's teacher: "fast" with exactly the augmentation the students' views are drawn with.
    fast_aug = TeacherTrainConfig.from_recipe("fast-aug", data="d")
    assert (fast_aug.lr, fast_aug.aug, fast_aug.conv_init) == (3e-3, AugmentConfig(), "kaiming")
    with pytest.raises(ValueError, match="unknown recipe"):
        TeacherTrainConfig.from_recipe("slow", data="d")
    with pytest.raises(ValueError, match="budget_clock"):
        TeacherTrainConfig(data="d", budget_clock="gpu")


def test_conv_init_only_touches_backbone_convs():
    torch.manual_seed(0)
    model = build_model("tokenpose-tiny")
    conv = model.backbone.conv2.weight
    head = model.heatmap_head[-1].weight.clone()
    apply_conv_init(model, "official")
    assert conv.std() < 0.002  # mmpose N(0, 0.001), as built
    apply_conv_init(model, "kaiming")
    fan_out = conv.shape[0] * conv.shape[2] * conv.shape[3]
    assert conv.std().item() == pytest.approx((2 / fan_out) ** 0.5, rel=0.2)
    assert torch.equal(model.heatmap_head[-1].weight, head)


def test_split_files_understands_both_layouts(data, tmp_path):
    files = split_files(str(data), "train")
    assert files.ann_file.endswith("annotations/person_keypoints_train.json")
    assert detections_file(str(data)).endswith("val_detections.json")
    coco = tmp_path / "coco"
    (coco / "annotations").mkdir(parents=True)
    shutil.copy(files.ann_file, coco / "annotations" / "person_keypoints_train2017.json")
    (coco / "train2017").symlink_to(data / "images" / "train")
    assert split_files(str(coco), "train").image_root.endswith("train2017")
    assert detections_file(str(coco)) is None
    with pytest.raises(FileNotFoundError, match="no 'val' split"):
        split_files(str(coco), "val")


def test_smoke_train_checkpoints_resumes_and_evaluates(data, tmp_path):
    out = tmp_path / "run"
    messages: list[str] = []
    first = train_teacher(_config(data, out), log=messages.append)
    assert first.state.epoch == 1 and first.state.iteration > 0
    assert (out / CHECKPOINT_FILE).is_file() and (out / TRAIN_STATE_FILE).is_file()
    model, extra = load_checkpoint(out / CHECKPOINT_FILE, "tokenpose-tiny")
    assert extra["epoch"] == 1 and extra["train_config"]["batch_size"] == 4
    assert len(extra["history"]) == 1 and extra["history"][0]["loss"] > 0

    messages.clear()
    second = train_teacher(_config(data, out, epochs=2, evaluate=True), log=messages.append)
    assert any("resuming from" in m and "1/2 epochs done" in m for m in messages)
    assert second.state.epoch == 2 and second.state.iteration == 2 * first.state.iteration
    assert len((out / LOG_FILE).read_text().strip().splitlines()) == 3  # header + 2 epochs
    summary = json.loads((out / EVAL_FILE).read_text())
    rows = summary["metrics"]
    assert set(rows) == {
        "tokenpose-tiny (gt boxes)",
        "mean-pose baseline (gt boxes)",
        "tokenpose-tiny (det boxes)",
        "mean-pose baseline (det boxes)",
    }
    assert all("AP" in row and "num_instances" in row for row in rows.values())
    assert "AP50" in second.table()

    # Finished: a third call only evaluates, training nothing more.
    third = train_teacher(_config(data, out, epochs=2), log=messages.append)
    assert third.state.iteration == second.state.iteration


def test_fixed_epochs_give_the_same_teacher_for_the_same_seed(data, tmp_path):
    # What the demo relies on: with a fixed amount of work the result depends on the seed only.
    runs = [train_teacher(_config(data, tmp_path / name, epochs=2, seed=seed), log=lambda m: None) for name, seed in
            (("a", 3), ("b", 3), ("c", 4))]  # fmt: skip
    weights = [load_checkpoint(Path(r.checkpoint))[0].state_dict() for r in runs]
    losses = [[row["loss"] for row in r.state.history] for r in runs]
    assert losses[0] == losses[1] and all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert losses[2] != losses[0]


def test_a_resumed_run_continues_as_if_never_stopped(data, tmp_path):
    # 2 epochs in one go vs 1 epoch, then a resume for the 2nd: the same weights, losses and
    # RNG streams (the DataLoader draws its worker seed from the global torch RNG each epoch,
    # so a resume that did not restore the RNG would end in another state).
    straight = train_teacher(_config(data, tmp_path / "a", epochs=2), log=lambda m: None)
    # The same 2-epoch run stopped after its first epoch's checkpoint (as a kill would).
    cut = Trainer(_config(data, tmp_path / "b", epochs=2), log=lambda m: None)
    progress = TeacherProgress()
    progress.history.append(cut._train_epoch(progress))
    _save(cut.cfg, cut.model, cut.optimizer, progress)
    torch.manual_seed(12345)  # the process's RNG moved on in between, as in a new process
    resumed = train_teacher(_config(data, tmp_path / "b", epochs=2), log=lambda m: None)
    assert [r["loss"] for r in resumed.state.history] == [r["loss"] for r in straight.state.history]
    weights = [load_checkpoint(Path(r.checkpoint))[0].state_dict() for r in (straight, resumed)]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    states = [TeacherTrainState.load(str(tmp_path / name / TRAIN_STATE_FILE)) for name in ("a", "b")]
    assert states[0].progress.epoch == states[1].progress.epoch == 2
    assert torch.equal(states[0].rng["torch"], states[1].rng["torch"])
    assert states[0].rng["numpy"] == states[1].rng["numpy"]


def test_time_budget_stops_early_and_keeps_the_progress(data, tmp_path):
    cfg = _config(data, tmp_path / "run", epochs=50, time_budget_s=0.5)
    result = train_teacher(cfg, log=lambda m: None)
    assert result.state.stopped_by_budget and result.state.epoch < 50
    assert result.state.elapsed_s >= 0.5
    _, extra = load_checkpoint(Path(result.checkpoint))
    assert extra["stopped_by_budget"] and extra["iteration"] == result.state.iteration
    # The CPU clock counts this process's CPU time instead of wall time.
    cpu = train_teacher(replace(cfg, out=str(tmp_path / "cpu"), budget_clock="cpu"), log=lambda m: None)
    assert cpu.state.stopped_by_budget and cpu.state.cpu_s >= 0.5


def test_resume_refuses_a_different_model(data, tmp_path):
    cfg = _config(data, tmp_path / "run")
    train_teacher(cfg, log=lambda m: None)
    with pytest.raises(CheckpointError, match="different model"):
        train_teacher(replace(cfg, model_overrides={"depth": 1}), log=lambda m: None)
    fresh = train_teacher(replace(cfg, model_overrides={"depth": 1}, resume=False), log=lambda m: None)
    assert fresh.state.epoch == 1


def test_train_teacher_cli(data, tmp_path):
    out = tmp_path / "cli"
    cmd = [sys.executable, str(ROOT / "jobs" / "train_teacher.py"), "--data", str(data), "--epochs", "1"]
    cmd += ["--batch-size", "8", "--out", str(out), "--workers-dataloader", "0", "--threads", "1"]
    cmd += ["--model-override", "depth=1", "--no-eval"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "samples/s" in result.stdout and "checkpoint" in result.stdout
    model, extra = load_checkpoint(out / CHECKPOINT_FILE)
    assert model.config.depth == 1 and extra["epoch"] == 1
