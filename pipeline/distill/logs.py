"""A run's logs: rank 0 writes per-step and per-epoch metrics (CSV + TensorBoard) under
`<run dir>/logs`; the driver prints new rows as they are committed (`EpochProgress`)."""

from __future__ import annotations

import csv
import io
import os
import shutil
import tempfile

from pipeline import storage
from pipeline.progress import Poller


def epoch_line(metrics: dict) -> str:
    parts = [
        f"[distill] epoch {int(metrics['epoch'])}/{int(metrics.get('epochs', 0)) or '?'}",
        f"loss {metrics.get('train/loss', 0):.5f}",
        f"{metrics['samples_per_s']:.1f} samples/s",
        f"lr {metrics['lr']:.2e}",
    ]
    if "AP" in metrics:
        parts.append(f"val AP {metrics['AP']:.4f}")
    return "  ".join(parts)


def resume_line(start_epoch: int, step: int, epochs: int) -> str:
    if start_epoch >= epochs:
        return f"[distill] resumed: all {epochs} epochs are already trained (step {step}); nothing to do"
    return (
        f"[distill] resuming at epoch {start_epoch + 1}/{epochs} from the epoch {start_epoch} checkpoint (step {step})"
    )


class MetricsLogger:
    """Rank 0's per-step and per-epoch metrics: CSV + TensorBoard under `<run dir>/logs`.

    Files are written locally and copied to the run dir after each epoch, so the same code
    serves local and s3:// storage. On resume the history is kept up to the epoch the
    checkpoint holds (rows of an epoch that was not committed are dropped).
    """

    def __init__(self, run_uri: str, completed_epochs: int = 0):
        from torch.utils.tensorboard import SummaryWriter

        self.remote = storage.join(run_uri, "logs")
        self.local = tempfile.mkdtemp(prefix="distill-logs-")
        self.rows: dict[str, list[dict]] = {}
        for name in ("steps.csv", "epochs.csv"):
            uri = storage.join(self.remote, name)
            old = list(csv.DictReader(io.StringIO(storage.read_bytes(uri).decode()))) if storage.exists(uri) else []
            self.rows[name] = [r for r in old if int(float(r["epoch"])) <= completed_epochs]
            self._write(name)
        self.tb = SummaryWriter(os.path.join(self.local, "tensorboard"))

    def _write(self, name: str) -> None:
        rows = self.rows[name]
        columns = list(dict.fromkeys(k for row in rows for k in row))  # union, first-seen order
        with open(os.path.join(self.local, name), "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)

    def step(self, step: int, epoch: int, losses: dict, lr: float) -> None:
        row = {"step": step, "epoch": epoch + 1, "lr": lr, **losses}
        rows = self.rows["steps.csv"]
        rows.append(row)
        if len(rows) == 1 or list(rows[-2]) != list(row):
            self._write("steps.csv")  # (new) header
        else:
            with open(os.path.join(self.local, "steps.csv"), "a", newline="") as f:  # same columns: append
                csv.DictWriter(f, fieldnames=list(row)).writerow(row)
        for k, v in losses.items():
            self.tb.add_scalar(f"step/{k}", v, step)

    def epoch(self, metrics: dict) -> None:
        self.rows["epochs.csv"].append(metrics)
        self._write("epochs.csv")  # AP columns appear only on evaluated epochs: rewrite
        for k, v in metrics.items():
            if isinstance(v, int | float):
                self.tb.add_scalar(f"epoch/{k}", v, metrics["epoch"])
        self.tb.flush()
        self._upload()

    def _upload(self) -> None:
        for root, _, files in os.walk(self.local):
            for name in files:
                rel = os.path.relpath(os.path.join(root, name), self.local)
                with open(os.path.join(root, name), "rb") as f:
                    storage.atomic_write_bytes(storage.join(self.remote, *rel.split(os.sep)), f.read())

    def close(self) -> None:
        self.tb.close()
        shutil.rmtree(self.local, ignore_errors=True)


class EpochProgress(Poller):
    """Prints each new row of the run's epochs.csv and the latest step from steps.csv."""

    def __init__(self, run_uri: str, interval_s: float = 10.0):
        super().__init__(self._report, interval_s)
        self.epochs_uri = storage.join(run_uri, "logs", "epochs.csv")
        self.steps_uri = storage.join(run_uri, "logs", "steps.csv")
        self.seen_epochs = len(self._rows(self.epochs_uri))
        self.last_step = None

    @staticmethod
    def _rows(uri: str) -> list[dict]:
        if not storage.exists(uri):
            return []
        return list(csv.DictReader(io.StringIO(storage.read_bytes(uri).decode())))

    def _report(self) -> None:
        epochs = self._rows(self.epochs_uri)
        # A resumed run first drops the rows of epochs that were never committed.
        for row in epochs[min(self.seen_epochs, len(epochs)) :]:
            metrics = {k: float(v) for k, v in row.items() if v not in ("", None)}
            print(epoch_line(metrics), flush=True)
        self.seen_epochs = len(epochs)
        steps = self._rows(self.steps_uri)
        if steps and steps[-1].get("step") != self.last_step:
            last = steps[-1]
            self.last_step = last.get("step")
            print(f"[distill]   step {last['step']} (epoch {last['epoch']}) loss {float(last['loss']):.5f}", flush=True)
