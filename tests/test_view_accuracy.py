"""The teacher check of the premise studies: PCK on the cached views, view 0 vs augmented."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from distilpose.data.coco import load_instances, read_image
from distilpose.data.layout import split_files
from distilpose.data.synthetic import make_synthetic_coco
from distilpose.data.transforms import apply_view
from distilpose.data.views import view_for
from distilpose.heatmaps import render_gaussian_heatmaps
from distilpose.view_accuracy import teacher_view_accuracy

INPUT, HEATMAP = (128, 96), (32, 24)
VIEWS, SEED = 5, 3


class ReplayTeacher(nn.Module):
    """A heatmap 'teacher' that answers the crops in the order the check asks for them with
    Gaussians at the true joints (shifted by `offset_px` heatmap px on augmented views)."""

    def __init__(self, answers: list[np.ndarray]):
        super().__init__()
        self.config = SimpleNamespace(input_size=INPUT)
        self.anchor = nn.Parameter(torch.zeros(1))
        self.answers = answers

    def forward(self, x: torch.Tensor):
        joints = torch.from_numpy(np.stack(self.answers[: len(x)])).float()
        del self.answers[: len(x)]
        return SimpleNamespace(heatmaps=render_gaussian_heatmaps(joints, HEATMAP))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("view-acc")
    make_synthetic_coco(root, num_train=6, num_val=1, seed=0, image_size=(160, 160))
    files = split_files(str(root), "train")
    instances, _ = load_instances(files.ann_file, split_kind="train", input_size=INPUT)
    return instances[:6], files.image_root


def _answers(instances, image_root, offset_px: float) -> list[np.ndarray]:
    """True crop joints in heatmap px per (instance, view), in the check's order."""
    out = []
    for inst in instances:
        image = read_image(image_root, inst.image_file)
        for v in range(VIEWS):
            _, joints = apply_view(image, inst.joints, view_for(inst, v, SEED), INPUT)
            out.append(joints[:, :2] * (HEATMAP[0] / INPUT[0]) + (offset_px if v else 0.0))
    return out


def test_a_teacher_right_on_every_view_scores_one(data) -> None:
    instances, root = data
    acc = teacher_view_accuracy(ReplayTeacher(_answers(instances, root, 0.0)), instances, root, VIEWS, SEED)
    assert acc.view0 == pytest.approx(1.0) and acc.augmented == pytest.approx(1.0) and acc.ratio == pytest.approx(1.0)
    assert acc.joints_view0 > 0 and acc.joints_augmented > acc.joints_view0
    assert "view 0 1.00, augmented views 1..4 1.00" in acc.line()


def test_a_teacher_wrong_on_augmented_views_is_caught(data) -> None:
    """3 heatmap px off on augmented views = 12 crop px, beyond 0.05 x 128 = 6.4 px."""
    instances, root = data
    acc = teacher_view_accuracy(ReplayTeacher(_answers(instances, root, 3.0)), instances, root, VIEWS, SEED)
    assert acc.view0 == pytest.approx(1.0) and acc.augmented == 0.0 and acc.ratio == 0.0


def test_needs_an_augmented_view(data) -> None:
    instances, root = data
    with pytest.raises(ValueError, match="views must be >= 2"):
        teacher_view_accuracy(ReplayTeacher([]), instances, root, views=1)
