"""The backbone's convolution init scheme (`conv_init`): mmpose's N(0, 0.001) or He init.

Not to be confused with where a student's backbone *starts* (`init_backbone`: a teacher
checkpoint or from scratch, pipeline/backbone_start.py): the conv init is drawn first, and a
checkpoint loaded afterwards overwrites the tensors it covers.
"""

from __future__ import annotations

from torch import nn

CONV_INITS = ("official", "kaiming")


def apply_conv_init(model: nn.Module, scheme: str) -> None:
    """Re-draw the backbone's conv weights for `scheme` ("official" leaves them as built).

    Why "kaiming" exists: every backbone conv is followed by BatchNorm, so a conv's output
    does not depend on its weights' scale and its effective learning rate under Adam is
    lr / |w|. With the official N(0, 0.001) init an lr-1e-3 Adam step is as large as the
    weights themselves, and the first ~1000 iterations are spent growing them: harmless over
    300 epochs, but most of a minutes-long CPU run. He-normal weights (torchvision's ResNet
    init) start at a scale where a step is a ~1 % change.
    """
    if scheme not in CONV_INITS:
        raise ValueError(f"conv init {scheme!r} is not one of {', '.join(map(repr, CONV_INITS))}")
    if scheme == "official":
        return
    for module in model.backbone.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
