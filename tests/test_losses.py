import math
from types import SimpleNamespace

import pytest
import torch

from distilpose.losses import DistillLoss, loss_cs, loss_kt, loss_reg, loss_sh, loss_vt

E = math.exp(-1.0)


# ---------------------------------------------------------------- single terms, by hand


def test_loss_reg_by_hand():
    coords = torch.tensor([[[0.5, 0.5], [2.0, 0.9], [0.3, 0.3]]])
    target = torch.tensor([[[0.7, 0.5], [0.0, 0.9], [0.9, 0.9]]])
    weight = torch.tensor([[1.0, 1.0, 0.0]])
    # Joint 0: |d| = 0.2 -> 0.5 * 0.04 = 0.02; joint 1: |d| = 2 -> L1 zone 2 - 0.5 = 1.5;
    # joint 2 is weighted out but still counted: mean over 3 * 2 entries.
    assert loss_reg(coords, target, weight).item() == pytest.approx((0.02 + 1.5) / 6)
    # The official (N, K, 2) weight layout gives the same value.
    assert loss_reg(coords, target, weight.unsqueeze(-1).repeat(1, 1, 2)).item() == pytest.approx(1.52 / 6)


def test_loss_kt_and_vt_by_hand():
    student_kpt = torch.zeros(1, 2, 2)
    teacher_kpt = torch.tensor([[[1.0, 2.0], [3.0, -1.0]]])
    assert loss_kt(student_kpt, teacher_kpt).item() == pytest.approx((1 + 4 + 9 + 1) / 4)
    student_vis = torch.ones(1, 1, 3)
    teacher_vis = torch.tensor([[[0.0, 2.0, 4.0]]])
    assert loss_vt(student_vis, teacher_vis).item() == pytest.approx((1 + 1 + 9) / 3)


def test_token_losses_reject_mismatched_shapes():
    with pytest.raises(ValueError, match="kpt_tokens"):
        loss_kt(torch.zeros(1, 17, 8), torch.zeros(1, 17, 4))


def two_sample_sh_case() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """N=2, K=1 on a 1 x 2 grid, sigma 1.

    Sample 0: mu = (0, 0) -> S = [1, e^-0.5], T = [1, 0] -> squared errors [0, e^-1].
    Sample 1: mu = (1, 0) (coords x 0.5 * W 2) -> S = [e^-0.5, 1], T = [0, 0] -> [e^-1, 1].
    """
    coords = torch.tensor([[[0.0, 0.0]], [[0.5, 0.0]]])
    sigma = torch.ones(2, 1, 2)
    teacher = torch.tensor([[[[1.0, 0.0]]], [[[0.0, 0.0]]]])
    return coords, sigma, teacher


def test_loss_sh_single_map_by_hand():
    coords, sigma, teacher = two_sample_sh_case()
    loss = loss_sh(coords[:1], sigma[:1], teacher[:1], torch.ones(1, 1))
    assert loss.item() == pytest.approx(E / 2)


def test_loss_sh_weighting_per_sample_vs_official_by_hand():
    coords, sigma, teacher = two_sample_sh_case()
    weight = torch.tensor([[1.0], [0.0]])
    # Per-sample: only sample 0 counts, mean over 2 samples x 2 pixels.
    assert loss_sh(coords, sigma, teacher, weight, "per-sample").item() == pytest.approx(E / 4)
    # Official: half the samples are valid x plain MSE over both samples.
    assert loss_sh(coords, sigma, teacher, weight, "official").item() == pytest.approx(0.5 * (2 * E + 1) / 4)
    ones = torch.ones(2, 1)
    for weighting in ("per-sample", "official"):
        assert loss_sh(coords, sigma, teacher, ones, weighting).item() == pytest.approx((2 * E + 1) / 4)


def test_loss_sh_invalid_joint_renders_zero_map():
    # mu_x = 10 * 2 = 20, 20 - 3 * 1 >= W = 2: outside the validity box, so S is all-zero;
    # per-sample weighting drops it, the official mode still compares its zero map with T.
    coords = torch.tensor([[[0.0, 0.0]], [[10.0, 0.0]]])
    sigma = torch.ones(2, 1, 2)
    teacher = torch.tensor([[[[1.0, 0.0]]], [[[0.5, 0.5]]]])
    weight = torch.ones(2, 1)
    assert loss_sh(coords, sigma, teacher, weight, "per-sample").item() == pytest.approx(E / 4)
    assert loss_sh(coords, sigma, teacher, weight, "official").item() == pytest.approx(0.5 * (E + 0.5) / 4)


def test_loss_sh_official_and_per_sample_on_random_batches():
    generator = torch.Generator().manual_seed(0)
    coords = torch.rand(4, 3, 2, generator=generator)
    sigma = 1 + torch.rand(4, 3, 2, generator=generator)
    teacher = torch.rand(4, 3, 8, 6, generator=generator)
    ones = torch.ones(4, 3)
    torch.testing.assert_close(
        loss_sh(coords, sigma, teacher, ones, "per-sample"), loss_sh(coords, sigma, teacher, ones, "official")
    )
    varying = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0], [1.0, 1.0, 0.0], [1.0, 0.0, 1.0]])
    per_sample = loss_sh(coords, sigma, teacher, varying, "per-sample")
    official = loss_sh(coords, sigma, teacher, varying, "official")
    assert not torch.isclose(per_sample, official)


def test_loss_sh_gradient_reaches_coords_and_sigma():
    generator = torch.Generator().manual_seed(1)
    coords = torch.rand(2, 3, 2, generator=generator).requires_grad_()
    sigma = (1 + torch.rand(2, 3, 2, generator=generator)).requires_grad_()
    teacher = torch.rand(2, 3, 8, 6, generator=generator)
    loss_sh(coords, sigma, teacher, torch.ones(2, 3)).backward()
    for grad in (coords.grad, sigma.grad):
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_loss_sh_rejects_unknown_weighting():
    coords, sigma, teacher = two_sample_sh_case()
    with pytest.raises(ValueError, match="weighting"):
        loss_sh(coords, sigma, teacher, torch.ones(2, 1), "mean")


def test_loss_cs_by_hand_and_target_detached():
    teacher = (torch.arange(12.0) / 10).view(1, 1, 3, 4).repeat(1, 3, 1, 1)
    # Joint 0 samples cell (row 2, col 2) = 1.0; joint 1 is outside [0, 1] -> target 0;
    # joint 2 is weighted out.
    coords = torch.tensor([[[0.7, 0.9], [1.2, -0.3], [0.5, 0.5]]], requires_grad=True)
    score = torch.tensor([[0.4, 0.5, 3.0]], requires_grad=True)
    loss = loss_cs(score, coords, teacher, torch.tensor([[1.0, 1.0, 0.0]]))
    assert loss.item() == pytest.approx((0.6 + 0.5 + 0.0) / 3)
    loss.backward()
    assert coords.grad is None
    torch.testing.assert_close(score.grad, torch.tensor([[-1 / 3, 1 / 3, 0.0]]))


# ---------------------------------------------------------------- DistillLoss


def make_batch(seed: int = 0) -> tuple[SimpleNamespace, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    n, k, d, p, size = 2, 3, 4, 5, (8, 6)
    student = SimpleNamespace(
        coords=torch.rand(n, k, 2, generator=generator).requires_grad_(),
        sigma=(1 + torch.rand(n, k, 2, generator=generator)).requires_grad_(),
        score=torch.rand(n, k, generator=generator).requires_grad_(),
        kpt_tokens=torch.randn(n, k, d, generator=generator).requires_grad_(),
        vis_tokens=torch.randn(n, p, d, generator=generator).requires_grad_(),
    )
    target = torch.rand(n, k, 2, generator=generator)
    target_weight = torch.tensor([[1.0, 0.0, 1.0], [1.0, 1.0, 1.0]])
    teacher = {
        "heatmaps": torch.rand(n, k, *size, generator=generator).half(),
        "kpt_tokens": torch.randn(n, k, d, generator=generator),
        "vis_tokens": torch.randn(n, p, d, generator=generator),
    }
    return student, target, target_weight, teacher


def test_distill_loss_terms_are_weighted_and_sum_to_total():
    student, target, target_weight, teacher = make_batch()
    criterion = DistillLoss(alpha_kt=0.1, alpha_vt=0.2, alpha_sh=0.3, alpha_cs=0.4, sh_weighting="official")
    total, terms = criterion(student, target, target_weight, teacher)
    assert set(terms) == {"reg", "kt", "vt", "sh", "cs"}
    torch.testing.assert_close(total, sum(terms.values()))
    heatmaps = teacher["heatmaps"].float()
    expected = {
        "reg": loss_reg(student.coords, target, target_weight),
        "kt": 0.1 * loss_kt(student.kpt_tokens, teacher["kpt_tokens"]),
        "vt": 0.2 * loss_vt(student.vis_tokens, teacher["vis_tokens"]),
        "sh": 0.3 * loss_sh(student.coords, student.sigma, heatmaps, target_weight, "official"),
        "cs": 0.4 * loss_cs(student.score, student.coords, heatmaps, target_weight),
    }
    for name, value in expected.items():
        torch.testing.assert_close(terms[name], value)
    total.backward()
    for tensor in vars(student).values():
        assert tensor.grad is not None and torch.isfinite(tensor.grad).all()


def test_distill_loss_defaults_are_the_paper_config():
    criterion = DistillLoss()
    assert criterion.alphas == {"kt": 5e-4, "vt": 5e-4, "sh": 1.0, "cs": 0.01}
    assert criterion.sh_weighting == "per-sample"
    assert criterion.needed_teacher_fields == ("kpt_tokens", "vis_tokens", "heatmaps")


def test_alpha_zero_disables_term_and_its_teacher_field():
    student, target, target_weight, teacher = make_batch()
    criterion = DistillLoss(alpha_vt=0.0, alpha_sh=0.0, alpha_cs=0.0)
    assert criterion.needed_teacher_fields == ("kpt_tokens",)
    total, terms = criterion(student, target, target_weight, {"kpt_tokens": teacher["kpt_tokens"]})
    assert set(terms) == {"reg", "kt"}
    torch.testing.assert_close(total, terms["reg"] + terms["kt"])
    only_reg = DistillLoss(alpha_kt=0, alpha_vt=0, alpha_sh=0, alpha_cs=0)
    assert only_reg.needed_teacher_fields == ()
    total, terms = only_reg(student, target, target_weight, {})
    assert set(terms) == {"reg"}
    torch.testing.assert_close(total, terms["reg"])


def test_missing_teacher_field_names_it():
    student, target, target_weight, teacher = make_batch()
    del teacher["heatmaps"]
    with pytest.raises(ValueError, match="'sh'.*'heatmaps'.*alpha_sh=0"):
        DistillLoss()(student, target, target_weight, teacher)


def test_bad_configuration_is_rejected():
    with pytest.raises(ValueError, match="sh_weighting"):
        DistillLoss(sh_weighting="broadcast")
    with pytest.raises(ValueError, match=">= 0"):
        DistillLoss(alpha_kt=-1.0)


def test_teacher_output_object_is_accepted_like_a_dict():
    student, target, target_weight, teacher = make_batch()
    criterion = DistillLoss()
    total_from_dict, _ = criterion(student, target, target_weight, teacher)
    total_from_object, _ = criterion(student, target, target_weight, SimpleNamespace(**teacher))
    torch.testing.assert_close(total_from_object, total_from_dict)
    with pytest.raises(ValueError, match="'kpt_tokens'"):
        criterion(student, target, target_weight, SimpleNamespace(heatmaps=teacher["heatmaps"]))
