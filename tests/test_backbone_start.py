"""pipeline.backbone_start: DistilPose-L students start from the cache's teacher by default."""

import hashlib

import pytest
import torch

from distilpose.models import build_model
from distilpose.models.checkpoints import save_checkpoint
from pipeline import storage
from pipeline.backbone_start import FROM_SCRATCH, apply_backbone_start, resolve_backbone_start, starts_from_teacher
from pipeline.cache import open_reader
from pipeline.cache.manifest import TeacherInfo

L_STUDENT, S_STUDENT, TEACHER = "distilpose-l-tiny", "distilpose-tiny", "tokenpose-tiny"


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory) -> tuple[str, str]:
    """A saved tokenpose-tiny teacher: (path, sha256)."""
    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("teacher") / "teacher.pt")
    save_checkpoint(path, build_model(TEACHER))
    return path, hashlib.sha256(open(path, "rb").read()).hexdigest()


def _cache_teacher(path: str = "", sha256: str = "random-init") -> TeacherInfo:
    return TeacherInfo(preset=TEACHER, checkpoint_sha256=sha256, checkpoint=path)


def _assert_backbone_is_teachers(student, teacher_path: str) -> None:
    teacher = torch.load(teacher_path, map_location="cpu", weights_only=False)["state_dict"]
    for name, tensor in student.backbone.state_dict().items():
        torch.testing.assert_close(tensor, teacher[f"backbone.{name}"], msg=name)


def test_the_l_family_starts_from_the_teacher_and_the_s_family_from_scratch():
    assert starts_from_teacher("distilpose-l") and starts_from_teacher(L_STUDENT)
    assert not starts_from_teacher("distilpose-s") and not starts_from_teacher(S_STUDENT)


def test_l_student_defaults_to_the_cache_teacher(teacher_ckpt):
    path, sha256 = teacher_ckpt
    choice = resolve_backbone_start(L_STUDENT, None, _cache_teacher(path, sha256))
    assert choice.checkpoint == path and not choice.warning
    student = build_model(L_STUDENT)
    line = apply_backbone_start(student, choice)
    num_tensors = len(student.backbone.state_dict())
    assert line.startswith(f"backbone: {num_tensors} tensors from teacher {path} (sha256 {sha256[:12]}")
    _assert_backbone_is_teachers(student, path)


def test_opt_out_explicit_checkpoint_and_s_students(teacher_ckpt, tmp_path):
    path, sha256 = teacher_ckpt
    cache = _cache_teacher(path, sha256)
    scratch = resolve_backbone_start(L_STUDENT, FROM_SCRATCH, cache)
    assert scratch.checkpoint is None and not scratch.warning
    assert apply_backbone_start(build_model(L_STUDENT), scratch) == "backbone: from scratch (--init-backbone none)"
    s_choice = resolve_backbone_start(S_STUDENT, None, cache)
    assert s_choice.checkpoint is None and not s_choice.warning
    # --init-backbone names another checkpoint (relative paths become absolute for Ray workers).
    other = tmp_path / "other.pt"
    other.write_bytes(open(path, "rb").read())
    explicit = resolve_backbone_start(L_STUDENT, str(other), _cache_teacher())
    assert explicit.checkpoint == str(other) and not explicit.expected_sha256 and not explicit.warning


@pytest.mark.parametrize(
    "cache_teacher, reason",
    [(_cache_teacher(), "without a teacher checkpoint"), (_cache_teacher("", "ab" * 32), "does not record")],
)
def test_a_cache_without_teacher_checkpoint_warns_loudly(cache_teacher, reason):
    choice = resolve_backbone_start(L_STUDENT, None, cache_teacher)
    assert choice.checkpoint is None
    assert choice.warning.startswith("WARNING") and reason in choice.warning and "departs" in choice.warning
    assert reason in apply_backbone_start(build_model(L_STUDENT), choice)


def test_a_changed_teacher_checkpoint_is_refused(teacher_ckpt):
    path, _ = teacher_ckpt
    choice = resolve_backbone_start(L_STUDENT, None, _cache_teacher(path, "cd" * 32))
    with pytest.raises(ValueError, match="changed since the cache was built"):
        apply_backbone_start(build_model(L_STUDENT), choice)


def test_s3_teacher_checkpoint(teacher_ckpt, s3_bucket):
    path, sha256 = teacher_ckpt
    uri = f"{s3_bucket}/teachers/teacher.pt"
    storage.atomic_write_bytes(uri, open(path, "rb").read())
    student = build_model(L_STUDENT)
    line = apply_backbone_start(student, resolve_backbone_start(L_STUDENT, None, _cache_teacher(uri, sha256)))
    assert f"from teacher {uri} (sha256 {sha256[:12]}" in line
    _assert_backbone_is_teachers(student, path)


def test_the_cache_job_records_its_teacher_checkpoint(tiny_cache, tiny_teacher):
    teacher = open_reader(tiny_cache).manifest.teacher
    assert teacher.checkpoint == tiny_teacher
    choice = resolve_backbone_start(L_STUDENT, None, teacher)
    assert apply_backbone_start(build_model(L_STUDENT), choice).startswith("backbone: ")
