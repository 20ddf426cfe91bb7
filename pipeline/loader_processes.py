"""Loader processes: a training worker's batches read and built in N processes, in the same order.

One loader thread feeds several hundred samples/s (decode, warp and normalize hold the GIL
for part of their time), a GPU wants thousands. Here N worker processes do all of the
loader's work: reading the view units (zstd decompression of the teacher fields and crops:
about half of the loader's CPU with stored crops, measured) and building the batches, a pure function of a
batch's cache rows (`pipeline.cache_loader.BatchMaker`). The training process only plans (the
seeded shuffle needs nothing but the manifest: `CachedViewStream._pools`), hands out the
work and puts the batches back in order, so its share per sample is small and the
throughput grows with the processes until the cores run out.

Work flows through shared memory, never a pipe copy of the data: read i of an epoch goes to
process i % N, which returns the unit's rows as one shared buffer; the training process
passes every buffer of a shuffle pool to all processes (a file descriptor each, no copy),
one pool ahead so the reads overlap the batches. Batch i of the epoch goes to process i % N
as (read, row) indices; the process gathers the rows, builds the batch (a source image is
decoded once per process and pool: `PoolCrops` gets the process's share of the pool) and
returns it as one shared buffer. The batches are the ones the in-process loader builds,
bitwise: same rows, same code, seeds that do not depend on the process.

Why own processes and not torch's DataLoader workers or Ray Data: a DataLoader worker reads
whole units itself (each pool N times) or per row (25-30x slower), and the batch order would
come from its round robin rather than from the plan; Ray Data streaming into Train re-plans
the shuffle (the cache's seeded, resumable order would be lost) and costs seconds of start-up
per epoch on a small worker. Here a worker process costs one interpreter start (the imports)
per run.

Processes are started with "spawn" (a Ray worker has threads; fork would copy their locks)
and stop when the stream closes, when the parent goes away (each polls its parent), or at
interpreter exit.
"""

from __future__ import annotations

import os
import queue
import weakref

import numpy as np

RESET, READ, POOL, BATCH = "reset", "read", "pool", "batch"
_STOP = None
_FAILED = "failed"  # key of an error outside a batch or a read
PARENT_POLL_S = 1.0  # how often an idle worker process checks that its parent is alive


class LoaderProcesses:
    """N processes reading units with one ShardReads and building batches with copies of one
    BatchMaker; `batches(pools, epoch)` yields the pools' batches in order.

    Shared buffers are reused (a new one costs ~1 ms per MB in page faults, 25x a copy into
    one already mapped: measured): each process keeps slots for its reads and its batches,
    and the training process hands a slot back once nothing will read it again: a batch's
    when it is copied out, a read's when every batch of the last pool using it is back."""

    def __init__(
        self, maker, reads, fields: tuple[str, ...], processes: int, in_flight_per_process: int = 2, pin: bool = False
    ):
        import torch.multiprocessing as mp

        if processes < 1:
            raise ValueError(f"loader processes must be >= 1, got {processes}")
        ctx = mp.get_context("spawn")
        self.n = processes
        self.in_flight = in_flight_per_process * processes
        self.pin = pin
        self.results = ctx.Queue()
        self.tasks = [ctx.Queue() for _ in range(processes)]
        self.returned = [ctx.Queue() for _ in range(processes)]  # (READ or BATCH, slot) free again
        self.buffers: dict[tuple, object] = {}  # (kind, process, slot) -> its shared buffer
        self.generation = 0  # one per batches() call: what an abandoned epoch left behind is dropped
        self.procs = [
            ctx.Process(
                target=_serve,
                args=(maker, reads, tuple(fields), self.tasks[i], self.returned[i], self.results, os.getpid()),
                name=f"loader-{i}",
                daemon=True,
            )
            for i in range(processes)
        ]
        for proc in self.procs:
            proc.start()
        self._finalizer = weakref.finalize(self, _stop, self.procs, self.tasks)

    def batches(self, pools, epoch: int):
        """Run `pools` (pipeline.cache_loader.PoolPlan, in order) through the processes: each
        pool's reads are handed out one pool ahead (read i to process i % N), then its batches
        (batch i of the epoch to process i % N)."""
        self.generation += 1
        gen = self.generation
        self._waiting: dict = {}  # (kind, id) -> what came back, out of order
        held: dict[int, tuple] = {}  # read id -> (process, slot, layout) while a pool uses it
        shared: set[tuple] = set()  # (process, slot) of read buffers every process has mapped
        releases: list[tuple[int, list[tuple]]] = []  # (batches back, read slots then free)
        sent = received = 0
        for q in self.tasks:
            q.put((RESET, gen, None, None))
        pools = iter(pools)
        pool = next(pools, None)
        if pool is not None:
            self._read(pool, gen)
        while pool is not None:
            upcoming = next(pools, None)
            if upcoming is not None:  # read ahead: the next pool's units load while this one is batched
                self._read(upcoming, gen)
            needed = pool.carried | set(pool.read_ids)
            for read_id in pool.read_ids:
                layout, slot, buffer = self._take((READ, read_id), gen)
                owner = read_id % self.n
                if buffer is not None:  # a new or larger buffer in that slot
                    self.buffers[(READ, owner, slot)] = buffer
                    shared.discard((owner, slot))
                held[read_id] = (owner, slot, layout)
            # Reads no later pool uses are free once this pool's predecessors' batches are back.
            releases.append((sent, [held.pop(r)[:2] for r in sorted(held) if r not in needed]))
            new = {}
            for r in sorted(needed):
                owner, slot, layout = held[r]
                key = (owner, slot)
                new[r] = (key, layout, None if key in shared else self.buffers[(READ, owner, slot)])
            shared |= {held[r][:2] for r in needed}
            for i, q in enumerate(self.tasks):
                q.put((POOL, gen, None, (new, _share_of_pool(pool, sent, i, self.n))))
            for j in range(pool.batches):
                self.tasks[sent % self.n].put((BATCH, gen, sent, (pool.batch(j), epoch)))
                sent += 1
                while sent - received >= self.in_flight:  # bounded: at most in_flight batches built ahead
                    yield self._batch(received, gen)
                    received += 1
                    self._release(releases, received)
            pool = upcoming
        while received < sent:
            yield self._batch(received, gen)
            received += 1
            self._release(releases, received)
        releases.append((sent, [value[:2] for value in held.values()]))
        self._release(releases, received)

    def _read(self, pool, gen: int) -> None:
        for read_id, (shard, view) in zip(pool.read_ids, pool.reads):
            self.tasks[read_id % self.n].put((READ, gen, read_id, (shard, view)))

    def _release(self, releases: list, received: int) -> None:
        while releases and releases[0][0] <= received:
            for owner, slot in releases.pop(0)[1]:
                self.returned[owner].put((READ, slot))

    def _batch(self, seq: int, gen: int) -> dict:
        """Batch `seq` copied out of its process's buffer (into page-locked memory with `pin`),
        and the slot handed back for the process's next batch."""
        layout, slot, buffer = self._take((BATCH, seq), gen)
        process = seq % self.n
        if buffer is not None:
            self.buffers[(BATCH, process, slot)] = buffer
        import torch

        used = max((start + _nbytes(dtype, shape) for _, dtype, shape, start in layout), default=0)
        own = torch.empty(used, dtype=torch.uint8, pin_memory=self.pin)
        own.copy_(self.buffers[(BATCH, process, slot)][:used])
        self.returned[process].put((BATCH, slot))
        return unpack(layout, own)

    def _take(self, key: tuple, gen: int):
        """What came back for `key` ((READ, id) or (BATCH, seq)) of generation `gen`, waiting for it."""
        while key not in self._waiting:
            try:
                got_gen, got, item = self.results.get(timeout=PARENT_POLL_S)
            except queue.Empty:
                dead = [p.name for p in self.procs if not p.is_alive()]
                if dead:
                    names = ", ".join(dead)
                    raise RuntimeError(f"loader process(es) {names} exited (killed, or out of memory?)") from None
                continue
            if got_gen != gen:  # left by an epoch abandoned early: its slots are free
                if isinstance(item, tuple):
                    (kind, ident), (_, slot, buffer) = got, item
                    if buffer is not None:
                        self.buffers[(kind, ident % self.n, slot)] = buffer
                    self.returned[ident % self.n].put((kind, slot))
                continue
            if got == _FAILED:  # a pool or reset failed: the batches after it cannot be built
                raise item
            self._waiting[got] = item
        item = self._waiting.pop(key)
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self._finalizer()


ALIGN = 64  # bytes: every array of a packed batch starts at a multiple (any dtype's alignment)


def layout_of(tensors: dict) -> tuple[list, int]:
    """Where each tensor goes in one uint8 buffer: [(key, dtype, shape, start)], and the size."""
    layout, offset = [], 0
    for key, tensor in tensors.items():
        layout.append((key, tensor.dtype, tuple(tensor.shape), offset))
        offset += -(-tensor.numel() * tensor.element_size() // ALIGN) * ALIGN
    return layout, max(offset, 1)


def pack(tensors: dict, layout: list, buffer) -> None:
    """Tensors copied into one shared-memory uint8 buffer at `layout` (`layout_of`): one
    shared-memory hand-over instead of one per tensor (each costs a socket round trip to pass
    a file descriptor)."""
    for (_, dtype, shape, start), tensor in zip(layout, tensors.values()):
        buffer[start : start + _nbytes(dtype, shape)].view(dtype).view(shape).copy_(tensor)


def _nbytes(dtype, shape) -> int:
    import math

    return math.prod(shape) * dtype.itemsize


def unpack(layout: list, buffer) -> dict:
    """The batch's tensors as views into the shared buffer (no copy)."""
    out = {}
    for key, dtype, shape, start in layout:
        out[key] = buffer[start : start + _nbytes(dtype, shape)].view(dtype).view(shape)
    return out


def _share_of_pool(pool, first_batch: int, worker: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(source, row) of the rows of `pool` (PoolPlan) in the batches process `worker` builds:
    batch `first_batch + j` of the epoch is the pool's j-th and goes to process (first_batch + j) % n."""
    mine = [j for j in range(pool.batches) if (first_batch + j) % n == worker]
    index = np.concatenate([np.arange(j * pool.batch_size, (j + 1) * pool.batch_size) for j in mine] or [[]])
    index = index.astype(np.int64)
    return pool.source[index], pool.row[index]


BYTES_DATA, BYTES_OFFSETS = "|bytes", "|offsets"  # a bytes field (object array) as two arrays


def pack_rows_tensors(rows: dict[str, np.ndarray]) -> dict:
    """Cache rows (numpy, a bytes field as an object array) as tensors to `pack`: a bytes
    field becomes its concatenated bytes and offsets."""
    import torch

    tensors = {}
    for key, array in rows.items():
        if array.dtype == object:
            lengths = np.fromiter((len(b) for b in array), dtype=np.int64, count=len(array))
            tensors[key + BYTES_OFFSETS] = torch.from_numpy(np.concatenate([[0], np.cumsum(lengths)]))
            tensors[key + BYTES_DATA] = torch.frombuffer(bytearray(b"".join(array)) or bytearray(1), dtype=torch.uint8)
        else:
            tensors[key] = torch.from_numpy(np.ascontiguousarray(array))
    return tensors


def unpack_rows(layout: list, buffer) -> dict[str, np.ndarray]:
    """Packed `pack_rows_tensors` undone: numpy views into the shared buffer, bytes fields as object arrays."""
    from pipeline.cache.encodings import bytes_array

    tensors = unpack(layout, buffer)
    rows = {}
    for key, tensor in tensors.items():
        if key.endswith(BYTES_OFFSETS):
            name = key[: -len(BYTES_OFFSETS)]
            offsets, blob = tensor.tolist(), tensors[name + BYTES_DATA].numpy().tobytes()
            rows[name] = bytes_array([blob[a:b] for a, b in zip(offsets[:-1], offsets[1:])])
        elif not key.endswith(BYTES_DATA):
            rows[key] = tensor.numpy()
    return rows


BATCH_SLOTS = 3  # batch buffers per process: one more than its batches in flight (2)


def _serve(maker, reads, fields, tasks, returned, results, parent_pid: int) -> None:
    """A loader process: read the units and build the batches it is sent until told to stop
    or orphaned."""
    import torch

    from pipeline.cache_loader import POOL_KEYS, take_rows

    torch.set_num_threads(1)  # one core per process: the parallelism is the processes
    slots = Slots(returned, parent_pid)
    mapped: dict[tuple, object] = {}  # (owner, slot) -> a read buffer of any process
    pool: dict[int, dict[str, np.ndarray]] = {}  # read id -> rows, of the current pool
    while True:
        try:
            task = tasks.get(timeout=PARENT_POLL_S)
        except queue.Empty:
            if os.getppid() != parent_pid:  # the training process is gone
                return
            continue
        if task is _STOP:
            return
        kind, gen, seq, payload = task
        try:
            if kind == RESET:
                maker.reset()
                pool = {}
            elif kind == READ:
                shard, view = payload
                results.put((gen, (READ, seq), slots.pack(READ, pack_rows_tensors(reads.read(shard, view, fields)))))
            elif kind == POOL:
                new, (source, row) = payload
                for key, _, buffer in new.values():
                    if buffer is not None:
                        mapped[key] = buffer
                pool = {r: unpack_rows(layout, mapped[key]) for r, (key, layout, _) in new.items()}
                maker.set_pool(take_rows(pool, source, row, POOL_KEYS) if len(source) else {k: () for k in POOL_KEYS})
            else:
                (source, row), epoch = payload
                results.put((gen, (BATCH, seq), slots.pack(BATCH, maker.make(take_rows(pool, source, row), epoch))))
        except BaseException as exc:  # handed to the training process, raised there
            key = (kind, seq) if kind in (READ, BATCH) else _FAILED
            results.put((gen, key, _picklable(exc)))


class Slots:
    """A loader process's reusable shared buffers, per kind (READ, BATCH): a slot is free again
    when the training process hands it back on `returned`. A read never waits for a slot (a new
    one is made; their number stays bounded by the pools in flight); a batch waits when its
    `BATCH_SLOTS` are all in use (the training process frees one per batch it takes)."""

    def __init__(self, returned, parent_pid: int):
        self.returned = returned
        self.parent_pid = parent_pid
        self.buffers: dict[str, list] = {READ: [], BATCH: []}
        self.free: dict[str, list[int]] = {READ: [], BATCH: []}

    def pack(self, kind: str, tensors: dict) -> tuple[list, int, object]:
        """(layout, slot, the slot's buffer if it is new: the training process has not seen it)."""
        import torch

        self._collect(block=False)
        if kind == BATCH and not self.free[kind] and len(self.buffers[kind]) == BATCH_SLOTS:
            self._collect(block=True, kind=kind)
        buffers, free = self.buffers[kind], self.free[kind]
        if free:
            slot = free.pop()
        else:
            slot = len(buffers)
            buffers.append(None)
        layout, size = layout_of(tensors)
        new = None
        if buffers[slot] is None or buffers[slot].numel() < size:
            # A new shared buffer costs ~1 ms per MB in page faults, 25x a copy into one
            # already mapped (measured): hence the slots.
            buffers[slot] = new = torch.empty(size, dtype=torch.uint8).share_memory_()
        pack(tensors, layout, buffers[slot])
        return layout, slot, new

    def _collect(self, block: bool, kind: str | None = None) -> None:
        """Take the slots handed back; with `block`, until one of `kind` is free (checking on
        the parent)."""
        while True:
            try:
                got_kind, slot = self.returned.get(timeout=PARENT_POLL_S) if block else self.returned.get_nowait()
                self.free[got_kind].append(slot)
                if got_kind == kind:
                    block = False
            except queue.Empty:
                if not block:
                    return
                if os.getppid() != self.parent_pid:  # the training process is gone
                    raise SystemExit(0) from None


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
