"""What the premise studies measured, for the planner: how many cached views a student
needs to match distillation with the teacher online.

Two studies, two regimes:

- the short-schedule study (`bench/study_premise.py`) distils a student with one short
  schedule from a V=16 cache read with `--cache-views` 1..16, and with the teacher in the
  loop on a fresh augmentation per instance per epoch (the official way); it speaks for
  schedules like its own only;
- the replay study (`bench/study_replay.py`) runs a fixed step count on training subsets small
  enough that each cached view is replayed as often as a long recipe replays it (300 epochs
  at K = 8 views: 37 times), and measures each K's AP minus the online run's, paired by seed,
  against replays per view; it speaks for long schedules.

Each writes its summary to `pipeline/studies/<study>.json` (package data: the planner ships
with what it reads, in the Docker image too) and its human-facing page, table and plot under
docs/; the planner reads the JSON, so a rerun of a study updates the advice with no figure
copied by hand.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

WITHIN_AP = 0.01  # "as good as the online teacher": within 1 AP point
STUDIES = Path(__file__).resolve().parent / "studies"  # what the studies write for the planner

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


# A measured replay count speaks for a schedule's epochs / K within this factor (31 measured
# replays speak for 300 epochs at K = 8, 37.5); farther than that is extrapolation.
REPLAY_MATCH = 1.5
REPLAY_STUDY = "premise-replay"


@dataclass(frozen=True)
class ReplayPoint:
    """One cached arm of the replay study: K augmented views replayed epochs / K times, and
    its AP minus the online-fresh run's, paired by seed (AP units, 0.01 = 1 point)."""

    views: int
    instances: int
    epochs: int
    diff_mean: float
    diff_std: float
    diff_min: float
    diff_max: float
    seeds: int
    remedy: str = ""  # "" for a plain cached arm; else the option that changed it, e.g. "--label-flip"

    @property
    def replays(self) -> float:
        return self.epochs / self.views


@dataclass(frozen=True)
class ReplayStudy:
    """What `bench/study_replay.py` measured (pipeline/studies/premise-replay.json)."""

    student: str
    steps: int
    points: tuple[ReplayPoint, ...]
    where: str = ""

    def measured(self, views: int, replays: float, remedy: str = "") -> ReplayPoint | None:
        """The measured point of K = `views` (with `remedy`) nearest to `replays` (within
        REPLAY_MATCH), if any."""

        def distance(p: ReplayPoint) -> float:
            return abs(math.log(p.replays / replays))

        near = [
            p for p in self.points if p.views == views and p.remedy == remedy and distance(p) <= math.log(REPLAY_MATCH)
        ]
        return min(near, key=distance, default=None)

    def recommend(
        self, epochs: int, within: float = WITHIN_AP, remedy: str = ""
    ) -> tuple[int | None, list[tuple[int, ReplayPoint]]]:
        """The smallest K whose measured paired difference at epochs / K replays is >= -within
        (one-sided: better is fine), and the measured points that decided it; plain cached
        arms, or those with `remedy`."""
        checked = []
        for views in sorted({p.views for p in self.points if p.remedy == remedy}):
            point = self.measured(views, epochs / views, remedy)
            if point is None:
                continue
            checked.append((views, point))
            if point.diff_mean >= -within:
                return views, checked
        return None, checked

    def to_json(self) -> dict:
        return {**self.__dict__, "points": [p.__dict__ for p in self.points]}

    @classmethod
    def from_json(cls, data: dict) -> ReplayStudy:
        return cls(
            student=data["student"],
            steps=int(data["steps"]),
            points=tuple(ReplayPoint(**p) for p in data["points"]),
            where=data.get("where", ""),
        )


def load_replay_study(studies: Path = STUDIES) -> ReplayStudy | None:
    path = studies / f"{REPLAY_STUDY}.json"
    return ReplayStudy.from_json(json.loads(path.read_text())) if path.exists() else None


def load_study(name: str, studies: Path = STUDIES) -> PremiseStudy | None:
    """The study's summary as `bench/study_premise.py` wrote it; None if it was never run."""
    path = studies / f"{name}.json"
    return PremiseStudy.from_json(json.loads(path.read_text())) if path.exists() else None


def study_for(student: str, studies: Path = STUDIES) -> PremiseStudy | None:
    """The study of ``student``'s preset family (the longest matching prefix); if that one was
    never run, any study there is."""
    families = [f for f in STUDY_FOR_STUDENT if student.startswith(f)]
    own = STUDY_FOR_STUDENT[max(families, key=len)] if families else None
    for name in sorted(set(STUDY_FOR_STUDENT.values()), key=lambda n: n != own):
        study = load_study(name, studies)
        if study is not None:
            return study
    return None


def views_advice(views: int, epochs: int, study: PremiseStudy | None) -> str:
    """The short-schedule row: the study's smallest V within 1 AP of the fresh-view online
    teacher (one-sided: a V that does better qualifies), for schedules like the study's only.
    A V that does better on a short schedule is no evidence that fewer views suffice on a long
    one, where each view is replayed epochs / V times: that is the replay study's row."""
    if study is None:
        return "no premise study found (pipeline/studies/premise-*.json): run bench/study_premise.py"
    if epochs > 2 * study.epochs:
        return (
            f"not measured for {epochs} epochs (the short-schedule study ran {study.epochs}; {epochs} epochs replay "
            f"each of V={views} views {epochs / views:.0f} times): see the replay study's row"
        )
    best = study.smallest_views_within()
    if best is None:
        return f"no V was within {WITHIN_AP * 100:.0f} AP of the online teacher in the study ({study.where})"
    line = (
        f"the study ({study.where}): V={best} within {WITHIN_AP * 100:.0f} AP of the online teacher or better "
        f"({study.cache_ap[best]:.3f} vs {study.online_fresh_ap:.3f} with fresh augmentation)"
    )
    if best == 1:
        line += " (V=1 is the un-augmented crop alone: that schedule did not need augmentation)"
    return line


def replay_advice(epochs: int, study: ReplayStudy | None) -> str:
    """The long-schedule row: the smallest K whose measured paired difference to the online
    teacher at epochs / K replays per view is within 1 AP (or better), from the replay study."""
    if study is None:
        return f"no replay study found (pipeline/studies/{REPLAY_STUDY}.json): run bench/study_replay.py"
    best, checked = study.recommend(epochs)
    if not checked:
        return (
            f"the replay study ({study.where}) measured no K near {epochs}/K replays per view: not measured for "
            f"{epochs} epochs"
        )
    if best is None:
        seen = ", ".join(f"K={k} {p.diff_mean * 100:+.1f} AP at {p.replays:.0f} replays" for k, p in checked)
        return (
            f"no measured K ({', '.join(str(k) for k, _ in checked)}) was within {WITHIN_AP * 100:.0f} AP of the "
            f"online teacher at {epochs}/K replays per view ({seen}; {study.where}): the cache falls behind there"
            + remedy_advice(epochs, study)
        )
    point = dict(checked)[best]
    return (
        f"K={best} cached augmented views: {point.diff_mean * 100:+.1f} AP (min {point.diff_min * 100:+.1f}, "
        f"{point.seeds} seeds) vs the online teacher at {point.replays:.0f} replays per view, measured on "
        f"{point.instances} instances x {point.epochs} epochs ({epochs} epochs at K={best}: {epochs / best:.0f}); "
        f"{study.where}"
    )


def token_views_advice(study: ReplayStudy | None) -> str:
    """What the replay study measured for tokens on the first views only (--token-views),
    next to the plain arms at the same and at half the views."""
    measured = [p for p in (study.points if study else ()) if p.remedy.startswith("--token-views")]
    if not measured:
        return "not measured by the replay study (bench/study_replay.py --groups e)"
    parts = []
    for point in measured:
        plain = [study.measured(k, point.epochs / k) for k in (point.views, point.views // 2)]
        others = ", ".join(f"K={p.views} with tokens on every view {p.diff_mean * 100:+.1f}" for p in plain if p)
        parts.append(
            f"K={point.views} with {point.remedy}: {point.diff_mean * 100:+.1f} AP vs the online teacher "
            f"({point.seeds} seeds; {others}; {point.instances} instances x {point.epochs} epochs)"
        )
    advice = "where it is below the plain arms, prefer fewer views with every field"
    return "replay study: " + "; ".join(parts) + f"; {advice}"


def remedy_advice(epochs: int, study: ReplayStudy) -> str:
    """What the measured remedies did at this schedule's replay counts ("" if none measured)."""
    parts = []
    for remedy in sorted({p.remedy for p in study.points if p.remedy}):
        best, checked = study.recommend(epochs, remedy=remedy)
        for views, point in checked:
            verdict = "within 1 AP" if views == best else "behind"
            parts.append(
                f"{remedy} K={views}: {point.diff_mean * 100:+.1f} AP at {point.replays:.0f} replays ({verdict}, "
                f"{point.seeds} seed(s))"
            )
    return "; remedies measured: " + ", ".join(parts) if parts else ""
