"""Seeded views: which crop of an instance is view v.

View 0 is the un-augmented crop (what evaluation sees); views 1..V-1 are drawn with the
training augmentation from a generator seeded by (seed, instance id, view), so any
machine can redraw exactly the view that the teacher cache stored.
"""

from __future__ import annotations

import numpy as np

from distilpose.data.transforms import AugmentConfig, ViewParams, draw_view, identity_view


def view_for(instance, view: int, seed: int, aug: AugmentConfig | None = None) -> ViewParams:
    if view == 0:
        return identity_view(instance)
    rng = np.random.default_rng([seed, int(instance.instance_id), view])
    return draw_view(instance, rng, aug or AugmentConfig())
