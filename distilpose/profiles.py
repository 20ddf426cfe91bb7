"""Profiles: the official DistilPose code's quirks or the behaviour they were meant to have.

The official code (mmpose 0.x) has two quirks that change results. The default profile,
"official", reproduces them, so the default recipe and evaluation are comparable with the
paper's tables; profile "intended" gives the behaviour they were meant to have:

- L_SH weighting: "official" multiplies each joint's batch-wide MSE by the fraction of samples
  where the joint is valid (a broadcasting slip in the official loss); "per-sample" weights
  sample i, joint k by its own weight (distilpose.losses.loss_sh).
- Student flip test: "official" mirrors normalized x as 1 - x (one input pixel off) and does not
  swap the joint scores with their joints; "exact" mirrors in pixel space and swaps both
  (distilpose.coco_metrics.flip_back).

Both profiles share what the official code does right, so there is nothing to switch:
teacher heatmaps are decoded with mmpose's DARK (distilpose.heatmaps.decode_heatmaps),
OKS-NMS uses mmpose's crop-box areas (distilpose.coco_metrics.crop_box_areas), student convs
start from N(0, 0.001), and DistilPose-L students start from the teacher's HRNet stages 1-3
(pipeline.backbone_start).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Profile:
    name: str
    # Plain strings so that job parsers can import this without torch.
    sh_weighting: str  # distillation: DistillLoss(sh_weighting=...)
    flip_mode: str  # students' flip test: predict(flip_mode=...), evaluate_model(flip_mode=...)

    def describe(self) -> str:
        return f"profile {self.name}: L_SH weighting {self.sh_weighting}, flip test {self.flip_mode}"


PROFILES: dict[str, Profile] = {
    "intended": Profile("intended", sh_weighting="per-sample", flip_mode="exact"),
    "official": Profile("official", sh_weighting="official", flip_mode="official"),
}
DEFAULT_PROFILE = "official"


def get_profile(name: str) -> Profile:
    """The profile called `name`; a ValueError naming the known ones otherwise."""
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown profile {name!r}; known profiles: {', '.join(PROFILES)}") from None
