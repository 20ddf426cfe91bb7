"""DistilPose / TokenPose models (docs/method.md#teacher and #students): presets, factory and output types."""

from .config import ModelConfig
from .distilpose import DistilPose, StudentOutput
from .presets import PRESETS, build_model, get_config
from .tokenpose import TeacherOutput, TokenPose

__all__ = [
    "PRESETS",
    "DistilPose",
    "ModelConfig",
    "StudentOutput",
    "TeacherOutput",
    "TokenPose",
    "build_model",
    "get_config",
]
