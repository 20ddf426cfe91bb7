"""Fixtures and helpers shared by the distillation, fault and sweep tests.

The session fixtures (`tiny_data`, `tiny_cache`) are re-exported at the end of
tests/conftest.py so that every module shares one instance. The cache is built by the real
job (`jobs/cache_teacher.py`, BatchNorm-calibrated random-init teacher) in a subprocess, with
its in-process engine (the same units as its Ray Data stage, tested in test_teacher_stage.py).

Ray safety on a shared machine: in-process clusters start with `address="local"` (a plain
`ray.init()` would join a cluster another user started with `ray start` on this host), and
subprocess jobs get a private RAY_TMPDIR (no `ray_current_cluster` file to follow; their
session files are removed with it).
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from local_services import FlakyS3Proxy, proc_stats  # noqa: F401  (FlakyS3Proxy: re-exported)

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
CACHE_JOB_TIMEOUT_S = 300
TRAIN_IMAGES, VAL_IMAGES = 24, 8
CACHE_VIEWS, CACHE_SHARD_INSTANCES = 2, 16  # 47 instances -> 3 shards x 2 views
TEACHER = "tokenpose-tiny"


# ----------------------------------------------------------------------------- data + cache


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> str:
    """Synthetic COCO data set: 24 train images (47 persons), 8 val images."""
    from distilpose.data.synthetic import make_synthetic_coco

    root = tmp_path_factory.mktemp("tiny-data")
    make_synthetic_coco(str(root), TRAIN_IMAGES, VAL_IMAGES, seed=0)
    return str(root)


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory) -> str:
    """A tokenpose-tiny checkpoint whose outputs depend on the input.

    The faithful random init (convs with std 0.001, BatchNorm at its initial running stats)
    shrinks activations to ~1e-9 in eval mode, so a random-init teacher gives the same
    outputs for every crop. A few train-mode passes over noise calibrate the BatchNorm
    statistics; nothing is trained.
    """
    import torch

    from distilpose.models import build_model
    from distilpose.models.checkpoints import save_checkpoint

    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = build_model(TEACHER)
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.reset_running_stats()
                module.momentum = None  # cumulative average over the calibration passes
        model.train()
        with torch.no_grad():
            for _ in range(2):
                model(torch.randn(8, 3, *model.config.input_size))
    path = str(tmp_path_factory.mktemp("tiny-teacher") / "teacher.pt")
    save_checkpoint(path, model.eval(), extra={"note": "BatchNorm-calibrated random init (tests)"})
    return path


@pytest.fixture(scope="session")
def tiny_cache(tiny_data, tiny_teacher, tmp_path_factory) -> str:
    """Teacher cache of the tiny train split, built by jobs/cache_teacher.py (tokenpose-tiny
    from `tiny_teacher`, 2 views per instance, 3 shards, `--engine in-process`)."""
    out = str(tmp_path_factory.mktemp("tiny-cache") / "cache")
    args = ["--data", tiny_data, "--teacher", TEACHER, "--checkpoint", tiny_teacher, "--out", out]
    args += ["--views", str(CACHE_VIEWS), "--shard-instances", str(CACHE_SHARD_INSTANCES)]
    # In-process: the distillation tests read this cache; the Ray Data stage that builds caches
    # has its own tests (test_teacher_stage.py), and Ray's start-up would cost ~25 s here.
    args += ["--engine", "in-process"]
    result = run_job("cache_teacher.py", args, timeout_s=CACHE_JOB_TIMEOUT_S)
    assert result.returncode == 0, f"cache job failed:\n{result.stdout[-4000:]}"
    return out


# ----------------------------------------------------------------------------- Ray


RAY_CPUS = 3  # 2 training workers + headroom; the cache stage runs in the same cluster


def ensure_local_ray() -> None:
    """The session's one private, quiet local Ray (workers get the S3 env), started on first
    use and kept for the next module. Start the `s3_server` fixture first, so that its AWS_*
    variables reach the workers. A test that brings its own cluster shuts this one down; the
    next caller starts it again. conftest.py shuts it down at the end of the session."""
    import ray

    from pipeline.ray_env import quiet_ray_data, without_placement_group_watcher, worker_env

    if ray.is_initialized():
        return
    # address="local", not init_ray(): a RAY_ADDRESS in the environment must not send the
    # tests to someone else's cluster.
    ray.init(
        address="local",
        num_cpus=RAY_CPUS,
        include_dashboard=False,
        log_to_driver=False,
        logging_level="ERROR",
        runtime_env={"env_vars": worker_env()},
    )
    without_placement_group_watcher()  # no dashboard: see its docstring
    quiet_ray_data()


@pytest.fixture
def local_ray(s3_server) -> None:
    """Run the test in the session's local Ray (see `ensure_local_ray`)."""
    ensure_local_ray()


def private_ray_tmpdir() -> str:
    # Short: Ray's unix socket paths live below it (108-byte limit).
    return tempfile.mkdtemp(prefix="rt-", dir="/tmp")


def job_env(ray_tmpdir: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env.update(RAY_TMPDIR=ray_tmpdir, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1")
    return env


def run_job(script: str, args: list[str], timeout_s: float) -> subprocess.CompletedProcess:
    """Run jobs/<script> to completion in its own session with a private Ray; whatever it
    leaves behind (a killed job's Ray) is killed by pid afterwards."""
    ray_tmp = private_ray_tmpdir()
    proc = subprocess.Popen(
        [PYTHON, str(ROOT / "jobs" / script), *args],
        cwd=ROOT,
        env=job_env(ray_tmp),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        kill_session(proc.pid)
        out, _ = proc.communicate()
        raise AssertionError(f"jobs/{script} timed out after {timeout_s} s:\n{out[-4000:]}") from None
    finally:
        kill_session(proc.pid)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, None)


def session_members(sid: int) -> list[int]:
    """Pids of the live processes in session `sid` (a job started with start_new_session,
    and the Ray processes it spawned)."""
    return [pid for pid, fields in proc_stats().items() if int(fields[3]) == sid and fields[0] != "Z"]


def kill_session(sid: int, timeout_s: float = 20.0) -> list[int]:
    """SIGKILL every process of session `sid` (started by this test) by pid; returns them."""
    killed = session_members(sid)
    for pid in killed:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout_s
    while session_members(sid) and time.monotonic() < deadline:
        time.sleep(0.1)
    return killed


# ----------------------------------------------------------------------------- run outputs


def read_csv(path: str | Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def epochs_of(run: str | Path) -> list[int]:
    return [int(float(r["epoch"])) for r in read_csv(Path(run) / "logs" / "epochs.csv")]


def read_starts(pid_dir: str | Path) -> list[dict]:
    """The workers' start records (rank, pid, node_id, start_epoch, time), oldest first."""
    records = [json.loads(p.read_text()) for p in Path(pid_dir).glob("start-rank*.json")]
    return sorted(records, key=lambda r: (r["time"], r["rank"]))


def wait_for(predicate, timeout_s: float, interval_s: float = 0.1, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise TimeoutError(f"timed out after {timeout_s} s waiting for {what}")


def load_job(name: str):
    """jobs/<name>.py as a module (jobs/ on sys.path, as when the script runs), to call its
    parse_args or main in-process."""
    import importlib.util

    jobs = str(ROOT / "jobs")
    if jobs not in sys.path:
        sys.path.insert(0, jobs)
    spec = importlib.util.spec_from_file_location(f"job_{name}", ROOT / "jobs" / f"{name}.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    return job
