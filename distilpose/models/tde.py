"""Token-Distilling Encoder (TDE): backbone features -> keypoint and visual tokens.

The student's TDE and the teacher's TokenPose encoder are the same module with the same
sizes (official `TokenPose_TB_base` / `DistilPose_base` share this code), which is what
makes the student's last-layer tokens comparable one-to-one with the teacher's (L_KT,
L_VT need no projection). Attribute names match the official head: `keypoint_token`,
`pos_embedding`, `patch_to_embedding`, `transformer`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .config import ModelConfig
from .transformer import Transformer, sine_position_table


def patchify(feature: Tensor, patch: tuple[int, int]) -> Tensor:
    """(N, C, H, W) -> (N, P, p1*p2*C), the einops `b c (h p1) (w p2) -> b (h w) (p1 p2 c)`."""
    n, c, h, w = feature.shape
    p1, p2 = patch
    x = feature.reshape(n, c, h // p1, p1, w // p2, p2)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(n, (h // p1) * (w // p2), p1 * p2 * c)


def init_transformer_weights(module: nn.Module) -> None:
    """Official `apply_init=True`: Linear trunc-normal(0.02) / bias 0, LayerNorm 1 / 0."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class TokenDistillingEncoder(nn.Module):
    def __init__(
        self,
        in_channels: int,
        feature_size: tuple[int, int],
        patch_size: tuple[int, int],
        num_keypoints: int,
        dim: int,
        depth: int,
        heads: int,
        mlp_ratio: int,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.feature_size = tuple(feature_size)
        self.patch_size = tuple(patch_size)
        self.num_keypoints = num_keypoints
        grid = (feature_size[0] // patch_size[0], feature_size[1] // patch_size[1])

        self.keypoint_token = nn.Parameter(torch.zeros(1, num_keypoints, dim))
        # Fixed, never trained: a non-persistent buffer keeps it out of parameters() and of
        # our checkpoints (it is recomputed on construction).
        self.register_buffer("pos_embedding", sine_position_table(grid, dim), persistent=False)
        self.patch_to_embedding = nn.Linear(in_channels * patch_size[0] * patch_size[1], dim)
        self.transformer = Transformer(dim, depth, heads, dim * mlp_ratio, num_keypoints, dropout)

        init_transformer_weights(self)
        nn.init.trunc_normal_(self.keypoint_token, std=0.02)

    def forward(self, feature: Tensor) -> tuple[Tensor, Tensor]:
        """(N, C, Hf, Wf) -> keypoint tokens (N, K, D), visual tokens (N, P, D)."""
        if tuple(feature.shape[-2:]) != self.feature_size:
            raise ValueError(
                f"token encoder expects a {self.feature_size} feature map, got {tuple(feature.shape[-2:])}; "
                "the input image size does not match the model config"
            )
        visual = self.patch_to_embedding(patchify(feature, self.patch_size)) + self.pos_embedding
        keypoints = self.keypoint_token.expand(feature.shape[0], -1, -1)
        x = self.transformer(torch.cat((keypoints, visual), dim=1), self.pos_embedding)
        return x[:, : self.num_keypoints], x[:, self.num_keypoints :]


def build_encoder(config: ModelConfig) -> TokenDistillingEncoder:
    return TokenDistillingEncoder(
        in_channels=config.feature_channels,
        feature_size=config.heatmap_size,
        patch_size=config.patch_size,
        num_keypoints=config.num_joints,
        dim=config.dim,
        depth=config.depth,
        heads=config.heads,
        mlp_ratio=config.mlp_ratio,
        dropout=config.dropout,
    )
