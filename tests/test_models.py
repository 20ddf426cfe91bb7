"""distilpose.models: shapes, paper params/GFLOPs, gradients, token alignment, determinism."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from distilpose.models import PRESETS, ModelConfig, StudentOutput, TeacherOutput, build_model, get_config
from distilpose.models.deeppose import RegressionOutput
from distilpose.models.simplebaseline import HeatmapOutput
from distilpose.models.summary import count_gflops, count_params, main, summarize

torch.set_num_threads(2)

TINY = ["tokenpose-tiny", "distilpose-tiny", "distilpose-l-tiny", "simplebaseline-tiny", "hrnet-tiny", "deeppose-tiny"]
PAPER = ["tokenpose-w48", "distilpose-s", "distilpose-l", "tokenpose-stemnet"]
# Without tokens (tests/test_heatmap_teachers.py): SimpleBaseline / HRNet teachers, DeepPose students.
PAPER += [f"simplebaseline-r{d}" for d in (50, 101, 152)] + ["hrnet-w32", "hrnet-w48"]
PAPER += [f"deeppose-r{d}" for d in (50, 101, 152)]
# (params, GFLOPs) published by the paper / official README.
PAPER_FIGURES = {"distilpose-s": (5.36e6, 2.38), "distilpose-l": (21.27e6, 10.33), "tokenpose-w48": (69.41e6, 17.03)}
# Exact trainable-parameter counts, re-derived by arithmetic (docs/method.md#parameter-and-flop-counts).
EXACT_PARAMS = {"distilpose-s": 5_364_101, "distilpose-l": 21_265_637, "tokenpose-w48": 69_411_360}


def check_output(model: torch.nn.Module, out, batch: int) -> None:
    cfg = model.config
    k, d, p = cfg.num_joints, cfg.dim, cfg.num_patches
    if cfg.has_tokens:
        assert out.kpt_tokens.shape == (batch, k, d)
        assert out.vis_tokens.shape == (batch, p, d)
    else:  # no empty token tensors either
        assert not hasattr(out, "kpt_tokens") and not hasattr(out, "vis_tokens")
    if cfg.kind == "teacher":
        assert isinstance(out, TeacherOutput if cfg.has_tokens else HeatmapOutput)
        assert out.heatmaps.shape == (batch, k, *cfg.heatmap_size)
        assert torch.isfinite(out.heatmaps).all()
    else:
        assert isinstance(out, StudentOutput if cfg.has_tokens else RegressionOutput)
        assert out.coords.shape == (batch, k, 2)
        assert out.sigma.shape == (batch, k, 2)
        assert out.score.shape == (batch, k)
        assert ((out.coords >= 0) & (out.coords <= 1)).all()
        assert (out.sigma > 0).all()


def test_every_preset_is_tiny_or_paper_size() -> None:
    # The loops below run over PRESETS; a new preset must say which size class it is.
    assert sorted(TINY + PAPER) == sorted(PRESETS)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_output_shapes(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(name)
    if name in PAPER:
        assert model.config.input_size == (256, 192) and model.config.heatmap_size == (64, 48)
        if model.config.has_tokens:
            assert model.config.num_patches == 256 and model.config.dim == 192
    # Paper-size forwards cost seconds on a CPU: one crop in eval mode is enough for them.
    batch = 2 if name in TINY else 1
    x = torch.randn(batch, 3, *model.config.input_size)
    with torch.no_grad():
        if name in TINY:
            check_output(model, model(x), batch)  # train mode (batch statistics)
        model.eval()
        check_output(model, model(x), batch)


@pytest.mark.parametrize("name", sorted(PAPER_FIGURES))
def test_paper_params_and_gflops(name: str) -> None:
    row = summarize(name)  # built on the meta device: shapes only
    params, gflops = PAPER_FIGURES[name]
    assert row["params"] == EXACT_PARAMS[name]
    assert abs(row["params"] - params) / params < 0.01
    assert abs(row["gflops"] - gflops) / gflops < 0.05
    # The mmcv-convention recount (2.3826 / 10.3252 / 17.0281, docs/method.md#parameter-and-flop-counts) is reproduced.
    assert row["gflops"] == pytest.approx(gflops, abs=0.01)


def test_pos_table_is_a_fixed_buffer_not_a_parameter() -> None:
    model = build_model("distilpose-tiny")
    names = {n for n, _ in model.named_parameters()}
    assert not any("pos_embedding" in n for n in names)
    assert "tde.pos_embedding" not in model.state_dict()
    assert model.tde.pos_embedding.shape == (1, 64, model.config.dim)
    assert count_params(model) == sum(p.numel() for p in model.parameters())


def test_count_gflops_excludes_attention_matmuls() -> None:
    # Two models differing only in transformer depth differ by exactly the per-layer Linear +
    # LayerNorm cost; attention QK^T / AV would add a token-count-squared term.
    shallow = build_model("distilpose-tiny", depth=1)
    deep = build_model("distilpose-tiny", depth=2)
    tokens, d = 17 + 64, deep.config.dim
    per_layer = tokens * (d * 3 * d + d * d + 2 * d * 3 * d) + 2 * (2 * tokens * d)
    assert round((count_gflops(deep) - count_gflops(shallow)) * 1e9) == per_layer


def test_summary_prints_table_and_convention(capsys) -> None:
    main(["distilpose-tiny", "distilpose-s"])
    out = capsys.readouterr().out
    assert "distilpose-tiny" in out and "5,364,101" in out and "5.36M / 2.38" in out
    assert "attention matmuls" in out


def test_students_align_with_teachers() -> None:
    # Every student can be distilled from every teacher of its input size: same joints and
    # heatmap grid (L_SH, L_CS), and between token models the same token width and number of
    # visual tokens (the KT / VT losses compare them one to one).
    teachers = [c for c in PRESETS.values() if c.kind == "teacher"]
    for s in (c for c in PRESETS.values() if c.kind == "student"):
        partners = [t for t in teachers if t.input_size == s.input_size]
        assert partners, f"no teacher for {s.name}"
        for t in partners:
            assert t.heatmap_size == s.heatmap_size and t.num_joints == s.num_joints, (t.name, s.name)
            if t.has_tokens and s.has_tokens:
                assert (t.dim, t.num_patches) == (s.dim, s.num_patches), (t.name, s.name)

    x = torch.randn(2, 3, 128, 96)
    t_out = build_model("tokenpose-tiny")(x)
    for student in ("distilpose-tiny", "distilpose-l-tiny"):
        s_out = build_model(student)(x)
        assert s_out.kpt_tokens.shape == t_out.kpt_tokens.shape
        assert s_out.vis_tokens.shape == t_out.vis_tokens.shape


# Paper-size backward passes take tens of seconds on a CPU: under the heavy marker.
@pytest.mark.parametrize("name", [*TINY, *(pytest.param(n, marks=pytest.mark.heavy) for n in PAPER)])
def test_gradients_reach_every_parameter(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(name).train()
    if model.config.backbone == "resnet":
        # mmpose's ResNet init zeroes each block's last BN weight (the block starts as the
        # identity): no gradient reaches that block's last conv until the BN weight moves.
        for m in model.backbone.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                torch.nn.init.ones_(m.weight)
    out = model(torch.randn(4, 3, *model.config.input_size))
    if model.config.kind == "student":
        loss = out.coords.sum() + out.sigma.sum() + out.score.sum()
    else:
        loss = out.heatmaps.square().sum()
    if model.config.has_tokens:
        loss = loss + out.kpt_tokens.square().mean() + out.vis_tokens.square().mean()
    loss.backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not dead, f"no gradient reaches {dead}"


def test_seeded_construction_and_forward_are_deterministic() -> None:
    def run() -> tuple[dict, StudentOutput]:
        torch.manual_seed(123)
        model = build_model("distilpose-tiny").eval()
        x = torch.randn(2, 3, 128, 96)
        with torch.no_grad():
            return model.state_dict(), model(x)

    (sd1, out1), (sd2, out2) = run(), run()
    assert all(torch.equal(sd1[k], sd2[k]) for k in sd1)
    for field in dataclasses.fields(StudentOutput):
        assert torch.equal(getattr(out1, field.name), getattr(out2, field.name))
    torch.manual_seed(124)
    other = build_model("distilpose-tiny").state_dict()
    assert not torch.equal(other["tde.keypoint_token"], sd1["tde.keypoint_token"])


def test_hrnet_structure_follows_mmpose() -> None:
    with torch.device("meta"):
        teacher = build_model("tokenpose-w48").backbone
        student = build_model("distilpose-l").backbone
    # Teacher: stages 2 and 3 fuse to every branch, only the last stage-4 module is single-output.
    assert [len(m.fuse_layers) for m in teacher.stage3] == [3, 3, 3, 3]
    assert [len(m.fuse_layers) for m in teacher.stage4] == [4, 4, 1]
    # DistilPose-L: cut after stage 3, whose last module fuses to the high-res branch only.
    assert [len(m.fuse_layers) for m in student.stage3] == [3, 3, 3, 1]
    assert not hasattr(student, "stage4") and not hasattr(student, "transition3")
    assert count_params(teacher) == 63_594_912
    assert count_params(student) == 16_705_824


def test_stemnet_backbone_matches_spec() -> None:
    with torch.device("meta"):
        stem = build_model("distilpose-s").backbone
        out = stem(torch.zeros(1, 3, 256, 192, device="meta"))
    assert count_params(stem) == 325_056
    assert out.shape == (1, 256, 64, 48)
    assert "layer1.0.downsample.1.running_var" in stem.state_dict()


def test_config_json_round_trip_and_overrides() -> None:
    for name, cfg in PRESETS.items():
        assert cfg.name == name
        back = ModelConfig(**json.loads(json.dumps(dataclasses.asdict(cfg))))
        assert back == cfg
    cfg = get_config("distilpose-tiny", depth=3)
    assert cfg.depth == 3 and get_config("distilpose-tiny").depth == 2
    assert build_model("distilpose-tiny", depth=3).config == cfg


def test_config_errors_are_clear() -> None:
    with pytest.raises(ValueError, match="unknown model preset 'nope'.*distilpose-s"):
        get_config("nope")
    with pytest.raises(ValueError, match="unknown ModelConfig field.*'dpeth'"):
        get_config("distilpose-tiny", dpeth=3)
    with pytest.raises(ValueError, match="divisible by heads"):
        get_config("distilpose-tiny", heads=5)
    with pytest.raises(ValueError, match="4x heatmap_size"):
        get_config("distilpose-tiny", input_size=(256, 192))


def test_wrong_input_size_is_reported() -> None:
    model = build_model("distilpose-tiny")
    with pytest.raises(ValueError, match="input image size does not match"):
        model(torch.randn(1, 3, 256, 192))
