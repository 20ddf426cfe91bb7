"""Where a student's backbone starts. The DistilPose-L recipe starts it from the teacher.

The official DistilPose-L config loads the teacher checkpoint into the student's HRNet
backbone (930 tensors: stages 1-3 of the teacher's HRNet-W48). So a student with an HRNet
backbone (the L family) starts from the teacher checkpoint the cache was built with, as its
manifest records it, unless `init_backbone` names another checkpoint or is "none" (from
scratch, for comparison). StemNet students (the S family) start from scratch, as officially.
(How the convolutions a checkpoint does not cover are drawn is another option, `conv_init`:
distilpose.models.conv_init.)

    choice = resolve_backbone_start(cfg.student, cfg.init_backbone, reader.manifest.teacher)
    if choice.warning: print(choice.warning)            # on the driver, before training
    print(apply_backbone_start(student, choice))        # in the worker, after the conv init
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

from distilpose.errors import UserError
from pipeline import storage

if TYPE_CHECKING:  # job parsers import FROM_SCRATCH without the cache stores
    from pipeline.cache.manifest import TeacherInfo

FROM_SCRATCH = "none"  # init_backbone value that opts out of the teacher init
RANDOM_TEACHER = "random-init"  # checkpoint_sha256 of a cache built without a checkpoint


@dataclass(frozen=True)
class BackboneStart:
    """The resolved choice; `checkpoint` None means the backbone keeps its fresh init."""

    checkpoint: str | None  # teacher checkpoint URI (absolute path or s3://)
    source: str  # why this choice, for the log and the run record
    expected_sha256: str = ""  # the cache's teacher: the file must still be that checkpoint
    warning: str = ""  # set when the run departs from the official recipe


def starts_from_teacher(student: str) -> bool:
    """True for students whose backbone is the teacher's HRNet cut after stage 3 (DistilPose-L)."""
    from distilpose.models import get_config

    config = get_config(student)
    return config.kind == "student" and config.backbone == "hrnet"


def resolve_backbone_start(student: str, init_backbone: str | None, cache_teacher: TeacherInfo) -> BackboneStart:
    """Decide where `student`'s backbone starts.

    init_backbone: None (the recipe), FROM_SCRATCH, or a teacher checkpoint URI.
    cache_teacher: the cache manifest's `teacher` entry.
    """
    if init_backbone == FROM_SCRATCH:
        return BackboneStart(None, f"from scratch (--init-backbone {FROM_SCRATCH})")
    if init_backbone:
        return BackboneStart(storage.absolute(init_backbone), "--init-backbone")
    if not starts_from_teacher(student):
        return BackboneStart(None, f"from scratch (the official recipe for {student})")
    if cache_teacher.checkpoint:
        return BackboneStart(cache_teacher.checkpoint, "the cache's teacher", cache_teacher.checkpoint_sha256)
    why = (
        "the cache was built without a teacher checkpoint (random teacher)"
        if cache_teacher.checkpoint_sha256 == RANDOM_TEACHER
        else "the cache's manifest does not record where its teacher checkpoint is"
    )
    warning = (
        f"WARNING: {student} starts from scratch because {why}. This departs from the DistilPose-L recipe, "
        "which starts the backbone from the teacher's HRNet stages 1-3; pass --init-backbone <teacher "
        f"checkpoint> to follow it, or --init-backbone {FROM_SCRATCH} to silence this warning."
    )
    return BackboneStart(None, f"from scratch ({why})", warning=warning)


def apply_backbone_start(student, choice: BackboneStart) -> str:
    """Load the chosen teacher backbone into `student` (a built model); returns the log line.

    Raises UserError (a ValueError) when the cache's teacher checkpoint changed since the cache
    was built; the driver calls it first (checks.backbone_line), so that is one line, not a
    traceback from every worker.
    """
    if choice.checkpoint is None:
        return f"backbone: {choice.source}"
    from distilpose.models.checkpoints import init_student_backbone_from_teacher

    path = storage.local_copy(choice.checkpoint)
    with open(path, "rb") as f:
        sha256 = hashlib.file_digest(f, "sha256").hexdigest()
    if choice.expected_sha256 and sha256 != choice.expected_sha256:
        raise UserError(
            f"teacher checkpoint {choice.checkpoint} changed since the cache was built "
            f"(sha256 {sha256[:12]} != {choice.expected_sha256[:12]}); pass --init-backbone to choose one"
        )
    report = init_student_backbone_from_teacher(student, path)
    return f"backbone: {report.loaded} tensors from teacher {choice.checkpoint} (sha256 {sha256[:12]}; {choice.source})"
