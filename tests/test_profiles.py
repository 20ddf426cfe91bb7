"""distilpose.profiles: one switch between the official quirks and the intended behaviour."""

import pytest

from distilpose.coco_metrics import flip_back
from distilpose.losses import SH_WEIGHTINGS, DistillLoss
from distilpose.profiles import DEFAULT_PROFILE, PROFILES, get_profile


def test_profiles_set_every_switch_to_a_value_its_consumer_accepts():
    assert DEFAULT_PROFILE == "official"  # the default recipe and evaluation are the official ones
    official, intended = get_profile("official"), get_profile("intended")
    assert (official.sh_weighting, official.flip_mode) == ("official", "official")
    assert (intended.sh_weighting, intended.flip_mode) == ("per-sample", "exact")
    for profile in PROFILES.values():
        assert profile.sh_weighting in SH_WEIGHTINGS
        DistillLoss(sh_weighting=profile.sh_weighting)
        flip_back([[[0.5, 0.5]]], [[1.0]], [], mode=profile.flip_mode, input_width=192)
    assert official.describe() == "profile official: L_SH weighting official, flip test official"


def test_unknown_profile_names_the_known_ones():
    with pytest.raises(ValueError, match="unknown profile 'paper'; known profiles: intended, official"):
        get_profile("paper")
