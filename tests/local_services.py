"""Local stand-ins that the tests and the benchmarks share: a moto S3 server in its own
process on 127.0.0.1 (a real HTTP endpoint), and a reader of /proc's per-process stats."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
from collections.abc import Iterator
from pathlib import Path

S3_TEST_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
MOTO_START_TIMEOUT_S = 60


def _serve_moto(port_queue, stop) -> None:
    """Child process: run moto's S3 server on a free port until `stop` is set."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one access-log line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        port_queue.put(server.get_host_and_port()[1])
        stop.wait()
    finally:
        server.stop()


@contextlib.contextmanager
def moto_server() -> Iterator[tuple[str, int]]:
    """(endpoint URL, server pid) of a moto S3 server that lives for the block. AWS_*
    variables point at it inside the block and are restored after it."""
    # spawn: forking a process that may already run s3fs/zarr event-loop threads can
    # deadlock the child.
    context = multiprocessing.get_context("spawn")
    port_queue, stop = context.Queue(), context.Event()
    process = context.Process(target=_serve_moto, args=(port_queue, stop), name="moto-s3", daemon=True)
    process.start()
    saved = {key: os.environ.get(key) for key in (*S3_TEST_ENV, "AWS_ENDPOINT_URL")}
    try:
        endpoint = f"http://127.0.0.1:{port_queue.get(timeout=MOTO_START_TIMEOUT_S)}"
        os.environ.update({**S3_TEST_ENV, "AWS_ENDPOINT_URL": endpoint})
        yield endpoint, process.pid
    finally:
        stop.set()
        process.join(timeout=10)
        if process.is_alive():
            process.terminate()
            process.join(timeout=5)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def proc_stats() -> dict[int, list[str]]:
    """{pid: the fields of /proc/<pid>/stat after "pid (comm) "} of every readable process
    (fields[0] state, [1] parent pid, [3] session id, [11] / [12] user / system ticks)."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        found[int(entry)] = stat[stat.rindex(")") + 2 :].split()
    return found
