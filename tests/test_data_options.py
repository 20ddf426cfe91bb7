"""The same data options on every job that reads a split (distilpose.data.layout.DataOptions):
--data, or --ann-file with --images (any layout, e.g. PoseTrack's nested file names); and
every job's --help shows each option's default."""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
from pathlib import Path

import pytest

from distilpose.data.layout import DATA_GROUP, VAL_GROUP, SplitFiles, split_files
from distilpose.data.synthetic import make_synthetic_coco
from distilpose.models import build_model
from distilpose.models.checkpoints import save_checkpoint
from distilpose.options import MISSING
from pipeline.cli import JobParser

ROOT = Path(__file__).resolve().parents[1]
JOBS = sorted(p.stem for p in (ROOT / "jobs").glob("*.py") if not p.stem.startswith("_"))
DATA_JOBS = ("cache_teacher", "distill", "evaluate", "visualize", "train_teacher", "sweep")
VAL_JOBS = ("distill", "train_teacher", "sweep")


class _Parsed(Exception):
    def __init__(self, parser: argparse.ArgumentParser) -> None:
        self.parser = parser


def load_job(name: str, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "jobs"))
    spec = importlib.util.spec_from_file_location(f"job_{name}", ROOT / "jobs" / f"{name}.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    return job


def job_parser(name: str, monkeypatch) -> argparse.ArgumentParser:
    """The parser a job's main() builds (stopped at parse_args, before the job does anything)."""
    job = load_job(name, monkeypatch)

    def stop(self, *args, **kwargs):
        raise _Parsed(self)

    monkeypatch.setattr(JobParser, "parse_args", stop)
    with pytest.raises(_Parsed) as caught:
        job.main([])
    monkeypatch.undo()
    return caught.value.parser


def _shows_nothing(default) -> bool:
    """Defaults with nothing to show: required, absent (None), switches, empty collections."""
    return default in (MISSING, None, argparse.SUPPRESS) or isinstance(default, bool) or default in ([], (), {})


@pytest.mark.parametrize("name", JOBS)
def test_every_option_help_shows_its_default(name, monkeypatch) -> None:
    parser = job_parser(name, monkeypatch)
    missing = []
    for action in parser._actions:
        if not action.option_strings or action.help == argparse.SUPPRESS or action.required:
            continue
        default = getattr(action, "config_default", action.default)
        negatable = isinstance(action, argparse.BooleanOptionalAction)  # --x / --no-x: say which holds
        if (negatable or not _shows_nothing(default)) and "default" not in (action.help or ""):
            missing.append(f"{action.option_strings[0]} (default {default!r})")
    assert not missing, f"jobs/{name}.py --help does not show: {missing}"


@pytest.mark.parametrize("name", DATA_JOBS)
def test_data_jobs_share_one_data_source_group(name, monkeypatch) -> None:
    parser = job_parser(name, monkeypatch)
    groups = {g.title: {a.option_strings[0] for a in g._group_actions} for g in parser._action_groups}
    assert groups.get(DATA_GROUP) == {"--data", "--ann-file", "--images"}
    if name in VAL_JOBS:
        assert groups.get(VAL_GROUP) == {"--val", "--val-ann-file", "--val-images"}
    data = next(a for a in parser._actions if a.option_strings == ["--data"])
    assert not data.required  # both overrides stand in for it


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dataopts") / "synth"
    make_synthetic_coco(root, 4, 4, seed=3, image_size=(160, 160))
    return root


def posetrack_layout(synth: Path, out: Path) -> tuple[Path, Path]:
    """The synthetic val split re-laid out as PoseTrack does: file names nested per video
    (images/val/<video>/<frame>.jpg) relative to a root, the annotation file elsewhere."""
    files = split_files(str(synth), "val")
    doc = json.loads(Path(files.ann_file).read_text())
    for i, image in enumerate(doc["images"]):
        nested = f"images/val/{i // 2:06d}_mpii_test/{i % 2:06d}.jpg"
        (out / nested).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(Path(files.image_root) / image["file_name"], out / nested)
        image["file_name"] = nested
    ann = out / "annotations" / "val" / "posetrack_val.json"
    ann.parent.mkdir(parents=True)
    ann.write_text(json.dumps(doc))
    return ann, out


def test_evaluate_reads_a_posetrack_layout_through_the_overrides(synth, tmp_path, monkeypatch, capsys) -> None:
    ann, images = posetrack_layout(synth, tmp_path / "posetrack")
    ckpt = tmp_path / "teacher.pt"
    save_checkpoint(ckpt, build_model("tokenpose-tiny"))
    job = load_job("evaluate", monkeypatch)
    common = ["--model", "tokenpose-tiny", "--checkpoint", str(ckpt), "--no-flip-test", "--threads", "1"]
    assert job.main(["--data", str(synth), *common, "--results-json", str(tmp_path / "coco.json")]) == 0
    nested = ["--ann-file", str(ann), "--images", str(images), *common, "--results-json", str(tmp_path / "pt.json")]
    assert job.main(nested) == 0
    capsys.readouterr()
    by_layout = [json.loads((tmp_path / name).read_text()) for name in ("coco.json", "pt.json")]
    assert by_layout[0] and [r["keypoints"] for r in by_layout[0]] == [r["keypoints"] for r in by_layout[1]]


def test_data_is_required_unless_both_overrides_are_given(synth, tmp_path, monkeypatch, capsys) -> None:
    job = load_job("evaluate", monkeypatch)
    with pytest.raises(SystemExit) as exited:
        job.main(["--ann-file", "a.json", "--model", "m", "--checkpoint", "c"])
    assert exited.value.code == 2 and "give --data, or both --ann-file and --images" in capsys.readouterr().err

    cache = load_job("cache_teacher", monkeypatch)
    files = split_files(str(synth), "train")
    args = cache.parse_args(
        ["--ann-file", files.ann_file, "--images", files.image_root, "--teacher", "t", "--out", "o"]
    )
    assert args.config.data is None and args.config.split_files("train") == files
    with pytest.raises(SystemExit):
        cache.parse_args(["--images", files.image_root, "--teacher", "t", "--out", "o"])
    assert "missing --data (or both --ann-file and --images)" in capsys.readouterr().err


def test_teacher_training_takes_both_splits_from_overrides(synth) -> None:
    from distilpose.teacher_training import TeacherTrainConfig

    train, val = split_files(str(synth), "train"), split_files(str(synth), "val")
    only_train = {"ann_file": train.ann_file, "images": train.image_root}
    with pytest.raises(ValueError, match="no val split to evaluate on"):
        TeacherTrainConfig(**only_train)
    cfg = TeacherTrainConfig(**only_train, val_ann_file=val.ann_file, val_images=val.image_root)
    assert cfg.split_files("train") == train and cfg.val_files() == val
    assert TeacherTrainConfig(**only_train, evaluate=False).split_files("train") == train


def test_distill_reads_the_cached_split_from_the_recorded_files_or_the_overrides(synth, tmp_path) -> None:
    from types import SimpleNamespace

    from pipeline.distill.config import DistillConfig, cached_split_files, val_split_files

    recorded = SimpleNamespace(split="train", ann_file="/rec/ann.json", image_root="/rec/images")
    assert cached_split_files(DistillConfig(cache="c"), recorded) == SplitFiles("/rec/ann.json", "/rec/images")
    moved = cached_split_files(DistillConfig(cache="c", images=str(tmp_path)), recorded)
    assert (moved.ann_file, moved.image_root) == ("/rec/ann.json", str(tmp_path))
    assert cached_split_files(DistillConfig(cache="c", data=str(synth)), recorded) == split_files(str(synth), "train")
    val = split_files(str(synth), "val")
    assert val_split_files(DistillConfig(cache="c", val_ann_file=val.ann_file, val_images=val.image_root)) == val
