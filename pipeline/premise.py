"""What the premise study measured, for the planner: how many cached views V a student
needs to match distillation with the teacher online.

The study (`bench/study_premise.py`, README "Cached vs online teacher") distils one student
with one schedule from a single V=16 cache read with `--cache-views` 1..16, and with the
teacher in the loop on a fresh augmentation per instance per epoch (the official way).
The figures below are its results (val AP, GT boxes); rerun the study and update them
together with the README table.
"""

from __future__ import annotations

from dataclasses import dataclass, field

WITHIN_AP = 0.01  # "as good as the online teacher": within 1 AP point


@dataclass(frozen=True)
class PremiseStudy:
    student: str
    epochs: int
    seeds: tuple[int, ...]
    online_fresh_ap: float
    cache_ap: dict[int, float] = field(default_factory=dict)  # views -> mean val AP
    where: str = ""

    def smallest_views_within(self, within: float = WITHIN_AP) -> int | None:
        good = [v for v, ap in self.cache_ap.items() if ap >= self.online_fresh_ap - within]
        return min(good) if good else None


# Measured 2026-11-29 on the 2-core CPU machine (synthetic data, the demo's teacher: val AP
# 0.351; distilpose-l-tiny from the teacher's backbone, 12 epochs x 81 steps, seed 0 only).
STUDY = PremiseStudy(
    student="distilpose-l-tiny",
    epochs=12,
    seeds=(0,),
    online_fresh_ap=0.081,
    cache_ap={1: 0.184, 2: 0.124, 4: 0.103, 8: 0.116, 16: 0.089},
    where="synthetic data, 12-epoch schedule, 1 seed",
)


def views_advice(views: int, epochs: int, study: PremiseStudy = STUDY) -> str:
    """One planner line: the study's smallest V within 1 AP of the fresh-view online teacher,
    and what the study does not cover (a schedule much longer than the study's)."""
    best = study.smallest_views_within()
    if best is None:
        return f"no V was within {WITHIN_AP * 100:.0f} AP of the online teacher in the study ({study.where})"
    line = (
        f"the study ({study.where}): V={best} already within {WITHIN_AP * 100:.0f} AP of the online teacher "
        f"with fresh augmentation ({study.cache_ap[best]:.3f} vs {study.online_fresh_ap:.3f})"
    )
    if best == 1:
        line += " (V=1 is the un-augmented crop alone: the short schedule did not need augmentation)"
    if epochs > 2 * study.epochs:
        # Each view is replayed epochs/V times; the study never replayed one more than 12 times.
        line += (
            f"; {epochs} epochs replay each view {epochs / views:.0f} times, beyond what it measured: "
            "build V=16 once and compare --cache-views 4/8/16 on a short run"
        )
    return line
