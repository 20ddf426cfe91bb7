"""User mistakes end with one stderr line and exit code 2, before Ray starts (the jobs run
as subprocesses with RAY_ADDRESS pointing nowhere: joining Ray would fail differently)."""

from __future__ import annotations

import os
import subprocess

import pytest
from pipeline_fixtures import PYTHON, ROOT, TEACHER

from pipeline.cli import run_job

NO_RAY = "127.0.0.1:9"  # nothing listens there: a job that tried to start or join Ray would fail on it
JOB_TIMEOUT_S = 120


def _jobs(*calls: tuple[str, ...]) -> list[subprocess.CompletedProcess]:
    """Run jobs/<script> with its arguments for each call, side by side (each spends its few
    seconds importing torch: on 2 cores two at a time halve a test's wall time)."""
    env = {**os.environ, "RAY_ADDRESS": NO_RAY}
    procs = [
        subprocess.Popen(
            [PYTHON, str(ROOT / "jobs" / script), *args],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for script, *args in calls
    ]
    results = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=JOB_TIMEOUT_S)
            results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return results


def _assert_user_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture(scope="module")
def student_checkpoint(tmp_path_factory) -> str:
    from distilpose.models import build_model
    from distilpose.models.checkpoints import save_checkpoint

    path = str(tmp_path_factory.mktemp("student") / "student.pt")
    save_checkpoint(path, build_model("distilpose-tiny"))
    return path


def test_missing_cache_says_it_does_not_exist(tmp_path) -> None:
    missing = str(tmp_path / "no-cache")
    distill, sweep, verbose = _jobs(
        ("distill.py", "--cache", missing),
        ("sweep.py", "--cache", missing, "--space", "sweeps/ablation.yaml"),
        ("distill.py", "--cache", missing, "--verbose"),
    )
    _assert_user_error(distill, f"cache {missing} does not exist")
    _assert_user_error(sweep, "does not exist")
    assert verbose.returncode == 2 and "Traceback" in verbose.stderr and "does not exist" in verbose.stderr


def test_bad_data_folder_json_and_checkpoint_are_one_line(tiny_data, student_checkpoint, tmp_path) -> None:
    base = ["--teacher", TEACHER, "--out", str(tmp_path / "cache")]
    not_json = tmp_path / "notes.json"
    not_json.write_text("these are not annotations")
    no_split, bad_json, other_preset, bad_views = _jobs(
        ("cache_teacher.py", "--data", str(tmp_path), *base),
        ("cache_teacher.py", "--data", tiny_data, "--ann-file", str(not_json), *base),
        ("cache_teacher.py", "--data", tiny_data, "--checkpoint", student_checkpoint, *base),
        ("cache_teacher.py", "--data", tiny_data, *base, "--views", "two"),
    )
    _assert_user_error(no_split, "no 'train' split under")
    _assert_user_error(bad_json, "not valid JSON")
    _assert_user_error(other_preset, "distilpose-tiny", TEACHER)
    _assert_user_error(bad_views, "--views")
    assert not (tmp_path / "cache").exists()


def test_student_that_does_not_fit_the_cache_is_one_line(tiny_cache, tmp_path) -> None:
    args = ["--cache", tiny_cache, "--student", "distilpose-s", "--storage", str(tmp_path)]
    unfit, typo = _jobs(("distill.py", *args), ("distill.py", "--cache", tiny_cache, "--sh-weighting", "offical"))
    _assert_user_error(unfit, "does not fit the teacher cache", "pick a student preset")
    _assert_user_error(typo, "--sh-weighting")


def test_counts_out_of_range_are_one_line(tiny_data, tiny_cache, tmp_path) -> None:
    cache = ["--data", tiny_data, "--teacher", TEACHER, "--out", str(tmp_path / "cache")]
    demo, epochs, teacher, workers, views, limit = _jobs(
        ("demo.py", "--quick", "--out", str(tmp_path / "demo"), "--teacher-threads", "0"),
        ("demo.py", "--quick", "--out", str(tmp_path / "demo"), "--student-epochs", "0"),
        ("train_teacher.py", "--data", tiny_data, "--out", str(tmp_path / "teacher"), "--workers-dataloader", "-1"),
        ("distill.py", "--cache", tiny_cache, "--storage", str(tmp_path / "runs"), "--workers", "0"),
        ("cache_teacher.py", *cache, "--views", "0"),
        ("cache_teacher.py", *cache, "--limit", "0"),
    )
    _assert_user_error(demo, "--teacher-threads must be >= 1")
    _assert_user_error(epochs, "--student-epochs must be >= 1, got 0")
    _assert_user_error(teacher, "--workers-dataloader must be >= 0, got -1")
    _assert_user_error(workers, "--workers must be >= 1, got 0")
    _assert_user_error(views, "--views must be >= 1, got 0")
    _assert_user_error(limit, "--limit must be >= 1, got 0")
    assert not any((tmp_path / name).exists() for name in ("demo", "teacher", "runs", "cache"))


def test_real_bugs_keep_their_traceback() -> None:
    def buggy() -> int:
        raise KeyError("a bug")

    with pytest.raises(KeyError):
        run_job(buggy, argv=[])
    assert run_job(lambda: 0, argv=[]) == 0


def test_ray_init_log_level_line_is_dropped_other_stderr_kept() -> None:
    # fd-level writes, as Ray's C++ core worker makes them, from inside and after the block.
    code = (
        "import os\n"
        "from pipeline.ray_env import RAY_LOG_LEVEL_LINE, stderr_without\n"
        "with stderr_without(RAY_LOG_LEVEL_LINE):\n"
        "    os.write(2, b'[I] logging.cc:303: Set ray log level from environment variable X to 3\\n')\n"
        "    os.write(2, b'kept inside\\n')\n"
        "os.write(2, b'kept after\\n')\n"
    )
    result = subprocess.run([PYTHON, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60, check=True)
    assert result.stderr.splitlines() == ["kept inside", "kept after"]
