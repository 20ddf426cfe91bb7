"""DistilPose training losses (docs/method.md#losses), each term a small function.

Shapes: N batch, K joints, D token dim, P visual tokens. ``target_weight`` is per joint
(N, K); the official (N, K, 2) layout (x and y duplicated) is accepted too.
Students are duck-typed: any object with ``coords``, ``sigma``, ``score``, ``kpt_tokens``
and ``vis_tokens`` attributes (see ``distilpose.models.StudentOutput``) works.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from distilpose.heatmaps import render_simulated_heatmaps, sample_heatmaps

ShWeighting = Literal["per-sample", "official"]
SH_WEIGHTINGS: tuple[str, ...] = ("per-sample", "official")
# Which teacher output each distillation term reads (the cache reader skips the others).
TEACHER_FIELD_OF_TERM = {"kt": "kpt_tokens", "vt": "vis_tokens", "sh": "heatmaps", "cs": "heatmaps"}
# Optional (N,) batch entry: per-sample weight of the token terms (0 masks a sample).
TOKEN_WEIGHT = "token_weight"


def _joint_weights(target_weight: torch.Tensor) -> torch.Tensor:
    """(N, K) weights from (N, K) or the official (N, K, 2) / (N, K, 1) layout."""
    if target_weight.dim() == 3:
        return target_weight[..., 0]
    if target_weight.dim() != 2:
        raise ValueError(f"target_weight must be (N, K) or (N, K, 2), got {tuple(target_weight.shape)}")
    return target_weight


def _check_same_shape(student: torch.Tensor, teacher: torch.Tensor, what: str) -> None:
    # F.mse_loss would broadcast mismatched shapes with only a warning.
    if student.shape != teacher.shape:
        raise ValueError(
            f"{what}: student shape {tuple(student.shape)} != teacher shape {tuple(teacher.shape)}; "
            "the student and its teacher must share K, D and P"
        )


def loss_reg(coords: torch.Tensor, target: torch.Tensor, target_weight: torch.Tensor) -> torch.Tensor:
    """L_reg: smooth L1 (beta 1) between weighted normalized coords, mean over N*K*2 entries.

    Zero-weight joints still count in the mean (as in mmpose's SmoothL1Loss).
    """
    weight = _joint_weights(target_weight).to(coords.dtype).unsqueeze(-1)
    return F.smooth_l1_loss(coords * weight, target.to(coords.dtype) * weight, beta=1.0)


def _token_mse(student: torch.Tensor, teacher: torch.Tensor, sample_weight: torch.Tensor | None) -> torch.Tensor:
    """MSE (mean over every entry); with ``sample_weight`` (N,) each sample's squared errors
    are weighted first (0 masks a sample; it still counts in the mean, as zero-weight joints
    do in L_reg)."""
    teacher = teacher.detach().to(student.dtype)
    if sample_weight is None:
        return F.mse_loss(student, teacher)
    weight = sample_weight.to(student.dtype).reshape(-1, *([1] * (student.dim() - 1)))
    return ((student - teacher).pow(2) * weight).mean()


def loss_kt(
    student_kpt_tokens: torch.Tensor, teacher_kpt_tokens: torch.Tensor, sample_weight: torch.Tensor | None = None
) -> torch.Tensor:
    """L_KT: MSE (mean) between last-layer keypoint tokens (N, K, D); teacher is a constant."""
    _check_same_shape(student_kpt_tokens, teacher_kpt_tokens, "kpt_tokens")
    return _token_mse(student_kpt_tokens, teacher_kpt_tokens, sample_weight)


def loss_vt(
    student_vis_tokens: torch.Tensor, teacher_vis_tokens: torch.Tensor, sample_weight: torch.Tensor | None = None
) -> torch.Tensor:
    """L_VT: MSE (mean) between last-layer visual tokens (N, P, D); teacher is a constant."""
    _check_same_shape(student_vis_tokens, teacher_vis_tokens, "vis_tokens")
    return _token_mse(student_vis_tokens, teacher_vis_tokens, sample_weight)


def simulated_heatmap_validity(mu: torch.Tensor, sigma: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(N, K) bool: the official Reg2HMLoss keeps a joint whose 3-sigma box touches the grid."""
    height, width = size
    reach = 3 * sigma
    return (
        (mu[..., 0] - reach[..., 0] < width)
        & (mu[..., 1] - reach[..., 1] < height)
        & (mu[..., 0] + reach[..., 0] + 1 >= 0)
        & (mu[..., 1] + reach[..., 1] + 1 >= 0)
    )


def loss_sh(
    coords: torch.Tensor,
    sigma: torch.Tensor,
    teacher_heatmaps: torch.Tensor,
    target_weight: torch.Tensor,
    weighting: ShWeighting = "per-sample",
) -> torch.Tensor:
    """L_SH: MSE between the student's simulated heatmaps and the teacher's raw heatmaps.

    mu = coords * (W, H) (heatmap px, H / W not H - 1 / W - 1, as coded officially); sigma in
    heatmap px. Weight w (N, K) = target_weight * validity; invalid joints render all-zero.
    - "per-sample" (project default, docs/method.md#official-quirks-and-switches): w_ik multiplies sample i,
      joint k:
      loss = sum_k mean_{i,pixels} (w_ik (S_ik - T_ik))^2 / K.
    - "official": mmpose v0.22 JointsMSELoss fed (N, K, 1, 1) weights broadcasts to
      (N, N, HW): loss_k = mean_i(w_ik^2) * mean_{j,pixels} (S_jk - T_jk)^2, then
      sum_k / K. With 0/1 weights mean_i(w_ik^2) is the fraction of valid samples.
    """
    if weighting not in SH_WEIGHTINGS:
        raise ValueError(f"sh weighting must be one of {SH_WEIGHTINGS}, got {weighting!r}")
    height, width = teacher_heatmaps.shape[-2:]
    scale = torch.tensor([width, height], dtype=coords.dtype, device=coords.device)
    mu = coords * scale
    valid = simulated_heatmap_validity(mu, sigma, (height, width))
    simulated = render_simulated_heatmaps(mu, sigma, (height, width))
    simulated = simulated * valid[..., None, None].to(simulated.dtype)
    teacher = teacher_heatmaps.detach().to(simulated.dtype)
    weight = _joint_weights(target_weight).to(simulated.dtype) * valid.to(simulated.dtype)
    if weighting == "per-sample":
        return ((simulated - teacher) * weight[..., None, None]).pow(2).mean()
    # Mean over samples and pixels per joint, then the joint's mean squared weight, then over joints.
    per_joint_mse = (simulated - teacher).pow(2).mean(dim=(0, 2, 3))
    return (weight.pow(2).mean(dim=0) * per_joint_mse).mean()


def loss_cs(
    score: torch.Tensor, coords: torch.Tensor, teacher_heatmaps: torch.Tensor, target_weight: torch.Tensor
) -> torch.Tensor:
    """L_CS: L1 between the raw score and the teacher heatmap at the predicted cell, mean over N*K.

    The target carries no gradient (nearest cell, teacher constant); see ``sample_heatmaps``.
    """
    target = sample_heatmaps(teacher_heatmaps, coords).to(score.dtype)
    if score.shape != target.shape:
        raise ValueError(f"score must be (N, K) = {tuple(target.shape)}, got {tuple(score.shape)}")
    weight = _joint_weights(target_weight).to(score.dtype)
    return F.l1_loss(score * weight, target * weight)


class DistillLoss(nn.Module):
    """L = L_reg + a_kt L_KT + a_vt L_VT + a_sh L_SH + a_cs L_CS (defaults: the paper config).

    An alpha of 0 switches its term off: the term is not computed, not reported and its
    teacher field is neither needed nor read.
    """

    def __init__(
        self,
        alpha_kt: float = 5e-4,
        alpha_vt: float = 5e-4,
        alpha_sh: float = 1.0,
        alpha_cs: float = 0.01,
        sh_weighting: ShWeighting = "per-sample",
    ) -> None:
        super().__init__()
        if sh_weighting not in SH_WEIGHTINGS:
            raise ValueError(f"sh_weighting must be one of {SH_WEIGHTINGS}, got {sh_weighting!r}")
        alphas = {"kt": alpha_kt, "vt": alpha_vt, "sh": alpha_sh, "cs": alpha_cs}
        negative = {name: alpha for name, alpha in alphas.items() if alpha < 0}
        if negative:
            raise ValueError(f"loss weights must be >= 0, got {negative}")
        self.alphas = alphas
        self.sh_weighting = sh_weighting

    @property
    def enabled_terms(self) -> tuple[str, ...]:
        return tuple(name for name, alpha in self.alphas.items() if alpha > 0)

    @property
    def needed_teacher_fields(self) -> tuple[str, ...]:
        """Teacher fields the enabled terms read, without repeats, e.g. ("kpt_tokens", "heatmaps")."""
        return tuple(dict.fromkeys(TEACHER_FIELD_OF_TERM[name] for name in self.enabled_terms))

    def _teacher_field(self, teacher: Mapping[str, torch.Tensor] | Any, term: str) -> torch.Tensor:
        field = TEACHER_FIELD_OF_TERM[term]
        # A cache batch is a dict; an online teacher's output object (TeacherOutput) works too.
        if isinstance(teacher, Mapping):
            value, available = teacher.get(field), sorted(teacher)
        else:
            value, available = getattr(teacher, field, None), sorted(vars(teacher))
        if value is None:
            raise ValueError(
                f"loss term '{term}' (alpha_{term}={self.alphas[term]}) needs teacher field '{field}', "
                f"but the teacher only has {available}; provide it or set alpha_{term}=0"
            )
        return value

    def _unweighted_term(
        self, term: str, student: Any, target_weight: torch.Tensor, teacher: Mapping[str, torch.Tensor] | Any
    ) -> torch.Tensor:
        teacher_value = self._teacher_field(teacher, term)
        # A label-side flipped sample has no token target (distilpose.label_flip).
        token_weight = teacher.get(TOKEN_WEIGHT) if isinstance(teacher, Mapping) else None
        if term == "kt":
            return loss_kt(student.kpt_tokens, teacher_value, token_weight)
        if term == "vt":
            return loss_vt(student.vis_tokens, teacher_value, token_weight)
        if term == "sh":
            return loss_sh(student.coords, student.sigma, teacher_value, target_weight, self.sh_weighting)
        return loss_cs(student.score, student.coords, teacher_value, target_weight)

    def forward(
        self,
        student: Any,
        target: torch.Tensor,
        target_weight: torch.Tensor,
        teacher: Mapping[str, torch.Tensor] | Any,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Returns (total, {"reg": ..., "kt": ..., ...}) with every term already weighted.

        ``teacher`` is a dict with any of heatmaps / kpt_tokens / vis_tokens (extra keys are
        ignored) or an object with those attributes; only the enabled terms' fields are read.
        """
        terms = {"reg": loss_reg(student.coords, target, target_weight)}
        for term in self.enabled_terms:
            terms[term] = self.alphas[term] * self._unweighted_term(term, student, target_weight, teacher)
        total = torch.stack(list(terms.values())).sum()
        return total, terms

    def extra_repr(self) -> str:
        alphas = ", ".join(f"alpha_{name}={alpha}" for name, alpha in self.alphas.items())
        return f"{alphas}, sh_weighting={self.sh_weighting!r}"
