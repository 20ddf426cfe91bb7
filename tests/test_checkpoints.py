"""distilpose.models.checkpoints: our format, official mmpose files, teacher -> student init."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from distilpose.models import build_model
from distilpose.models.checkpoints import (
    CheckpointError,
    init_student_backbone_from_teacher,
    load_checkpoint,
    load_model,
    load_official,
    load_teacher,
    save_checkpoint,
    to_official_state_dict,
)

torch.set_num_threads(2)


def official_layout(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Rename our keys to the official mmpose layout, written independently of the library."""
    kind = model.config.kind
    head = "keypoint_head.tokenpose." if kind == "teacher" else "keypoint_head.tokenhead."
    encoder, mlp = ("encoder.", "heatmap_head.") if kind == "teacher" else ("tde.", "reg_head.")
    state = {}
    for key, value in model.state_dict().items():
        if key.startswith(encoder):
            key = head + key[len(encoder) :]
        elif key.startswith(mlp):
            key = head + "mlp_head." + key[len(mlp) :]
        state[key] = value.clone()
    state[head + "pos_embedding"] = getattr(model, encoder[:-1]).pos_embedding.clone()
    return state


def write_official(path: Path, state: dict[str, torch.Tensor]) -> Path:
    # mmcv layout: meta (with numpy scalars, as mmcv writes best_score) + state_dict.
    meta = {"mmpose_version": "0.22.0", "epoch": 300, "hook_msgs": {"best_score": np.float64(0.716)}}
    torch.save({"meta": meta, "state_dict": state}, path)
    return path


def seeded(name: str, seed: int, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(name, **overrides)


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


# --------------------------------------------------------------------------- our format


def test_save_load_round_trip(tmp_path: Path) -> None:
    model = seeded("distilpose-tiny", 0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    out = model(torch.randn(2, 3, 128, 96))
    out.coords.sum().backward()
    optimizer.step()
    extra = {"epoch": 3, "optimizer": optimizer.state_dict(), "metrics": {"AP": 0.5}}
    path = tmp_path / "ckpt" / "student.pt"
    save_checkpoint(path, model, extra=extra)

    loaded, loaded_extra = load_checkpoint(path, preset="distilpose-tiny")
    assert loaded.config == model.config
    assert_same_weights(model, loaded)
    assert loaded_extra["epoch"] == 3 and loaded_extra["metrics"] == {"AP": 0.5}
    fresh = torch.optim.Adam(loaded.parameters(), lr=1e-3)
    fresh.load_state_dict(loaded_extra["optimizer"])

    x = torch.randn(2, 3, 128, 96)
    model.eval(), loaded.eval()
    with torch.no_grad():
        assert torch.equal(model(x).coords, loaded(x).coords)
    assert not list(path.parent.glob(".*tmp*")), "temporary file left behind"


def test_round_trip_keeps_config_overrides(tmp_path: Path) -> None:
    model = seeded("tokenpose-tiny", 0, depth=1)
    save_checkpoint(tmp_path / "t.pt", model)
    loaded, extra = load_checkpoint(tmp_path / "t.pt")
    assert loaded.config.depth == 1 and extra is None
    assert_same_weights(model, loaded)


def test_extra_that_cannot_be_loaded_safely_is_refused(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="weights_only"):
        save_checkpoint(tmp_path / "x.pt", build_model("distilpose-tiny"), extra={"rng": np.zeros(3)})


def test_checkpoint_of_another_preset_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "student.pt"
    save_checkpoint(path, build_model("distilpose-tiny"))
    with pytest.raises(CheckpointError, match=r"student\.pt.*'distilpose-tiny'.*expected preset 'distilpose-l-tiny'"):
        load_checkpoint(path, preset="distilpose-l-tiny")


def test_bad_files_raise_checkpoint_error_naming_the_file(tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint\n")
    with pytest.raises(CheckpointError, match="notes.txt.*not a"):
        load_checkpoint(text)

    good = tmp_path / "good.pt"
    save_checkpoint(good, build_model("distilpose-tiny"))
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated.pt.*truncated"):
        load_checkpoint(truncated)
    with pytest.raises(CheckpointError, match="truncated.pt"):
        load_official(build_model("distilpose-tiny"), truncated)

    with pytest.raises(CheckpointError, match="missing.pt.*does not exist"):
        load_checkpoint(tmp_path / "missing.pt")

    official = write_official(tmp_path / "official.pth", official_layout(build_model("distilpose-tiny")))
    with pytest.raises(CheckpointError, match="official.pth.*use load_official"):
        load_checkpoint(official)
    with pytest.raises(CheckpointError, match="good.pt.*use load_checkpoint"):
        load_official(build_model("distilpose-tiny"), good)

    tensors = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), tensors)
    with pytest.raises(CheckpointError, match="tensor.pt.*no state_dict"):
        load_official(build_model("distilpose-tiny"), tensors)


def test_unsafe_pickle_is_refused_not_executed(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {}, "meta": {"callback": Path("x")}}, path)
    with pytest.raises(CheckpointError, match=r"evil.pt.*pathlib.PosixPath.*weights_only"):
        load_official(build_model("distilpose-tiny"), path)


def test_edited_weights_are_listed(tmp_path: Path) -> None:
    model = build_model("distilpose-tiny")
    path = tmp_path / "edited.pt"
    save_checkpoint(path, model)
    raw = torch.load(path, weights_only=True)
    del raw["state_dict"]["reg_head.1.bias"]
    raw["state_dict"]["reg_head.1.weight"] = torch.zeros(3, 3)
    raw["state_dict"]["stray"] = torch.zeros(1)
    torch.save(raw, path)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    msg = str(err.value)
    assert "edited.pt" in msg and "reg_head.1.bias" in msg and "stray" in msg and "(3, 3)" in msg


# --------------------------------------------------------------------------- official files


@pytest.mark.parametrize("name", ["tokenpose-tiny", "distilpose-tiny", "distilpose-l-tiny"])
def test_official_layout_loads_with_no_missing_or_unexpected(tmp_path: Path, name: str) -> None:
    source = seeded(name, 1).eval()
    path = write_official(tmp_path / "official.pth", official_layout(source))
    target = seeded(name, 2).eval()
    report = load_official(target, path)
    assert report.ok and report.missing == [] and report.unexpected == [] and report.mismatched == []
    assert report.loaded == len(target.state_dict())
    assert_same_weights(source, target)
    x = torch.randn(2, 3, 128, 96)
    with torch.no_grad():
        assert torch.equal(source(x).kpt_tokens, target(x).kpt_tokens)


def test_official_layout_with_module_prefix_and_no_nesting(tmp_path: Path) -> None:
    source = seeded("distilpose-tiny", 1)
    path = tmp_path / "ddp.pth"
    torch.save({f"module.{k}": v for k, v in official_layout(source).items()}, path)
    target = seeded("distilpose-tiny", 2)
    assert load_official(target, path).ok
    assert_same_weights(source, target)


def test_library_renaming_agrees_with_official_names() -> None:
    for name in ("tokenpose-tiny", "distilpose-tiny"):
        model = build_model(name)
        ours, expected = to_official_state_dict(model), official_layout(model)
        assert ours.keys() == expected.keys()
    with torch.device("meta"):
        teacher = to_official_state_dict(build_model("tokenpose-w48"))
        student = to_official_state_dict(build_model("distilpose-s"))
    # Names from the official key map (docs/method.md#checkpoints) and mmpose's HRNet.
    for key in [
        "backbone.conv1.weight",
        "backbone.bn2.num_batches_tracked",
        "backbone.layer1.0.downsample.1.running_var",
        "backbone.transition1.0.0.weight",
        "backbone.transition1.1.0.0.weight",
        "backbone.transition3.3.0.1.weight",
        "backbone.stage2.0.branches.1.3.conv2.weight",
        "backbone.stage3.3.fuse_layers.2.0.1.0.weight",
        "backbone.stage4.2.fuse_layers.0.3.0.weight",
        "keypoint_head.tokenpose.keypoint_token",
        "keypoint_head.tokenpose.pos_embedding",
        "keypoint_head.tokenpose.patch_to_embedding.bias",
        "keypoint_head.tokenpose.transformer.layers.11.0.fn.norm.weight",
        "keypoint_head.tokenpose.transformer.layers.11.0.fn.fn.to_qkv.weight",
        "keypoint_head.tokenpose.transformer.layers.11.0.fn.fn.to_out.0.bias",
        "keypoint_head.tokenpose.transformer.layers.11.1.fn.fn.net.0.weight",
        "keypoint_head.tokenpose.transformer.layers.11.1.fn.fn.net.3.bias",
        "keypoint_head.tokenpose.mlp_head.3.weight",
    ]:
        assert key in teacher, key
    assert teacher["keypoint_head.tokenpose.transformer.layers.0.0.fn.fn.to_qkv.weight"].shape == (576, 192)
    assert teacher["keypoint_head.tokenpose.mlp_head.3.weight"].shape == (3072, 384)
    assert "keypoint_head.tokenpose.transformer.layers.0.0.fn.fn.to_qkv.bias" not in teacher
    assert student["keypoint_head.tokenhead.mlp_head.1.weight"].shape == (5, 192)
    assert student["keypoint_head.tokenhead.patch_to_embedding.weight"].shape == (192, 3072)
    assert "backbone.layer1.3.conv3.weight" in student and "backbone.transition1.0.0.weight" not in student


def test_paper_student_official_round_trip(tmp_path: Path) -> None:
    source = seeded("distilpose-s", 1)
    path = write_official(tmp_path / "distilpose_s.pth", official_layout(source))
    target = seeded("distilpose-s", 2)
    report = load_official(target, path)
    assert report.ok and report.loaded == len(target.state_dict())
    assert_same_weights(source, target)


def test_official_file_of_another_preset_lists_every_problem(tmp_path: Path) -> None:
    small = write_official(tmp_path / "s.pth", official_layout(build_model("distilpose-tiny")))
    large = write_official(tmp_path / "l.pth", official_layout(build_model("distilpose-l-tiny")))

    with pytest.raises(CheckpointError) as err:
        load_official(build_model("distilpose-l-tiny"), small)
    msg = str(err.value)
    assert msg.startswith(str(small))
    assert "missing" in msg and "backbone.stage3.0." in msg and "backbone.transition2." in msg
    assert "mismatch" in msg and "keypoint_head.tokenhead.patch_to_embedding.weight" in msg
    assert "another preset" in msg

    with pytest.raises(CheckpointError) as err:
        load_official(build_model("distilpose-tiny"), large)
    msg = str(err.value)
    assert "unexpected" in msg and "backbone.stage2.0.fuse_layers.0" in msg
    assert "mismatch" in msg and "missing" not in msg

    report = load_official(build_model("distilpose-l-tiny"), small, strict=False)
    assert not report.ok and report.loaded > 0 and report.missing and report.mismatched


def test_teacher_file_into_student_gets_a_hint(tmp_path: Path) -> None:
    path = write_official(tmp_path / "teacher.pth", official_layout(build_model("tokenpose-tiny")))
    with pytest.raises(CheckpointError, match=r"(?s)teacher.pth.*unexpected.*keypoint_head\.tokenpose.*teacher head"):
        load_official(build_model("distilpose-l-tiny"), path)


def test_official_pos_embedding_is_checked_not_unexpected(tmp_path: Path) -> None:
    model = build_model("distilpose-tiny")
    state = official_layout(model)
    key = "keypoint_head.tokenhead.pos_embedding"
    state[key] = state[key] + 1e-6  # float noise from another machine: accepted and loaded
    report = load_official(model, write_official(tmp_path / "ok.pth", state))
    assert report.ok and torch.equal(model.tde.pos_embedding, state[key])

    state[key] = torch.randn_like(state[key])
    with pytest.raises(CheckpointError, match=r"(?s)1 shape/value mismatch.*pos_embedding: values differ"):
        load_official(model, write_official(tmp_path / "bad.pth", state))
    state[key] = torch.zeros(1, 10, 64)
    with pytest.raises(CheckpointError, match=r"pos_embedding: file \(1, 10, 64\) vs model \(1, 64, 96\)"):
        load_official(model, write_official(tmp_path / "shape.pth", state))


# --------------------------------------------------------------------------- teacher -> student


def test_init_student_backbone_from_teacher(tmp_path: Path) -> None:
    teacher = seeded("tokenpose-tiny", 1)
    ours = tmp_path / "teacher.pt"
    save_checkpoint(ours, teacher)
    official = write_official(tmp_path / "teacher.pth", official_layout(teacher))

    for path in (ours, official):
        student = seeded("distilpose-l-tiny", 2)
        result = init_student_backbone_from_teacher(student, path)
        student_backbone = student.backbone.state_dict()
        assert result.loaded == len(student_backbone)
        teacher_backbone = teacher.backbone.state_dict()
        assert all(torch.equal(v, teacher_backbone[k]) for k, v in student_backbone.items())
        # tokenpose-tiny has one stage-3 module: its fuse layers 1/2 feed stage 4 only.
        assert result.teacher_only
        assert all(k.startswith(("transition3.", "stage4.", "stage3.0.fuse_layers.")) for k in result.teacher_only)
        assert any(k.startswith("stage3.0.fuse_layers.1.") for k in result.teacher_only)
        assert "initialized" in str(result)


def test_paper_teacher_backbone_covers_distilpose_l() -> None:
    with torch.device("meta"):
        teacher = build_model("tokenpose-w48").backbone.state_dict()
        student = build_model("distilpose-l").backbone.state_dict()
    assert all(teacher[k].shape == v.shape for k, v in student.items())
    extra = {k.split(".")[0] if not k.startswith("stage3.") else ".".join(k.split(".")[:4]) for k in teacher}
    extra -= {k.split(".")[0] if not k.startswith("stage3.") else ".".join(k.split(".")[:4]) for k in student}
    assert extra == {"transition3", "stage4", "stage3.3.fuse_layers.1", "stage3.3.fuse_layers.2"}


def test_init_from_teacher_errors(tmp_path: Path) -> None:
    student_ckpt = tmp_path / "student.pt"
    save_checkpoint(student_ckpt, build_model("distilpose-l-tiny"))
    with pytest.raises(CheckpointError, match="student.pt.*is a student checkpoint"):
        init_student_backbone_from_teacher(build_model("distilpose-l-tiny"), student_ckpt)

    narrow = tmp_path / "narrow.pt"
    save_checkpoint(narrow, build_model("tokenpose-tiny", hrnet_width=8))
    with pytest.raises(CheckpointError, match=r"(?s)narrow.pt.*does not cover.*mismatch"):
        init_student_backbone_from_teacher(build_model("distilpose-l-tiny"), narrow)


def test_load_teacher_detects_the_file_format(tmp_path: Path) -> None:
    teacher = seeded("tokenpose-tiny", 1).eval()
    ours = tmp_path / "teacher.pt"
    save_checkpoint(ours, teacher)
    official = write_official(tmp_path / "teacher.pth", official_layout(teacher))
    for path in (ours, official):
        loaded = load_teacher("tokenpose-tiny", path)
        assert not loaded.training
        assert_same_weights(teacher, loaded)
    assert load_teacher("tokenpose-tiny").config.name == "tokenpose-tiny"

    with pytest.raises(ValueError, match="'distilpose-tiny' is a student"):
        load_teacher("distilpose-tiny")
    other = tmp_path / "other.pt"
    save_checkpoint(other, build_model("tokenpose-tiny", depth=1))  # same preset name, other depth
    assert load_teacher("tokenpose-tiny", other).config.depth == 1
    student = write_official(tmp_path / "student.pth", official_layout(build_model("distilpose-tiny")))
    with pytest.raises(CheckpointError, match=r"(?s)student.pth.*student head"):
        load_teacher("tokenpose-tiny", student)


def test_load_model_tells_the_formats_apart_by_content(tmp_path: Path) -> None:
    student = seeded("distilpose-tiny", 2).eval()
    ours = tmp_path / "student.pt"
    save_checkpoint(ours, student)
    # An official file under a name that says nothing: the content decides, not the name or an error text.
    official = write_official(tmp_path / "student.pt.bin", official_layout(student))
    assert_same_weights(student, load_model(ours))  # ours records its preset
    assert_same_weights(student, load_model(official, "distilpose-tiny"))
    assert not load_model(ours, "distilpose-tiny").training
    with pytest.raises(CheckpointError, match="official mmpose checkpoint .* name its preset"):
        load_model(official)
    with pytest.raises(CheckpointError, match="expected preset 'distilpose-l-tiny'"):
        load_model(ours, "distilpose-l-tiny")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "absent.pt")
