"""Driver-side progress for distributed stages.

Worker logs may not reach the driver (and are noisy when they do), so progress is read
from what the workers commit to storage: shard commit records, metrics CSVs. A `Poller`
calls a report function every few seconds on a daemon thread and once more at the end.
"""

from __future__ import annotations

import threading
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
