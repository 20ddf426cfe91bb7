"""Student batches from the teacher cache.

Each training worker owns a fixed subset of cache shards (shard i goes to rank
i % world_size). Per epoch it picks one of the first K cached views for each shard (seeded
by seed, epoch and shard; K = ``cache_views``, default all V; with ``exclude_view0`` views
1..K, the augmented ones only) and reads only that view's
unit, and of it only the teacher fields the enabled loss terms need: 1/V of the cache's
bytes and decode work, one whole unit at a time (sequential reads are 25-30x faster than
per-row gets). It rebuilds the student's crop from the stored view parameters (or decodes
the stored JPEG crop), and shuffles within a buffer of shards.

Why one view per shard is as random as one view per instance, in effect: each instance
still sees a uniformly random view (of K) each epoch, independently across epochs. Views
with the same index of different instances are independent draws (``distilpose.data.views``
seeds each by (seed, instance, view)), so instances of a shard sharing the index share no
augmentation. The one exception is view 0, the un-augmented view: a shard now gets it for
all its instances or for none in an epoch (on average still 1/K of the time). Batches mix
``shuffle_shards`` shards, so a batch holds several independently chosen views.

Every rank yields the same number of batches per epoch (DDP would hang otherwise): the
count is computed from the manifest, which all ranks share.

A cache built with `--token-views Vt` stores the token fields for views 0..Vt-1 only. When the
loss reads tokens and the drawn views include later ones, a shard read in such a view gets
zero placeholders for its token rows and a per-row flag; the batch then carries
`token_weight` 0 for those samples (times the label-side flip's mask), so L_KT / L_VT never
see a placeholder as a target.

With `prefetch` > 0, batches are built that many ahead in a background thread (decode,
warp and the teacher fields' dequantisation release the GIL), so on a GPU worker the next
batch is prepared while the current step runs. The order is the same with or without it.
On a worker with one CPU the thread only competes with the step (measured 15% slower on
the demo), hence off there (see `DistillConfig.prefetch`). With `pin_memory` (GPU workers)
each batch is page-locked in that thread, so the step's `non_blocking` copy is asynchronous.

The epoch is planned from the manifest alone (`CachedViewStream._pools`: which units each
shuffle pool reads, the seeded order of its rows), so the work can be split: with
`processes` > 0 (`--loader-processes`) N processes read the units and build the batches
(`pipeline.loader_processes`), with the same rows gathered by the same code (`take_rows`,
`BatchMaker`) as in the training process.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field

import numpy as np
import torch

from distilpose.data.coco import read_image
from distilpose.data.pool_crops import PoolCrops
from distilpose.device import pin_batch
from distilpose.errors import UserError
from distilpose.label_flip import flip_heatmaps, flip_joints, label_flips
from pipeline.cache.encodings import decode_crop_jpeg, decode_fields
from pipeline.cache.schema import HEATMAP_FIELD, TOKEN_FIELDS, CacheSpec, arrays_for_fields
from pipeline.loader_processes import LoaderProcesses
from pipeline.student_batch import student_batch

# Fields always read: the student's input view and its regression target.
BASE_FIELDS = ("instance_id", "image_id", "view", "view_params", "joints", "joint_weights")
# Per-row flag in the shuffle pool (not a cache field): the row's view stores the token fields.
HAS_TOKENS = "_has_tokens"
# What a BatchMaker needs of a whole pool (to decode each source image once for its rows).
POOL_KEYS = ("instance_id", "image_id", "view_params")


@dataclass
class ShardAssignment:
    shards: list[int]
    rows: int


def assign_shards(shard_rows: list[int], rank: int, world_size: int) -> ShardAssignment:
    """Shard positions (in manifest order) owned by `rank`, and how many instances they hold."""
    mine = [i for i in range(len(shard_rows)) if i % world_size == rank]
    return ShardAssignment(shards=mine, rows=sum(shard_rows[i] for i in mine))


def instances_per_shard(reader) -> list[int]:
    return [shard.instances for shard in reader.manifest.shards]


def steps_per_epoch(reader, world_size: int, batch_size: int) -> int:
    """Batches every rank runs per epoch: the smallest rank's share decides (DDP lockstep)."""
    counts = instances_per_shard(reader)
    if len(counts) < world_size:
        raise UserError(
            f"the cache has {len(counts)} shard(s) for {world_size} workers: a worker would get no data "
            "(shards are the unit each worker reads); use fewer --workers or rebuild the cache with a "
            "smaller --shard-instances"
        )
    per_rank = [assign_shards(counts, r, world_size).rows for r in range(world_size)]
    steps = min(per_rank) // batch_size
    if steps == 0:
        raise UserError(
            f"batch size {batch_size} x {world_size} workers is larger than the smallest worker's share "
            f"({min(per_rank)} instances); lower --batch-size or --workers"
        )
    return steps


def shard_view(seed: int, epoch: int, shard_index: int, num_views: int, first_view: int = 0) -> int:
    """The view every instance of a shard is read in this epoch (uniform over views
    first_view .. first_view + num_views - 1). Seeded by the shard index, not by its position
    or rank: the same on any worker count."""
    return first_view + int(np.random.default_rng([seed, epoch, shard_index, 7919]).integers(num_views))


def resolve_cache_views(cached: int, cache_views: int | None, first_view: int = 0) -> int:
    """K, the views the loader draws from: ``cache_views`` of the ``cached`` ones, starting at
    ``first_view`` (1 skips the un-augmented view 0)."""
    usable = int(cached) - first_view
    if cache_views is None:
        cache_views = usable
    if not 1 <= cache_views <= usable:
        raise UserError(
            f"cache_views={cache_views}: the cache holds {usable} views per instance from view {first_view} on "
            f"(choose 1..{usable})"
        )
    return int(cache_views)


class CachedViewStream:
    """Iterates (batch dict of tensors) for one rank and one epoch."""

    def __init__(
        self,
        reader,
        image_root: str | None,
        image_files: dict[int, str] | None,
        input_size: tuple[int, int],
        teacher_fields: tuple[str, ...],
        rank: int,
        world_size: int,
        batch_size: int,
        seed: int,
        cache_views: int | None = None,
        exclude_view0: bool = False,
        label_flip: bool = False,
        shuffle_shards: int = 4,
        prefetch: int = 0,
        pin_memory: bool = False,
        normalize: bool = True,
        processes: int = 0,
    ):
        self.reader = reader
        self.input_size = tuple(input_size)
        self.teacher_fields = tuple(teacher_fields)
        self.batch_size = batch_size
        self.seed = seed
        self.first_view = 1 if exclude_view0 else 0
        self.views = resolve_cache_views(reader.manifest.views, cache_views, self.first_view)
        # Drawn views without the token fields the loss reads (a cache built with --token-views).
        wants_tokens = any(f in TOKEN_FIELDS for f in self.teacher_fields)
        drawn = range(self.first_view, self.first_view + self.views)
        self.tokenless_views = tuple(v for v in drawn if wants_tokens and not reader.spec.has_tokens(v))
        self.shuffle_shards = shuffle_shards
        self.prefetch = prefetch
        self.pin_memory = pin_memory
        self.processes = processes
        self.assignment = assign_shards(instances_per_shard(reader), rank, world_size)
        self.steps = steps_per_epoch(reader, world_size, batch_size)
        self.use_crops = bool(reader.spec.store_crops)
        if not self.use_crops and image_root is None:
            raise ValueError("the cache stores no crops; the data set's image root is needed to rebuild views")
        self.maker = BatchMaker(
            spec=reader.spec,
            input_size=self.input_size,
            teacher_fields=self.teacher_fields,
            seed=seed,
            label_flip=label_flip,
            use_crops=self.use_crops,
            normalize=normalize,
            image_root=image_root,
            image_files=image_files or {},
        )
        self.shard_reads = ShardReads(reader, self.tokenless_views)
        self.fields = BASE_FIELDS + self.teacher_fields + (("crop_jpeg",) if self.use_crops else ())
        self._pool: LoaderProcesses | None = None  # started on the first epoch that needs it

    @property
    def normalize(self) -> bool:
        return self.maker.normalize

    @normalize.setter
    def normalize(self, value: bool) -> None:
        self.maker.normalize = value

    def epoch(self, epoch: int):
        """This rank's `steps` batches of `epoch`, in a seeded order."""
        if self.processes <= 0:
            return prefetched(self._pinned(self._batches_in_process(epoch)), self.prefetch)
        if self._pool is None:
            self._pool = LoaderProcesses(self.maker, self.shard_reads, self.fields, self.processes, pin=self.pin_memory)
        # The background thread (at least one batch ahead) only plans, hands out the work and
        # copies each batch out of shared memory (into page-locked memory with pin_memory): the
        # processes read the units and build the batches, which come back in order.
        return prefetched(self._pool.batches(self._pools(epoch), epoch), max(self.prefetch, 1))

    def close(self) -> None:
        """Stop the loader processes, if any (also done when the stream is garbage collected)."""
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def _pinned(self, batches):
        # Page-locked where the batches are received (the prefetch thread), so the step's
        # non_blocking copy is asynchronous.
        return (pin_batch(b) for b in batches) if self.pin_memory else batches

    def _batches_in_process(self, epoch: int):
        self.maker.reset()
        reads: dict[int, dict[str, np.ndarray]] = {}
        for pool in self._pools(epoch):
            reads = {r: rows for r, rows in reads.items() if r in pool.carried}  # rows still in the pool
            for read_id, (shard, _) in zip(pool.read_ids, pool.reads):
                reads[read_id] = self._load_shard(shard, self.fields, epoch)
            self.maker.set_pool(take_rows(reads, pool.source, pool.row, POOL_KEYS))
            for j in range(pool.batches):
                yield self.maker.make(take_rows(reads, *pool.batch(j)), epoch)

    def _pools(self, epoch: int):
        """The epoch's shuffle pools (`PoolPlan`), planned from the manifest alone: which units
        each reads and the seeded shuffle of its rows; `steps` batches in all."""
        rng = np.random.default_rng([self.seed, epoch, 104729])
        # Positions in the manifest -> shard indices (indices need not be 0..n-1).
        shard_ids = [self.reader.manifest.shards[i].index for i in self.assignment.shards]
        order = list(rng.permutation(shard_ids))
        emitted = next_read = 0
        carried = (np.zeros(0, np.int64), np.zeros(0, np.int64))  # rows of the last pool not batched
        for group_start in range(0, len(order), self.shuffle_shards):
            reads, sources, rows = [], [carried[0]], [carried[1]]
            for shard in order[group_start : group_start + self.shuffle_shards]:
                view = shard_view(self.seed, epoch, int(shard), self.views, self.first_view)
                n = self.reader.shard_info(int(shard)).unit(view).rows
                reads.append((int(shard), view))
                sources.append(np.full(n, next_read + len(reads) - 1, np.int64))
                rows.append(np.arange(n, dtype=np.int64))
            perm = rng.permutation(sum(len(r) for r in rows))
            source, row = np.concatenate(sources)[perm], np.concatenate(rows)[perm]
            usable = (len(perm) // self.batch_size) * self.batch_size
            batches = min(usable // self.batch_size, self.steps - emitted)
            yield PoolPlan(reads, next_read, source, row, batches, self.batch_size)
            next_read += len(reads)
            emitted += batches
            if emitted == self.steps:
                return
            # Fewer rows than a batch are carried into the next group of shards; this rank's
            # share is at least steps x batch_size rows, so all `steps` batches come out.
            carried = (source[usable:], row[usable:])

    def _load_shard(self, shard: int, fields: tuple[str, ...], epoch: int) -> dict[str, np.ndarray]:
        view = shard_view(self.seed, epoch, shard, self.views, self.first_view)
        return self.shard_reads.read(shard, view, fields)


@dataclass
class ShardReads:
    """One unit's rows as the loader reads them: raw (encoded) arrays, so the pools hold
    int8/fp16 bytes and each batch decodes only its own rows (2-4x less memory traffic than
    decoding the shard). A view without the token fields the loss reads (a cache built with
    --token-views) gets zero placeholders and a per-row flag (masked in `BatchMaker.make`).
    Picklable: loader processes read with it too."""

    reader: object  # pipeline.cache.CacheReader
    tokenless_views: tuple[int, ...] = ()

    def read(self, shard: int, view: int, fields: tuple[str, ...]) -> dict[str, np.ndarray]:
        if not self.tokenless_views:
            return self.reader.read_shard(shard, fields=list(fields), view=view, decode=False)
        has_tokens = view not in self.tokenless_views
        read = fields if has_tokens else tuple(f for f in fields if f not in TOKEN_FIELDS)
        rows = self.reader.read_shard(shard, fields=list(read), view=view, decode=False)
        n = len(rows["instance_id"])
        if not has_tokens:  # zero placeholders: every read of a pool has the same arrays
            for name, array in arrays_for_fields(self.reader.spec, [f for f in fields if f in TOKEN_FIELDS]).items():
                rows[name] = np.zeros((n, *array.shape), dtype=array.dtype)
        rows[HAS_TOKENS] = np.full(n, has_tokens)
        return rows


@dataclass
class PoolPlan:
    """One shuffle pool: the units it reads, (shard, view) in order, numbered `read_ids` in the
    epoch, and for each of its rows in the shuffled order the read it comes from (`source`)
    and its row there. Rows not batched in a pool are `carried` into the next one (the read ids
    they come from). The first `batches` x `batch_size` rows are cut into the batches."""

    reads: list[tuple[int, int]]
    first_read: int
    source: np.ndarray
    row: np.ndarray
    batches: int
    batch_size: int

    @property
    def read_ids(self) -> range:
        return range(self.first_read, self.first_read + len(self.reads))

    @property
    def carried(self) -> set[int]:
        """Read ids of earlier pools that some of this pool's rows come from."""
        return set(np.unique(self.source[self.source < self.first_read]).tolist())

    def batch(self, j: int) -> tuple[np.ndarray, np.ndarray]:
        """(source, row) of the pool's j-th batch."""
        cut = slice(j * self.batch_size, (j + 1) * self.batch_size)
        return self.source[cut], self.row[cut]


def take_rows(reads: dict[int, dict[str, np.ndarray]], source: np.ndarray, row: np.ndarray, keys=None):
    """The rows (`source` read id, `row` in it) gathered from `reads`, field by field."""
    ids, which = np.unique(source, return_inverse=True)
    first = reads[int(ids[0])]
    out = {}
    for key in keys or first:
        out[key] = np.empty((len(source), *first[key].shape[1:]), dtype=first[key].dtype)
        for i, read_id in enumerate(ids.tolist()):
            mask = which == i
            out[key][mask] = reads[read_id][key][row[mask]]
    return out


@dataclass
class BatchMaker:
    """Builds a batch from its cache rows: the crops (decoded stored JPEGs, or rebuilt from the
    source images, each decoded once per pool: `PoolCrops`), the teacher fields decoded for
    the batch, the label-side flip and the token mask. Picklable, so loader processes
    (`pipeline.loader_processes`) run the same code on the rows the stream hands them."""

    spec: CacheSpec
    input_size: tuple[int, int]
    teacher_fields: tuple[str, ...]
    seed: int
    label_flip: bool
    use_crops: bool
    normalize: bool = True  # False: uint8 images, normalized on the device (student_batch.on_device)
    image_root: str | None = None
    image_files: dict[int, str] = field(default_factory=dict)
    pool_crops: PoolCrops | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.pool_crops = PoolCrops(self.read_image, self.input_size)  # rebuilt crops: one decode per image

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["pool_crops"] = None  # per process: rebuilt there (it holds decoded crops and a bound method)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.__post_init__()

    def reset(self) -> None:
        self.pool_crops.reset()

    def set_pool(self, pool: dict[str, np.ndarray]) -> None:
        """The rows the next batches are cut from (`POOL_KEYS` of them; the crops of rows that
        share a source image are warped from one decode)."""
        if not self.use_crops:
            self.pool_crops.set_pool(pool["instance_id"], pool["image_id"], pool["view_params"])

    def make(self, rows: dict[str, np.ndarray], epoch: int) -> dict[str, torch.Tensor]:
        """One batch from its rows (raw, encoded as read from the cache)."""
        crops = np.stack([self.crop(rows, i) for i in range(len(rows["instance_id"]))])
        w = self.input_size[1]
        joints, weights = rows["joints"].astype(np.float32), rows["joint_weights"].astype(np.float32)
        fields = self.teacher_arrays(rows)
        flips = None
        if self.label_flip:
            flips = label_flips(self.seed, epoch, rows["instance_id"])
            crops[flips] = crops[flips, :, ::-1]
            joints[flips], weights[flips] = flip_joints(joints[flips], weights[flips], w)
            if HEATMAP_FIELD in fields:
                fields[HEATMAP_FIELD][flips] = flip_heatmaps(fields[HEATMAP_FIELD][flips], w)
        # Tokens do not follow a flip: their losses are masked for the mirrored samples, and for
        # the samples of views the cache stores no tokens for (their rows are placeholders).
        token_weight = None
        if any(f in fields for f in TOKEN_FIELDS) and (flips is not None or HAS_TOKENS in rows):
            token_weight = np.ones(len(rows["instance_id"]), np.float32)
            if flips is not None:
                token_weight *= ~flips
            if HAS_TOKENS in rows:
                token_weight *= rows[HAS_TOKENS]
                for name in TOKEN_FIELDS:
                    if name in fields:
                        fields[name][~rows[HAS_TOKENS]] = 0.0
        return student_batch(
            crops,
            joints,
            weights,
            rows["instance_id"],
            self.input_size,
            teacher_fields=fields,
            token_weight=token_weight,
            normalize=self.normalize,
        )

    def teacher_arrays(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The batch's teacher fields, float32. Decoded row by row: the values a whole-shard
        decode gives."""
        decoded = decode_fields(rows, self.spec, self.teacher_fields)
        return {key: np.asarray(value, dtype=np.float32) for key, value in decoded.items()}

    def crop(self, rows: dict[str, np.ndarray], i: int) -> np.ndarray:
        if self.use_crops:
            return decode_crop_jpeg(rows["crop_jpeg"][i])
        return self.pool_crops.crop(rows["instance_id"][i], rows["image_id"][i], rows["view_params"][i])

    def read_image(self, image_id: int) -> np.ndarray:
        return read_image(self.image_root, self.image_files[image_id])


class RecentImages:
    """The last `capacity` decoded images by id (oldest dropped first): persons of one image
    come one after another, so each image is decoded about once per epoch."""

    def __init__(self, image_root: str | None, capacity: int = 64):
        self.image_root = image_root
        self.capacity = capacity
        self._images: dict[int, np.ndarray] = {}

    def get(self, image_id: int, file_name: str) -> np.ndarray:
        if image_id not in self._images:
            if len(self._images) >= self.capacity:
                self._images.pop(next(iter(self._images)))
            self._images[image_id] = read_image(self.image_root, file_name)
        return self._images[image_id]


_DONE = object()


def prefetched(batches, depth: int):
    """`batches`, built up to `depth` ahead in a background thread when `depth` > 0."""
    return _prefetched(batches, depth) if depth > 0 else batches


def _prefetched(batches, depth: int):
    """Iterate `batches` with a background thread keeping up to `depth` items ready.

    An exception in the producer is re-raised here; a consumer that stops early (or raises)
    stops the producer instead of leaving it blocked on a full queue.
    """
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for batch in batches:
                if not put(batch):
                    return
            put(_DONE)
        except BaseException as exc:  # handed to the consumer, raised there
            put(exc)

    thread = threading.Thread(target=produce, name="cache-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = ready.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join(timeout=10)
