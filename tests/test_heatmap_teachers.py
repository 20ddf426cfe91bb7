"""Teachers and students without tokens: SimpleBaseline / HRNet heatmap teachers (mmpose 0.x
checkpoints) and the DeepPose student with Simulated Heatmaps."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from distilpose.losses import DistillLoss
from distilpose.models import build_model, get_config
from distilpose.models.checkpoints import CheckpointError, load_model, load_official, to_official_state_dict
from distilpose.models.presets import MMPOSE_FIGURES, ORIGINAL_PAPER_FIGURES
from distilpose.models.summary import summarize

torch.set_num_threads(2)

# --------------------------------------------------------------------------- mmpose's key names
# Written from mmpose 0.x's sources (backbones/resnet.py, heads/topdown_heatmap_simple_head.py,
# heads/deeppose_regression_head.py), independently of distilpose's modules: a renamed or
# re-shaped tensor in the library shows up as missing / unexpected here.

MMPOSE_STAGE_BLOCKS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}


def bn_keys(prefix: str, channels: int) -> dict[str, tuple[int, ...]]:
    shapes = {"weight": (channels,), "bias": (channels,), "running_mean": (channels,), "running_var": (channels,)}
    keys = {f"{prefix}.{name}": shape for name, shape in shapes.items()}
    keys[f"{prefix}.num_batches_tracked"] = ()
    return keys


def mmpose_resnet_keys(depth: int, stem: int = 64, base: int = 64) -> dict[str, tuple[int, ...]]:
    """`backbone.*` of mmpose ResNet(depth, stem_channels, base_channels), style pytorch."""
    bottleneck = depth >= 50
    expansion = 4 if bottleneck else 1
    keys = {"backbone.conv1.weight": (stem, 3, 7, 7), **bn_keys("backbone.bn1", stem)}
    in_ch = stem
    for stage, blocks in enumerate(MMPOSE_STAGE_BLOCKS[depth]):
        mid = base * 2**stage
        out_ch = mid * expansion
        for b in range(blocks):
            p = f"backbone.layer{stage + 1}.{b}"
            if bottleneck:
                convs = [(in_ch, mid, 1), (mid, mid, 3), (mid, out_ch, 1)]
            else:
                convs = [(in_ch, mid, 3), (mid, out_ch, 3)]
            for i, (cin, cout, k) in enumerate(convs, start=1):
                keys[f"{p}.conv{i}.weight"] = (cout, cin, k, k)
                keys.update(bn_keys(f"{p}.bn{i}", cout))
            if b == 0 and (stage > 0 or in_ch != out_ch):  # ResLayer: stride 2 or a width change
                keys[f"{p}.downsample.0.weight"] = (out_ch, in_ch, 1, 1)
                keys.update(bn_keys(f"{p}.downsample.1", out_ch))
            in_ch = out_ch
    return keys


def mmpose_simple_head_keys(in_ch: int, deconvs: int, channels: int, joints: int = 17) -> dict[str, tuple[int, ...]]:
    """`keypoint_head.*` of TopdownHeatmapSimpleHead: Sequential(deconv, BN, ReLU) x n + final 1x1 conv."""
    keys: dict[str, tuple[int, ...]] = {}
    for i in range(deconvs):
        keys[f"keypoint_head.deconv_layers.{3 * i}.weight"] = (in_ch, channels, 4, 4)  # ConvTranspose2d: (in, out)
        keys.update(bn_keys(f"keypoint_head.deconv_layers.{3 * i + 1}", channels))
        in_ch = channels
    keys["keypoint_head.final_layer.weight"] = (joints, in_ch, 1, 1)
    keys["keypoint_head.final_layer.bias"] = (joints,)
    return keys


def random_state(keys: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in keys.items():
        if name.endswith("num_batches_tracked"):
            state[name] = torch.tensor(1234, dtype=torch.int64)
        elif name.endswith("running_var"):
            state[name] = torch.rand(shape, generator=generator) + 0.5
        else:
            state[name] = torch.randn(shape, generator=generator) * 0.05
    return state


def write_mmcv_checkpoint(path: Path, state: dict[str, torch.Tensor]) -> Path:
    # As mmcv's save_checkpoint writes it: meta (numpy scalars included) + state_dict.
    meta = {"mmpose_version": "0.29.0", "epoch": 210, "hook_msgs": {"best_score": np.float64(0.718)}}
    torch.save({"meta": meta, "state_dict": state, "optimizer": {}}, path)
    return path


@pytest.mark.parametrize(
    ("preset", "depth", "stem", "base", "deconv_channels"),
    [("simplebaseline-tiny", 18, 16, 16, 64), ("simplebaseline-r50", 50, 64, 64, 256)],
)
def test_mmpose_simplebaseline_checkpoint_loads_with_no_missing_keys(
    tmp_path: Path, preset: str, depth: int, stem: int, base: int, deconv_channels: int
) -> None:
    final_channels = base * 8 * (4 if depth >= 50 else 1)
    keys = {**mmpose_resnet_keys(depth, stem, base), **mmpose_simple_head_keys(final_channels, 3, deconv_channels)}
    state = random_state(keys)
    path = write_mmcv_checkpoint(tmp_path / "res_coco_256x192.pth", state)

    model = build_model(preset)
    report = load_official(model, path)  # strict: raises on anything missing or unexpected
    assert report.missing == [] and report.unexpected == [] and report.mismatched == []
    assert report.loaded == len(keys)
    # The values land where mmpose's names say.
    ours = model.state_dict()
    assert torch.equal(ours["head.final_layer.weight"], state["keypoint_head.final_layer.weight"])
    assert torch.equal(ours["head.deconv_layers.6.weight"], state["keypoint_head.deconv_layers.6.weight"])
    last = f"backbone.layer4.{len(model.backbone.layer4) - 1}.conv2.weight"
    assert torch.equal(ours[last], state[last])
    # The cache job's loader reads the same file by content, as a preset's weights.
    loaded = load_model(path, preset)
    assert torch.equal(loaded.state_dict()["backbone.bn1.running_var"], state["backbone.bn1.running_var"])
    if preset.endswith("-tiny"):  # a paper-size forward costs seconds; the shapes are the same code
        with torch.no_grad():
            out = loaded(torch.randn(1, 3, *loaded.config.input_size))
        assert out.heatmaps.shape == (1, 17, *loaded.config.heatmap_size)


def test_mmpose_keys_of_another_depth_are_listed(tmp_path: Path) -> None:
    keys = {**mmpose_resnet_keys(34, 16, 16), **mmpose_simple_head_keys(128, 3, 64)}
    path = write_mmcv_checkpoint(tmp_path / "res34.pth", random_state(keys))
    with pytest.raises(CheckpointError, match=r"unexpected .*\n.*backbone.layer1.2") as info:
        load_official(build_model("simplebaseline-tiny"), path)
    assert "simplebaseline-tiny" in str(info.value)


def test_hrnet_heatmap_teacher_official_round_trip(tmp_path: Path) -> None:
    # HRNet's backbone names are mmpose's (the TokenPose teachers load official files through
    # them); the top-down head is keypoint_head.final_layer only (no deconvolution).
    torch.manual_seed(1)
    model = build_model("hrnet-tiny")
    official = to_official_state_dict(model)
    head = sorted(k for k in official if not k.startswith("backbone."))
    assert head == ["keypoint_head.final_layer.bias", "keypoint_head.final_layer.weight"]
    path = write_mmcv_checkpoint(tmp_path / "hrnet.pth", official)
    loaded = load_model(path, "hrnet-tiny")
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())


def test_tokenpose_file_into_heatmap_teacher_gets_a_hint(tmp_path: Path) -> None:
    path = write_mmcv_checkpoint(tmp_path / "tokenpose.pth", to_official_state_dict(build_model("tokenpose-tiny")))
    with pytest.raises(CheckpointError, match="holds a teacher head"):
        load_model(path, "hrnet-tiny")


def test_mmpose_deeppose_checkpoint_starts_the_sh_student(tmp_path: Path) -> None:
    # mmpose's DeepPose: backbone + keypoint_head.fc (2K outputs). Ours adds the Simulated
    # Heatmaps layer keypoint_head.sh; a non-strict load fills everything else.
    keys = mmpose_resnet_keys(18, 16, 16)
    keys |= {"keypoint_head.fc.weight": (34, 128), "keypoint_head.fc.bias": (34,)}
    state = random_state(keys)
    path = write_mmcv_checkpoint(tmp_path / "deeppose.pth", state)
    model = build_model("deeppose-tiny")
    report = load_official(model, path, strict=False)
    assert report.unexpected == [] and report.mismatched == []
    assert report.missing == ["keypoint_head.sh.weight", "keypoint_head.sh.bias"]
    assert torch.equal(model.head.fc.weight, state["keypoint_head.fc.weight"])


# --------------------------------------------------------------------------- sizes


@pytest.mark.parametrize("name", sorted(MMPOSE_FIGURES))
def test_params_and_gflops_match_mmpose(name: str) -> None:
    row = summarize(name)  # meta device
    params_m, gflops = MMPOSE_FIGURES[name]
    assert abs(row["params"] / 1e6 - params_m) / params_m < 0.01
    assert abs(row["gflops"] - gflops) / gflops < 0.05
    if name in ORIGINAL_PAPER_FIGURES:  # the SimpleBaseline / HRNet papers' own count
        paper_params, paper_gflops = ORIGINAL_PAPER_FIGURES[name]
        assert abs(row["params"] / 1e6 - paper_params) / paper_params < 0.01
        assert abs(row["gflops_hrnet_repo"] - paper_gflops) / paper_gflops < 0.02


def test_simplebaseline_r50_counts_exactly() -> None:
    row = summarize("simplebaseline-r50")
    # ResNet-50 without its fc + 3 deconvolutions + their BNs + the 1x1 conv (with bias).
    resnet50, deconvs, bns, final = 23_508_032, 2048 * 256 * 16 + 2 * 256 * 256 * 16, 3 * 2 * 256, 256 * 17 + 17
    assert row["params"] == resnet50 + deconvs + bns + final == 33_999_697
    assert row["gflops"] == pytest.approx(5.46, abs=0.01)


# --------------------------------------------------------------------------- DeepPose + SH


def test_deeppose_with_simulated_heatmaps_trains_every_output() -> None:
    torch.manual_seed(0)
    student = build_model("deeppose-tiny").train()
    teacher = build_model("simplebaseline-tiny").eval()
    x = torch.randn(4, 3, 128, 96)
    with torch.no_grad():
        heatmaps = teacher(x).heatmaps
    out = student(x)
    assert out.coords.shape == (4, 17, 2) and out.sigma.shape == (4, 17, 2) and out.score.shape == (4, 17)
    assert ((out.coords > 0) & (out.coords < 1)).all() and (out.sigma > 0).all()
    target, weight = torch.rand(4, 17, 2), torch.ones(4, 17)

    loss_fn = DistillLoss(alpha_kt=0.0, alpha_vt=0.0)  # token losses off: neither model has tokens
    total, terms = loss_fn(out, target, weight, {"heatmaps": heatmaps})
    assert set(terms) == {"reg", "sh", "cs"} and torch.isfinite(total)
    total.backward()
    assert student.head.sh.weight.grad.abs().sum() > 0  # sigma and score are trained by L_SH / L_CS
    assert student.head.fc.weight.grad.abs().sum() > 0

    # DeepPose without SH, the baseline: L_reg only, the SH layer gets no gradient at all.
    student.zero_grad(set_to_none=True)
    total, terms = DistillLoss(0.0, 0.0, 0.0, 0.0)(student(x), target, weight, {})
    assert set(terms) == {"reg"}
    total.backward()
    assert student.head.sh.weight.grad is None and student.head.fc.weight.grad.abs().sum() > 0


def test_tokenless_configs_are_checked() -> None:
    with pytest.raises(ValueError, match="needs 3 deconv_layers, got 2"):
        get_config("simplebaseline-tiny", deconv_layers=2)
    with pytest.raises(ValueError, match="needs 0 deconv_layers"):
        get_config("hrnet-tiny", deconv_layers=1)
    with pytest.raises(ValueError, match="token encoder needs a stride-4 backbone"):
        get_config("distilpose-tiny", backbone="resnet")
    with pytest.raises(ValueError, match="a student head must be one of"):
        get_config("deeppose-tiny", head="heatmap")
    cfg = get_config("simplebaseline-tiny")
    assert not cfg.has_tokens and cfg.num_patches == 0 and cfg.token_dim == 0
