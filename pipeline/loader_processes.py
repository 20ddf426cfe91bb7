"""Loader processes: a training worker's batches built in N processes, in the same order.

One loader thread feeds several hundred samples/s (decode, warp and normalize hold the GIL
for part of their time), a GPU wants thousands: the batch building, a pure function of a
batch's cache rows (`pipeline.cache_loader.BatchMaker`), runs in N worker processes while the
training process keeps reading the shard units (zarr's threads decompress them), the seeded
shuffle, and puts the batches back in order. That share is not small: measured at 0.56-0.78
ms of CPU per sample (bench/bench_loader_cost.py), so on a 2-core machine the processes are
slower than one thread; they are for workers with cores to spare (opt-in).

Batch i of an epoch goes to process i % N, which also gets its share of each shuffle pool's
rows, so a source image is decoded once per process and pool (`PoolCrops`), not once per row.
The batches are the ones the in-process loader builds, bitwise: same rows, same code, seeds
that do not depend on the process.

Why own processes and not torch's DataLoader workers or Ray Data: a DataLoader worker would
read whole shard units itself (each worker N times the reads, or per-row reads that are
25-30x slower), and the batch order would come from its round robin rather than from the
plan; Ray Data streaming into Train re-plans the shuffle (the cache's seeded, resumable order
would be lost) and costs seconds of start-up per epoch on a small worker. Here a worker
process costs one interpreter start (the imports) per run, and each batch crosses back
through shared memory (torch.multiprocessing), not a pipe copy.

Processes are started with "spawn" (a Ray worker has threads; fork would copy their locks)
and stop when the stream closes, when the parent goes away (each polls its parent), or at
interpreter exit.
"""

from __future__ import annotations

import os
import queue
import weakref

import numpy as np

RESET, POOL, BATCH = "reset", "pool", "batch"
_STOP = None
_FAILED = -1  # sequence number of an error outside a batch
PARENT_POLL_S = 1.0  # how often an idle worker process checks that its parent is alive


class LoaderProcesses:
    """N processes running copies of one BatchMaker; `batches(plan, epoch)` yields the plan's
    batches in order."""

    def __init__(self, maker, processes: int, in_flight_per_process: int = 2):
        import torch.multiprocessing as mp

        if processes < 1:
            raise ValueError(f"loader processes must be >= 1, got {processes}")
        ctx = mp.get_context("spawn")
        self.n = processes
        self.in_flight = in_flight_per_process * processes
        self.results = ctx.Queue()
        self.tasks = [ctx.Queue() for _ in range(processes)]
        self.procs = [
            ctx.Process(
                target=_serve, args=(maker, self.tasks[i], self.results, os.getpid()), name=f"loader-{i}", daemon=True
            )
            for i in range(processes)
        ]
        for proc in self.procs:
            proc.start()
        self._finalizer = weakref.finalize(self, _stop, self.procs, self.tasks)

    def batches(self, plan, epoch: int):
        """Run `plan` (pipeline.cache_loader.CachedViewStream._plan events) through the processes."""
        waiting: dict[int, object] = {}  # seq -> batch (or exception) back out of order
        sent = received = 0
        for kind, payload in plan:
            if kind == RESET:
                for q in self.tasks:
                    q.put((RESET, None, None))
            elif kind == POOL:
                for i, q in enumerate(self.tasks):
                    q.put((POOL, None, _share_of_pool(payload, sent, i, self.n)))
            else:
                self.tasks[sent % self.n].put((BATCH, sent, (payload, epoch)))
                sent += 1
                while sent - received >= self.in_flight:  # bounded: at most in_flight batches built ahead
                    yield self._next(waiting, received)
                    received += 1
        while received < sent:
            yield self._next(waiting, received)
            received += 1

    def _next(self, waiting: dict, seq: int):
        while seq not in waiting:
            try:
                got, item = self.results.get(timeout=PARENT_POLL_S)
            except queue.Empty:
                dead = [p.name for p in self.procs if not p.is_alive()]
                if dead:
                    names = ", ".join(dead)
                    raise RuntimeError(f"loader process(es) {names} exited (killed, or out of memory?)") from None
                continue
            if got == _FAILED:  # a pool or reset failed: the batches after it cannot be built
                raise item
            waiting[got] = item
        item = waiting.pop(seq)
        if isinstance(item, BaseException):
            raise item
        return unpack(*item)

    def close(self) -> None:
        self._finalizer()


ALIGN = 64  # bytes: every array of a packed batch starts at a multiple (any dtype's alignment)


def pack(batch: dict) -> tuple[list, object]:
    """A batch of tensors as one shared-memory uint8 tensor and its layout: one shared-memory
    hand-over per batch instead of one per tensor (each costs a socket round trip to pass a
    file descriptor: ~1 ms, measured as the loader's bottleneck)."""
    import torch

    layout, offset = [], 0
    for key, tensor in batch.items():
        layout.append((key, tensor.dtype, tuple(tensor.shape), offset))
        offset += -(-tensor.numel() * tensor.element_size() // ALIGN) * ALIGN
    buffer = torch.empty(max(offset, 1), dtype=torch.uint8).share_memory_()
    for (_, dtype, shape, start), tensor in zip(layout, batch.values()):
        size = tensor.numel() * tensor.element_size()
        buffer[start : start + size].view(dtype).view(shape).copy_(tensor)
    return layout, buffer


def unpack(layout: list, buffer) -> dict:
    """The batch's tensors as views into the shared buffer (no copy)."""
    import math

    out = {}
    for key, dtype, shape, start in layout:
        size = math.prod(shape) * dtype.itemsize
        out[key] = buffer[start : start + size].view(dtype).view(shape)
    return out


def _share_of_pool(pool, first_batch: int, worker: int, n: int) -> dict[str, np.ndarray]:
    """The rows of `pool` (PoolRows) in the batches process `worker` builds: batch
    `first_batch + j` of the epoch is the pool's j-th and goes to process (first_batch + j) % n."""
    mine = [j for j in range(pool.batches) if (first_batch + j) % n == worker]
    index = np.concatenate([np.arange(j * pool.batch_size, (j + 1) * pool.batch_size) for j in mine] or [[]])
    index = index.astype(np.int64)
    return {k: v[index] for k, v in pool.rows.items()}


def _serve(maker, tasks, results, parent_pid: int) -> None:
    """A loader process: build the batches it is sent until told to stop or orphaned."""
    import torch

    torch.set_num_threads(1)  # one core per process: the parallelism is the processes
    while True:
        try:
            task = tasks.get(timeout=PARENT_POLL_S)
        except queue.Empty:
            if os.getppid() != parent_pid:  # the training process is gone
                return
            continue
        if task is _STOP:
            return
        kind, seq, payload = task
        try:
            if kind == RESET:
                maker.reset()
            elif kind == POOL:
                maker.set_pool(payload)
            else:
                rows, epoch = payload
                results.put((seq, pack(maker.make(rows, epoch))))
        except BaseException as exc:  # handed to the training process, raised there
            if kind == BATCH:
                results.put((seq, _picklable(exc)))
            else:
                results.put((_FAILED, _picklable(exc)))


def _picklable(exc: BaseException) -> BaseException:
    import pickle

    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")


def _stop(procs, tasks) -> None:
    for q in tasks:
        try:
            q.put(_STOP)
        except (OSError, ValueError):
            pass
    for proc in procs:
        proc.join(timeout=5)
        if proc.is_alive():
            proc.terminate()
            proc.join(timeout=5)
