"""Starting or joining Ray the same way from every job.

A job run directly (`python jobs/x.py`) starts a local Ray; a job run through
`ray job submit` (RAY_ADDRESS set) or with `--address` joins that cluster. Quiet by
default: Ray's own progress bars and worker logs stay off unless asked for.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading

from distilpose import fileio

# Ray 2.60 turns token auth on for new local clusters; the jobs only ever talk to their
# own cluster, and a token file left in ~/.ray by an earlier run must not change
# behaviour. A user who wants auth exports RAY_AUTH_MODE=token themselves.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

# Environment forwarded to every Ray worker so S3 clients there see the same endpoint.
FORWARDED_ENV = (
    "AWS_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_PROFILE",
    "RAY_AUTH_MODE",
    # The storage retry budget (distilpose.fileio), so workers retry as the driver does.
    fileio.ATTEMPTS_ENV,
    fileio.BACKOFF_ENV,
    fileio.MAX_BACKOFF_ENV,
    fileio.S3_CLIENT_ATTEMPTS_ENV,
)


def worker_env() -> dict[str, str]:
    return {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}


def init_ray(address: str | None = None, num_cpus: int | None = None, verbose: bool = False) -> None:
    """Start a local Ray, or connect to `address` / RAY_ADDRESS when given."""
    import ray

    if ray.is_initialized():
        return
    if not verbose:
        # The driver's core worker writes Ray's C++ log lines to stderr (e.g. an "E" line
        # saying an actor's constructor arguments live in the object store): Ray's
        # bookkeeping, not the job's, and it reads like a failure.
        os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
    address = address or os.environ.get("RAY_ADDRESS")
    kwargs = dict(
        runtime_env={"env_vars": worker_env()},
        log_to_driver=verbose,
        logging_level="INFO" if verbose else "ERROR",
    )
    # Ray's core worker announces the log level set above on stderr ("logging.cc: Set ray
    # log level from environment variable ..."), the one line left of its own.
    with contextlib.nullcontext() if verbose else stderr_without(RAY_LOG_LEVEL_LINE):
        if address:
            ray.init(address=address, **kwargs)
        else:
            # "local" always starts a new cluster; a bare ray.init() would join whatever
            # cluster /tmp/ray/ray_current_cluster names (any earlier `ray start` here).
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, **kwargs)
            without_placement_group_watcher()
    quiet_ray_data(verbose)


def without_placement_group_watcher() -> None:
    """Ray Train fits in this process run without Ray's placement-group watcher; for
    clusters started without a dashboard (the local Ray a job starts when run directly).

    Ray Train 2.60 starts a detached actor per fit() that asks the State API, every second,
    whether the controller is alive, to free the placement group if it died. The State API
    is served by the dashboard: without one each question hangs for its 10 s timeout, and
    every fit() ends ~12 s late waiting for the watcher to stop (the controller's log says
    "Failed to stop PlacementGroupCleaner gracefully"; measured: a 1-epoch tiny run
    spends 12 of its 30 s there). Without the State API it could not see a dead controller
    anyway, and a local cluster's placement groups go with the cluster. Clusters joined by
    address (`ray job submit` needs a dashboard) keep it. Does nothing on a Ray without it."""
    try:
        from ray.train.v2.api import data_parallel_trainer as trainer
    except ImportError:
        return
    watcher = getattr(trainer, "PlacementGroupCleanerCallback", None)
    make = getattr(trainer.DataParallelTrainer, "_create_default_callbacks", None)
    if watcher is None or make is None or getattr(make, "without_watcher", False):
        return

    def callbacks(self):
        return [c for c in make(self) if not isinstance(c, watcher)]

    callbacks.without_watcher = True
    trainer.DataParallelTrainer._create_default_callbacks = callbacks


RAY_LOG_LEVEL_LINE = b"Set ray log level from environment variable"


@contextlib.contextmanager
def stderr_without(marker: bytes):
    """Drop the lines containing `marker` that anything in this process (C++ included)
    writes to file descriptor 2 inside the block; every other line passes through.

    fd 2 points at a pipe during the block; a thread copies the pipe to the real stderr.
    A child started inside the block may keep the pipe's write end, so the thread copies
    on until the last writer closes it, and owns its own duplicate of the real stderr."""
    sys.stderr.flush()
    real = os.dup(2)
    out = os.dup(real)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)

    def copy() -> None:
        with os.fdopen(read_end, "rb") as pipe:
            for line in pipe:
                if marker not in line:
                    os.write(out, line)
        os.close(out)

    thread = threading.Thread(target=copy, name="stderr-filter", daemon=True)
    thread.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(real, 2)
        os.close(real)
        thread.join(timeout=1.0)


def quiet_ray_data(verbose: bool = False) -> None:
    import logging

    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = verbose
    ctx.print_on_execution_start = verbose
    # Ray Data logs each dataset's registration, plan and start at INFO, and that progress bars
    # are off as a WARNING.
    logging.getLogger("ray.data").setLevel(logging.DEBUG if verbose else logging.ERROR)
