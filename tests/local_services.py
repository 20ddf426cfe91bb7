"""Local stand-ins that the tests and the benchmarks share: a moto S3 server in its own
process on 127.0.0.1 (a real HTTP endpoint), a loopback proxy in front of it that injects
faults (503 SlowDown, connection resets, truncated bodies), and a reader of /proc's
per-process stats."""

from __future__ import annotations

import contextlib
import http.client
import multiprocessing
import os
import random
import socket
import struct
import threading
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
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


# ----------------------------------------------------------------------------- faulty S3

SLOW_DOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message><RequestId>faulty</RequestId></Error>"
)
FAULT_KINDS = ("503", "reset", "truncate")


class FaultyS3Proxy:
    """HTTP proxy on 127.0.0.1 in front of an S3 endpoint that answers the first
    `failures_per_key` requests (of `methods`) for every object whose key contains one of
    `match` with a fault, then passes them through.

    Each fault is one of `kinds`: "503" (a SlowDown answer), "reset" (the connection is reset
    before any answer) or "truncate" (the real answer's headers, then half its body, then the
    connection closes). Which kind a request gets is drawn from a generator seeded by
    (seed, key, attempt), so a schedule does not depend on thread timing. `failures_per_key`
    can be changed while the proxy runs (0: the storage is healthy again). Bodies and headers
    are passed through byte for byte (signatures stay valid: moto does not check the Host
    header against them). `injected` counts faults per key, `kinds_injected` per kind.
    """

    def __init__(
        self,
        upstream: str,
        match: tuple[str, ...],
        failures_per_key: int = 1,
        methods: tuple[str, ...] = ("PUT",),
        kinds: tuple[str, ...] = ("503",),
        seed: int = 0,
    ):
        unknown = set(kinds) - set(FAULT_KINDS)
        if unknown:
            raise ValueError(f"unknown fault kinds {sorted(unknown)}; known: {FAULT_KINDS}")
        self.upstream = upstream.split("://", 1)[1]
        self.match, self.failures_per_key, self.methods, self.kinds, self.seed = (
            match,
            failures_per_key,
            methods,
            kinds,
            seed,
        )
        self.injected: dict[str, int] = {}
        self.kinds_injected: Counter[str] = Counter()
        self.forwarded = 0
        self._lock = threading.Lock()
        self.server = _QuietServer(("127.0.0.1", 0), self._handler_class())
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True, name="faulty-s3")

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> FaultyS3Proxy:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def fault_for(self, method: str, path: str) -> str | None:
        """The fault to inject into this request, or None to pass it through."""
        key = path.split("?", 1)[0]
        if method not in self.methods or not any(m in key for m in self.match):
            return None
        with self._lock:
            count = self.injected.get(key, 0)
            if count >= self.failures_per_key:
                return None
            self.injected[key] = count + 1
            kind = random.Random(f"{self.seed}|{key}|{count}").choice(self.kinds)
            self.kinds_injected[kind] += 1
            return kind

    def _handler_class(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    raw = b""
                    while True:
                        line = self.rfile.readline()
                        raw += line
                        size = int(line.split(b";")[0].strip(), 16)
                        if size == 0:
                            while True:  # trailers, then an empty line
                                trailer = self.rfile.readline()
                                raw += trailer
                                if trailer in (b"\r\n", b"\n", b""):
                                    return raw
                        raw += self.rfile.read(size + 2)
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _reset(self) -> None:
                # SO_LINGER with a zero timeout: close() sends a TCP RST, not a FIN.
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.close_connection = True
                self.connection.close()

            def _forward(self, body: bytes) -> tuple[http.client.HTTPResponse, bytes]:
                conn = http.client.HTTPConnection(proxy.upstream, timeout=60)
                try:
                    conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                    for name, value in self.headers.items():
                        if name.lower() not in ("connection", "keep-alive", "proxy-connection", "expect"):
                            conn.putheader(name, value)
                    conn.endheaders(body or None)
                    resp = conn.getresponse()
                    data = resp.read()
                finally:
                    conn.close()
                with proxy._lock:
                    proxy.forwarded += 1
                return resp, data

            def _handle(self) -> None:
                body = self._body()
                fault = proxy.fault_for(self.command, self.path)
                if fault == "reset":
                    self._reset()
                    return
                if fault == "503":
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(SLOW_DOWN)))
                    self.end_headers()
                    self.wfile.write(SLOW_DOWN)
                    return
                resp, data = self._forward(body)
                self.send_response(resp.status, resp.reason)
                for name, value in resp.getheaders():
                    if name.lower() not in ("transfer-encoding", "connection", "content-length", "server", "date"):
                        self.send_header(name, value)
                # HEAD answers carry the object's length but no body.
                length = resp.getheader("Content-Length", "0") if self.command == "HEAD" else str(len(data))
                self.send_header("Content-Length", length)
                self.end_headers()
                if self.command == "HEAD":
                    return
                if fault == "truncate" and len(data) > 1:
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    self._reset()
                    return
                self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

        return Handler


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address) -> None:
        pass  # a connection the proxy reset on purpose is not an error worth a traceback


def FlakyS3Proxy(upstream: str, match: tuple[str, ...], failures_per_key: int = 1) -> FaultyS3Proxy:
    """The proxy answering `503 SlowDown` to the first `failures_per_key` PUTs of every
    matching object (the checkpoint-upload fault test)."""
    return FaultyS3Proxy(upstream, match, failures_per_key, methods=("PUT",), kinds=("503",))
