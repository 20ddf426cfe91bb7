"""Seeded views: which crop of an instance a view is, for the cache and for fresh views.

One function draws every augmented view, `seeded_view`, from a generator seeded by a key of
integers, so any machine redraws exactly the same view:

- cached view v (`view_for`): view 0 is the un-augmented crop (what evaluation sees); views
  1..V-1 are keyed by (seed, instance id, view), so the student's loader rebuilds exactly the
  crop the teacher cache stored;
- fresh view of an epoch (`fresh_view`, the online teacher's data flow): keyed by
  (FRESH_VIEW_TAG, seed, epoch, instance id), a function of those only (not of the rank, the
  world size or the order), so a resumed run redraws the same crops. The tag keeps these
  keys apart from the cached views' (a cached key never starts with it).
"""

from __future__ import annotations

import numpy as np

from distilpose.data.transforms import AugmentConfig, ViewParams, draw_view, identity_view

FRESH_VIEW_TAG = 0x66726573  # "fres": a seed word the cached views' seeds never start with


def seeded_view(
    instance, key: tuple[int, ...], aug: AugmentConfig | None = None, input_size: tuple[int, int] = (256, 192)
) -> ViewParams:
    """The augmented view of `instance` drawn from a generator seeded by `key`."""
    rng = np.random.default_rng(list(key))
    return draw_view(instance, rng, aug or AugmentConfig(), input_size)


def view_for(instance, view: int, seed: int, aug: AugmentConfig | None = None) -> ViewParams:
    """Cached view `view` of `instance` (0: un-augmented)."""
    if view == 0:
        return identity_view(instance)
    return seeded_view(instance, (seed, int(instance.instance_id), view), aug)


def fresh_view(
    instance, seed: int, epoch: int, input_size: tuple[int, int], aug: AugmentConfig | None = None
) -> ViewParams:
    """The fresh crop of `instance` in `epoch`: a function of (seed, epoch, instance id) only."""
    return seeded_view(instance, (FRESH_VIEW_TAG, seed, epoch, int(instance.instance_id)), aug, input_size)
