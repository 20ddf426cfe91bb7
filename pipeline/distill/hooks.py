"""Test hooks of a training worker, kept out of the run's config: production runs have none.

Fault tests need to find a worker to kill (its pid), see where each (re)started worker
began training, and stretch epochs so a kill lands mid-epoch. A test passes a `WorkerHooks`
to `run_distill` / `run_sweep`; for a job it starts as a process (`jobs/distill.py`,
`jobs/sweep.py`) it sets DISTILPOSE_TEST_HOOKS to the hooks as JSON, which those jobs read.
The default `WorkerHooks()` does nothing.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass

from pipeline import storage

ENV = "DISTILPOSE_TEST_HOOKS"


@dataclass(frozen=True)
class WorkerHooks:
    pid_dir: str | None = None  # where workers write rank<r>.pid and start-rank<r>-<pid>.json
    step_sleep_s: float = 0.0  # sleep after every training step

    @classmethod
    def from_env(cls) -> WorkerHooks | None:
        raw = os.environ.get(ENV)
        return cls(**json.loads(raw)) if raw else None

    @classmethod
    def from_dict(cls, data: dict | None) -> WorkerHooks:
        return cls(**(data or {}))

    def to_dict(self) -> dict:
        return asdict(self)

    def worker_started(self, rank: int) -> None:
        """This worker's pid, for a test to kill it (atomic: never read empty)."""
        if self.pid_dir:
            storage.atomic_write_bytes(os.path.join(self.pid_dir, f"rank{rank}.pid"), str(os.getpid()).encode())

    def training_starts(self, rank: int, start_epoch: int) -> None:
        """Which process started training where (fault tests read these)."""
        if not self.pid_dir:
            return
        import ray

        record = {
            "rank": rank,
            "pid": os.getpid(),
            "node_id": ray.get_runtime_context().get_node_id(),
            "start_epoch": start_epoch,
            "time": time.time(),
        }
        path = os.path.join(self.pid_dir, f"start-rank{rank}-{os.getpid()}.json")
        storage.atomic_write_bytes(path, json.dumps(record).encode())

    def step_done(self) -> None:
        if self.step_sleep_s:
            time.sleep(self.step_sleep_s)
