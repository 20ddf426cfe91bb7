"""Fault handling of distillation runs, on purpose and observed:

(a) a training worker is SIGKILLed mid-epoch -> Ray Train restarts the whole worker group
    from the last committed checkpoint and the run completes all epochs;
(b) the driver (`python jobs/distill.py`, with its own local Ray) is SIGKILLed after the
    first checkpoint -> rerunning the same command resumes and completes;
(c) two Ray nodes (cluster_utils), SPREAD placement, checkpoints on S3 (moto) behind a proxy
    that answers 503 SlowDown to the first PUT of every object -> uploads are retried;
(d) checkpoint write and resume through a fault-injecting proxy: an outage of one
    checkpoint's uploads fails the job with the storage line and exit 75, without committing
    that checkpoint; the rerun, through bursts of 503s, resets and truncated bodies on every
    read and write, resumes and ends with the clean run's student, bit for bit.

Workers write their pid and a start record (rank, pid, node, start epoch) through the test
hooks (pipeline.distill.hooks.WorkerHooks `pid_dir`; a job process gets them through
DISTILPOSE_TEST_HOOKS); `step_sleep_s` stretches epochs so a kill lands mid-epoch.
Observed timings are printed (`pytest -s`) for the record. Each test takes minutes on a
2-core machine: the module is heavy (`make test-heavy`); the default suite keeps a resume
(tests/test_distill.py) and S3 storage (tests/test_storage.py, tests/test_teacher_stage.py).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch
from local_services import FaultyS3Proxy
from pipeline_fixtures import (
    PYTHON,
    ROOT,
    FlakyS3Proxy,
    epochs_of,
    job_env,
    kill_session,
    private_ray_tmpdir,
    read_starts,
    run_job,
    session_members,
    wait_for,
)

from distilpose import fileio
from pipeline.cli import STORAGE_UNAVAILABLE
from pipeline.distill import DistillConfig, run_distill
from pipeline.distill.hooks import ENV as HOOKS_ENV
from pipeline.distill.hooks import WorkerHooks

STUDENT = "distilpose-tiny"
SNAPSHOT = "checkpoint_manager_snapshot.json"
pytestmark = pytest.mark.heavy  # Ray Train writes it when a checkpoint is committed


def _latest_checkpoint_epoch(run: Path) -> int:
    """The epoch of the newest checkpoint in Ray's snapshot (0 while there is none)."""

    def read() -> dict | None:
        try:
            return json.loads((run / SNAPSHOT).read_text())
        except (OSError, ValueError):  # not there yet, or caught mid-write
            return None

    snapshot = wait_for(read, 30, what=f"a readable {SNAPSHOT}")
    latest = snapshot.get("latest_checkpoint_result") or {}
    return int(latest.get("checkpoint_dir_name", "epoch_0000").split("_")[1])


@pytest.mark.timeout(300)
def test_worker_sigkill_restarts_group_from_last_checkpoint(local_ray, tiny_cache, tmp_path) -> None:
    pid_dir, run = tmp_path / "pids", tmp_path / "runs" / "kill"
    cfg = DistillConfig(
        cache=tiny_cache,
        student=STUDENT,
        storage=str(tmp_path / "runs"),
        name="kill",
        epochs=4,
        batch_size=4,  # 4 steps per epoch per worker
        workers=2,
        warmup_iters=2,
        log_every=1,
        max_failures=2,
    )
    hooks = WorkerHooks(pid_dir=str(pid_dir), step_sleep_s=0.4)  # ~1.6 s per epoch: room to land a kill mid-epoch
    seen: dict = {}

    def killer() -> None:
        try:
            wait_for(lambda: (run / SNAPSHOT).exists(), 240, what="the first committed checkpoint")
            seen["committed"] = _latest_checkpoint_epoch(run)
            time.sleep(0.6)  # into the next epoch
            seen["victim"] = int((pid_dir / "rank1.pid").read_text())
            seen["killed_at"] = time.time()
            os.kill(seen["victim"], signal.SIGKILL)
        except Exception as e:  # reported by the main thread
            seen["error"] = e

    thread = threading.Thread(target=killer, daemon=True)
    t0 = time.perf_counter()
    thread.start()
    result = run_distill(cfg, hooks=hooks)
    wall = time.perf_counter() - t0
    thread.join(timeout=5)
    assert "error" not in seen, seen.get("error")

    starts = read_starts(pid_dir)
    first = [s for s in starts if s["start_epoch"] == 0]
    resumed = [s for s in starts if s["start_epoch"] > 0]
    assert {s["rank"] for s in first} == {0, 1} and {s["rank"] for s in resumed} == {0, 1}
    assert seen["victim"] in {s["pid"] for s in first}
    assert not {s["pid"] for s in first} & {s["pid"] for s in resumed}, "the whole group restarts"
    restart_epoch = resumed[0]["start_epoch"]
    # Resumed from the last checkpoint Ray had committed (the kill came after it).
    assert restart_epoch >= seen["committed"]
    assert result.metrics["epoch"] == 4 and epochs_of(run) == [1, 2, 3, 4]
    overhead = min(s["time"] for s in resumed) - seen["killed_at"]
    print(
        f"\n[fault a] killed rank 1 (pid {seen['victim']}) after epoch {seen['committed']} was committed; "
        f"group restarted at epoch {restart_epoch + 1} (start_epoch={restart_epoch}); kill -> training again "
        f"{overhead:.1f} s; fit wall {wall:.1f} s"
    )


@pytest.mark.timeout(420)
def test_driver_sigkill_then_rerun_resumes(tiny_cache, tmp_path, monkeypatch) -> None:
    pid_dir, run = tmp_path / "pids", tmp_path / "runs" / "drv"
    args = [
        *("--cache", tiny_cache, "--student", STUDENT, "--epochs", "3", "--batch-size", "4", "--workers", "2"),
        *("--warmup-iters", "2", "--log-every", "1", "--storage", str(tmp_path / "runs"), "--name", "drv"),
    ]
    monkeypatch.setenv(HOOKS_ENV, json.dumps({"pid_dir": str(pid_dir), "step_sleep_s": 0.25}))  # job_env passes it
    ray_tmp = private_ray_tmpdir()
    log = open(tmp_path / "first.log", "w")
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [PYTHON, str(ROOT / "jobs" / "distill.py"), *args],
        cwd=ROOT,
        env=job_env(ray_tmp),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # the job and the Ray it starts share a session we can kill
    )
    try:
        wait_for(
            lambda: (run / SNAPSHOT).exists() or proc.poll() is not None, 300, what="the first committed checkpoint"
        )
        assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        committed = _latest_checkpoint_epoch(run)
        killed = kill_session(proc.pid)  # driver, raylet, GCS, controller, workers: no clean shutdown
        killed_after = time.perf_counter() - t0
        proc.wait(timeout=10)
        assert not session_members(proc.pid), "processes of the killed job survived"
    finally:
        kill_session(proc.pid)
        log.close()
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert len(killed) > 3  # the driver and its Ray processes
    assert epochs_of(run)[:committed] == list(range(1, committed + 1))

    t1 = time.perf_counter()
    rerun = run_job("distill.py", args, timeout_s=300)
    rerun_wall = time.perf_counter() - t1
    assert rerun.returncode == 0, rerun.stdout[-4000:]
    assert "resuming from its last checkpoint" in rerun.stdout
    assert "exported latest student" in rerun.stdout
    assert epochs_of(run) == [1, 2, 3]
    resumed = [s for s in read_starts(pid_dir) if s["start_epoch"] > 0]
    assert resumed and resumed[0]["start_epoch"] >= committed
    print(
        f"\n[fault b] driver session killed ({len(killed)} processes) {killed_after:.1f} s in, with epoch "
        f"{committed} committed; rerun resumed at epoch {resumed[0]['start_epoch'] + 1} and finished in "
        f"{rerun_wall:.1f} s"
    )


@pytest.mark.timeout(300)
def test_two_nodes_spread_checkpoints_on_flaky_s3(tiny_cache, tmp_path, s3_server, s3_bucket, monkeypatch) -> None:
    import ray
    from ray.cluster_utils import Cluster

    from pipeline import storage
    from pipeline.ray_env import worker_env

    pid_dir = tmp_path / "pids"
    # Every object of the run fails its first PUT: Ray's checkpoint uploads (pyarrow) and our
    # own writes (logs, run record, export through pipeline.storage) must all retry.
    match = ("/epoch_", "/logs/", "/export/", "/run.json")
    # cluster_utils records its address for a plain ray.init() in <RAY_TMPDIR>/ray; a private
    # one keeps other users' ray.init() on this machine from joining this cluster.
    ray_tmp = private_ray_tmpdir()
    monkeypatch.setenv("RAY_TMPDIR", ray_tmp)
    ray.shutdown()  # the session's local Ray, if up: this test brings its own cluster
    with FlakyS3Proxy(s3_server, match=match, failures_per_key=1) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)  # driver, nodes and workers
        t0 = time.perf_counter()
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
        try:
            cluster.add_node(num_cpus=1)
            cluster.add_node(num_cpus=1)
            cluster.wait_for_nodes()
            ray.init(
                address=cluster.address,
                runtime_env={"env_vars": worker_env()},
                log_to_driver=False,
                logging_level="ERROR",
            )
            up = time.perf_counter() - t0
            cfg = DistillConfig(
                cache=tiny_cache,
                student=STUDENT,
                storage=f"{s3_bucket}/runs",
                name="spread",
                epochs=2,
                batch_size=4,
                workers=2,
                warmup_iters=2,
                log_every=2,
                placement_strategy="SPREAD",
            )
            result = run_distill(cfg, hooks=WorkerHooks(pid_dir=str(pid_dir)))
            wall = time.perf_counter() - t0
        finally:
            ray.shutdown()
            cluster.shutdown()
            shutil.rmtree(ray_tmp, ignore_errors=True)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)  # the proxy is gone; read back directly

    starts = read_starts(pid_dir)
    nodes = {s["rank"]: s["node_id"] for s in starts}
    assert set(nodes) == {0, 1} and nodes[0] != nodes[1], "SPREAD put both workers on one node"
    files = storage.find_files(f"{s3_bucket}/runs/spread")
    for name in ("epoch_0001/state.pt", "epoch_0002/state.pt", SNAPSHOT, "logs/epochs.csv", "run.json"):
        assert name in files, sorted(files)
    assert "export/student_latest.pt" in files and result.exported["latest"].startswith("s3://")
    assert any(name.startswith("logs/tensorboard/events.out.tfevents") for name in files)
    retried = {key.split("/runs/spread/", 1)[-1] for key in proxy.injected}
    assert any(k.startswith("epoch_") for k in retried), retried  # Ray's uploads met a 503 and retried
    assert {"logs/epochs.csv", "run.json", "export/student_latest.pt"} <= retried
    assert result.metrics["epoch"] == 2
    print(
        f"\n[fault c] 2 nodes up in {up:.1f} s; workers on nodes {nodes[0][:8]} / {nodes[1][:8]}; "
        f"{sum(proxy.injected.values())} PUTs answered 503 and retried ({len(retried)} objects); wall {wall:.1f} s"
    )


def _student_weights(uri: str) -> dict:
    from distilpose.models.checkpoints import load_checkpoint
    from pipeline import storage

    model, _ = load_checkpoint(storage.local_copy(uri))
    return model.state_dict()


@pytest.mark.timeout(900)
def test_checkpoints_through_faults_resume_to_the_clean_result(tiny_cache, tmp_path, s3_server, s3_bucket, monkeypatch):
    # Short backoffs, and no silent retries inside the S3 client: the budget is ours (5 tries).
    for key, value in {
        fileio.ATTEMPTS_ENV: "5",
        fileio.BACKOFF_ENV: "0.05",
        fileio.S3_CLIENT_ATTEMPTS_ENV: "1",
    }.items():
        monkeypatch.setenv(key, value)
    runs = f"{s3_bucket}/runs"

    # 5 steps per epoch: the warm-up (8 iterations) runs into epoch 2 and the LR milestone falls
    # between epochs 1 and 2, so a resume (from epoch 1's checkpoint) that lost the optimizer's
    # moments or the scheduler's position trains differently (RNG restore: test_train_state.py).
    def distill(name: str):
        args = [
            *("--cache", tiny_cache, "--student", STUDENT, "--epochs", "3", "--batch-size", "8", "--workers", "1"),
            *("--warmup-iters", "8", "--lr-steps", "1", "--log-every", "4", "--storage", runs, "--name", name),
            *("--max-failures", "1"),
        ]
        return run_job("distill.py", args, timeout_s=300)

    clean = distill("clean")
    assert clean.returncode == 0, clean.stdout[-4000:]

    # A PUT's answer has no body, so a truncated one is a success to the client: the outage
    # is 503s and resets; truncated bodies come with the rerun's GETs.
    with FaultyS3Proxy(s3_server, ("/runs/faulty/epoch_0002/",), failures_per_key=10**6, methods=("PUT",),
                       kinds=("503", "reset"), seed=3) as proxy:  # fmt: skip
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        outage = distill("faulty")
        assert outage.returncode == STORAGE_UNAVAILABLE, outage.stdout[-4000:]
        last = outage.stdout.strip().splitlines()[-1]
        assert last.startswith("error: storage unavailable:") and "epoch_0002/state.pt" in last, last
        assert "Traceback" not in outage.stdout, outage.stdout[-4000:]
        outage_faults = sum(proxy.injected.values())
        # Epoch 1 was committed; epoch 2's checkpoint never was (nothing half-written is kept).
        monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
        from pipeline import storage

        files = storage.find_files(f"{runs}/faulty")
        assert "epoch_0001/state.pt" in files and "epoch_0002/state.pt" not in files, sorted(files)

        # The rerun, as a user would: bursts (2 faults per object) on every read and write of the run.
        proxy.failures_per_key, proxy.methods, proxy.kinds = 2, ("GET", "PUT"), ("503", "reset", "truncate")
        proxy.match = ("/runs/faulty/",)
        proxy.injected.clear()
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        rerun = distill("faulty")
        monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    assert rerun.returncode == 0, rerun.stdout[-4000:]
    assert "resuming from its last checkpoint" in rerun.stdout
    burst_keys = {key.split("/runs/faulty/", 1)[-1] for key in proxy.injected}
    assert {"epoch_0001/state.pt", "epoch_0003/state.pt", "export/student_latest.pt"} <= burst_keys, burst_keys
    clean_w = _student_weights(f"{runs}/clean/export/student_latest.pt")
    rerun_w = _student_weights(f"{runs}/faulty/export/student_latest.pt")
    assert clean_w.keys() == rerun_w.keys() and all(torch.equal(clean_w[k], rerun_w[k]) for k in clean_w)
    print(
        f"\n[fault d] outage: {outage_faults} faulted PUTs of epoch 2's checkpoint -> exit {outage.returncode}: "
        f"{last}; rerun through {sum(proxy.injected.values())} faults on {len(burst_keys)} objects -> the clean "
        "student, bitwise"
    )
