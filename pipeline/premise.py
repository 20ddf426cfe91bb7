"""What the premise study measured, for the planner: how many cached views V a student
needs to match distillation with the teacher online.

The study (`bench/study_premise.py`, README "Cached vs online teacher") distils a student
with one schedule from a single V=16 cache read with `--cache-views` 1..16, and with the
teacher in the loop on a fresh augmentation per instance per epoch (the official way). It
writes its summary to `docs/<study>.json`; the planner reads those files, so a rerun of the
study updates the advice with no figure copied by hand.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

WITHIN_AP = 0.01  # "as good as the online teacher": within 1 AP point
DOCS = Path(__file__).resolve().parents[1] / "docs"

# Which study speaks for which student: the backbone family decides how much a student
# needs augmentation (a student initialised from the teacher's backbone vs one from scratch).
STUDY_FOR_STUDENT = {
    "distilpose-l": "premise-l-tiny",  # HRNet stages 1-3, initialised from the teacher's backbone
    "distilpose-s": "premise-tiny",  # stemnet from scratch
    "distilpose-tiny": "premise-tiny",
}


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

    def to_json(self) -> dict:
        return {**self.__dict__, "seeds": list(self.seeds), "cache_ap": {str(v): ap for v, ap in self.cache_ap.items()}}

    @classmethod
    def from_json(cls, data: dict) -> PremiseStudy:
        return cls(
            student=data["student"],
            epochs=int(data["epochs"]),
            seeds=tuple(data["seeds"]),
            online_fresh_ap=float(data["online_fresh_ap"]),
            cache_ap={int(v): float(ap) for v, ap in data["cache_ap"].items()},
            where=data.get("where", ""),
        )


def load_study(name: str, docs: Path = DOCS) -> PremiseStudy | None:
    """The study's summary as `bench/study_premise.py` wrote it; None if it was never run."""
    path = docs / f"{name}.json"
    return PremiseStudy.from_json(json.loads(path.read_text())) if path.exists() else None


def study_for(student: str, docs: Path = DOCS) -> PremiseStudy | None:
    """The study of ``student``'s preset family (the longest matching prefix); if that one was
    never run, any study there is."""
    families = [f for f in STUDY_FOR_STUDENT if student.startswith(f)]
    own = STUDY_FOR_STUDENT[max(families, key=len)] if families else None
    for name in sorted(set(STUDY_FOR_STUDENT.values()), key=lambda n: n != own):
        study = load_study(name, docs)
        if study is not None:
            return study
    return None


def views_advice(views: int, epochs: int, study: PremiseStudy | None) -> str:
    """One planner line: the study's smallest V within 1 AP of the fresh-view online teacher,
    and what the study does not cover (a schedule much longer than the study's)."""
    if study is None:
        return "no premise study found (docs/premise-*.json): run bench/study_premise.py"
    best = study.smallest_views_within()
    if best is None:
        return f"no V was within {WITHIN_AP * 100:.0f} AP of the online teacher in the study ({study.where})"
    line = (
        f"the study ({study.where}): V={best} already within {WITHIN_AP * 100:.0f} AP of the online teacher "
        f"with fresh augmentation ({study.cache_ap[best]:.3f} vs {study.online_fresh_ap:.3f})"
    )
    if best == 1:
        line += " (V=1 is the un-augmented crop alone: that schedule did not need augmentation)"
    if epochs > 2 * study.epochs:
        # Each view is replayed epochs/V times; the study never replayed one more than its epochs.
        line += (
            f"; {epochs} epochs replay each view {epochs / views:.0f} times, beyond what it measured: "
            "build V=16 once and compare --cache-views 4/8/16 on a short run"
        )
    return line
