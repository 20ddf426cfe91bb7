"""Jobs under `ray job submit --working-dir .` refuse paths that would be lost: relative
outputs land in Ray's temporary copy of the repo, relative inputs under git-ignored folders
were never uploaded. The refusal is checked through a real local cluster (`ray start --head`
with the dashboard, JobSubmissionClient)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pipeline_fixtures import PYTHON, ROOT, kill_session, private_ray_tmpdir

from distilpose.errors import UserError
from pipeline.job_env import check_job_paths, in_uploaded_working_dir

UPLOADED = "/tmp/ray/session_1/runtime_resources/working_dir_files/_ray_pkg_abc"
CLUSTER_START_TIMEOUT_S = 120
JOB_TIMEOUT_S = 120


def test_paths_are_checked_only_in_an_uploaded_working_dir(tmp_path) -> None:
    assert in_uploaded_working_dir(UPLOADED) and not in_uploaded_working_dir(str(tmp_path))
    check_job_paths({"--storage": "runs"}, {"--cache": "runs/cache"}, cwd=str(tmp_path))  # a checkout: fine
    check_job_paths({"--storage": "/abs/runs", "--out": "s3://b/x"}, {"--cache": "s3://b/c"}, cwd=UPLOADED)
    with pytest.raises(UserError, match="--storage runs \\(output\\); --cache runs/c \\(not in the uploaded"):
        check_job_paths({"--storage": "runs"}, {"--cache": "runs/c"}, cwd=UPLOADED)
    uploaded = tmp_path / "runtime_resources" / "working_dir_files" / "pkg"
    (uploaded / "sweeps").mkdir(parents=True)
    (uploaded / "sweeps" / "a.yaml").write_text("{}")
    check_job_paths({}, {"--space": "sweeps/a.yaml"}, cwd=str(uploaded))  # uploaded with the repo: fine
    with pytest.raises(UserError, match="pass an absolute path .* or an s3:// URI"):
        check_job_paths({"--out": "file://x"}, {}, cwd=str(uploaded))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster_address() -> Iterator[str]:
    """Dashboard address of a `ray start --head` cluster started the README's way (the
    venv's bin first on PATH), with a private temp dir; its processes are ended by pid."""
    temp_dir = private_ray_tmpdir()
    port, dashboard, agent, agent_grpc = (_free_port() for _ in range(4))
    env = {**os.environ, "PATH": f"{Path(PYTHON).parent}:{os.environ['PATH']}"}
    env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)
    command = [str(Path(PYTHON).parent / "ray"), "start", "--head", "--block", f"--port={port}", "--num-cpus=2"]
    command += ["--include-dashboard=true", f"--dashboard-port={dashboard}", f"--temp-dir={temp_dir}"]
    # Not the agent's default ports: another cluster on this host may hold them.
    command += [f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}"]
    head = subprocess.Popen(
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    address = f"http://127.0.0.1:{dashboard}"
    try:
        _wait_for_jobs_api(address, head)
        yield address
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(head.pid, signal.SIGTERM)  # `ray start --block` stops its cluster on SIGTERM
        with contextlib.suppress(subprocess.TimeoutExpired):
            head.wait(timeout=30)
        kill_session(head.pid)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _wait_for_jobs_api(address: str, head: subprocess.Popen) -> None:
    from ray.job_submission import JobSubmissionClient

    deadline = time.monotonic() + CLUSTER_START_TIMEOUT_S
    while True:
        assert head.poll() is None, "ray start --head exited"
        try:
            JobSubmissionClient(address).list_jobs()
            return
        except Exception:  # the dashboard is not up yet
            if time.monotonic() > deadline:
                raise
            time.sleep(1.0)


def test_submitted_job_refuses_relative_output_and_missing_relative_input(cluster_address) -> None:
    import requests
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(cluster_address)
    deadline = time.monotonic() + JOB_TIMEOUT_S
    job = None
    while job is None:
        try:
            job = client.submit_job(
                entrypoint="python jobs/distill.py --cache runs/no-such-cache --student distilpose-tiny",
                runtime_env={"working_dir": str(ROOT)},
            )
        except RuntimeError as e:  # the head's job agent starts a little after the dashboard
            if "No available agent" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(1.0)
        except requests.exceptions.ConnectionError:  # a busy dashboard still starting drops the request
            if time.monotonic() > deadline:
                raise
            time.sleep(1.0)
    while (status := client.get_job_status(job)) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
        assert time.monotonic() < deadline, client.get_job_logs(job)[-3000:]
        time.sleep(0.5)
    logs = client.get_job_logs(job)
    assert status == JobStatus.FAILED, logs[-3000:]
    assert "exit code 2" in (client.get_job_info(job).message or ""), client.get_job_info(job).message
    error = [line for line in logs.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "Traceback" not in logs, logs[-3000:]
    assert "--storage runs (output)" in error[0] and "--cache runs/no-such-cache (not in the uploaded" in error[0]
    assert "pass an absolute path" in error[0] and "s3:// URI" in error[0]


def test_fits_on_a_dashboard_less_local_ray_skip_the_placement_group_watcher() -> None:
    """Ray Train's watcher asks the State API (the dashboard) whether the controller lives;
    without a dashboard each ask hangs 10 s and every fit() ends ~12 s late. The jobs' local
    Ray (`init_ray` without an address) and the tests' drop it from the trainer's callbacks."""
    import inspect

    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipeline import ray_env

    def callbacks() -> list[str]:
        trainer = TorchTrainer(lambda: None, scaling_config=ScalingConfig(num_workers=1))
        return [type(c).__name__ for c in trainer._create_default_callbacks()]

    assert "without_placement_group_watcher()" in inspect.getsource(ray_env.init_ray)
    ray_env.without_placement_group_watcher()
    ray_env.without_placement_group_watcher()  # idempotent: wraps once
    names = callbacks()
    assert names and "PlacementGroupCleanerCallback" not in names
