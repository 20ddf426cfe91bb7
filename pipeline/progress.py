"""Driver-side progress for distributed stages.

Worker logs may not reach the driver (and are noisy when they do), so progress is read
from what the workers commit to storage: commit records, metrics CSVs. A `Poller`
calls a report function every few seconds on a daemon thread and once more at the end.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class Poller:
    def __init__(self, report: Callable[[], None], interval_s: float = 10.0):
        self.report, self.interval_s = report, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> Poller:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._safe_report()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._safe_report()

    def _safe_report(self) -> None:
        try:
            self.report()
        except Exception:  # a progress line is never worth failing the job
            pass


class ShardProgress(Poller):
    """Committed shard-views / views per second / ETA, from the names in the commits folder,
    so it is right on any cluster and costs one listing per interval (no record is read).
    ``todo``: shard specs with their instances and the views to compute."""

    def __init__(self, writer, todo: list, interval_s: float = 10.0):
        super().__init__(self._report, interval_s)
        self.writer = writer
        self.todo = {(s.index, v): len(s.instances) for s in todo for v in s.views}
        self.t0 = time.perf_counter()

    def _report(self) -> None:
        done = self.writer.committed_keys() & self.todo.keys()
        views_done = sum(self.todo[key] for key in done)
        total = sum(self.todo.values())
        elapsed = time.perf_counter() - self.t0
        rate = views_done / elapsed if elapsed > 0 else 0.0
        eta = f", ETA {(total - views_done) / rate:.0f} s" if 0 < rate and views_done < total else ""
        print(
            f"[cache] {len(done)}/{len(self.todo)} shard-views, {views_done}/{total} views, {rate:.1f} views/s{eta}",
            flush=True,
        )
