"""Student batches with a fresh augmentation every epoch: the official (mmpose) data flow,
for the online-teacher baseline (`--online-teacher P`, `--online-views fresh`).

The cache replays V fixed views per instance; the official code draws a new random view
(flip, half-body, scale, rotation) of every instance every epoch and the teacher sees that
crop. This stream does the same over the cache's own instances, so a fresh-view run and a
cached run train on the same people:

- instances: the ids in the cache's id columns (what the cache job kept, after `--limit`
  and unreadable images), with their boxes and joints from the cache's annotation file
  (the id column is a small read in Zarr; in WebDataset it costs one pass over the rank's
  shards when the worker starts);
- ranks: each rank takes the instances of the shards the cache mode gives it (shard i goes
  to rank i % world size), so it runs the same number of steps per epoch as the cache mode
  (`cache_loader.steps_per_epoch`, the same on every rank: DDP lockstep);
- views: drawn with the training augmentation from a generator seeded by (seed, epoch,
  instance id), so a crop does not depend on the rank, the world size or the order, and a
  resumed run redraws the same crops (`distilpose.data.views.fresh_view`: the cached views and
  the fresh ones are drawn by one seeded-view function there, with seeds kept apart).

Batches hold what a `CachedViewStream` batch holds minus the teacher fields (the online
teacher computes them from `image`).
"""

from __future__ import annotations

import numpy as np
import torch

from distilpose.data.coco import Instance, load_instances
from distilpose.data.transforms import AugmentConfig, apply_view
from distilpose.data.views import fresh_view
from distilpose.errors import UserError
from pipeline.cache_loader import RecentImages, assign_shards, instances_per_shard, prefetched, steps_per_epoch
from pipeline.student_batch import student_batch


def rank_instance_ids(reader, rank: int, world_size: int) -> np.ndarray:
    """Sorted ids of the instances in the cache shards `rank` owns (only the id column of
    each shard's view 0 is read: every view unit holds all of the shard's instances)."""
    owned = assign_shards(instances_per_shard(reader), rank, world_size).shards
    ids = [reader.read_shard(reader.manifest.shards[i].index, ["instance_id"], view=0)["instance_id"] for i in owned]
    return np.unique(np.concatenate(ids)).astype(np.int64) if ids else np.zeros(0, np.int64)


def instances_with_ids(ann_file: str, ids: np.ndarray, input_size: tuple[int, int]) -> list[Instance]:
    """The annotation file's instances with these ids, loaded as the cache job loads them."""
    instances, _ = load_instances(ann_file, split_kind="train", input_size=input_size)
    by_id = {inst.instance_id: inst for inst in instances}
    missing = [int(i) for i in ids if int(i) not in by_id]
    if missing:
        raise UserError(
            f"{len(missing)} cached instance(s) are not in {ann_file} (first ids {missing[:5]}); "
            "fresh views need the annotation file the cache was built from"
        )
    return [by_id[int(i)] for i in ids]


class FreshViewStream:
    """Iterates (batch dict of tensors) for one rank and one epoch, a fresh view per instance."""

    def __init__(
        self,
        instances: list[Instance],
        image_root: str,
        input_size: tuple[int, int],
        steps: int,
        batch_size: int,
        seed: int,
        aug: AugmentConfig | None = None,
        prefetch: int = 0,
        pin_memory: bool = False,
    ):
        if len(instances) < steps * batch_size:
            raise ValueError(f"{len(instances)} instances cannot fill {steps} batches of {batch_size}")
        self.instances = sorted(instances, key=lambda inst: inst.instance_id)  # the order is the seed's alone
        self.image_root = image_root
        self.input_size = (int(input_size[0]), int(input_size[1]))
        self.steps = steps
        self.batch_size = batch_size
        self.seed = seed
        self.aug = aug or AugmentConfig()
        self.prefetch = prefetch
        self.pin_memory = pin_memory
        self._images = RecentImages(image_root)

    def epoch(self, epoch: int):
        """This rank's `steps` batches of `epoch`, in a seeded order."""
        return prefetched(self._batches(epoch), self.prefetch)

    def close(self) -> None:
        """Nothing to stop (the batches are built in the training process); as CachedViewStream."""

    def _batches(self, epoch: int):
        order = np.random.default_rng([self.seed, epoch, 104729]).permutation(len(self.instances))
        for step in range(self.steps):
            picked = order[step * self.batch_size : (step + 1) * self.batch_size]
            yield self._make_batch([self.instances[i] for i in picked], epoch)

    def _make_batch(self, instances: list[Instance], epoch: int) -> dict[str, torch.Tensor]:
        crops, joints = [], []
        for inst in instances:
            view = fresh_view(inst, self.seed, epoch, self.input_size, self.aug)
            crop, joints_crop = apply_view(self._image(inst), inst.joints, view, self.input_size)
            crops.append(crop)
            joints.append(joints_crop)
        joints = np.stack(joints)
        ids = np.array([inst.instance_id for inst in instances], dtype=np.int64)
        return student_batch(
            np.stack(crops), joints[:, :, :2], joints[:, :, 2], ids, self.input_size, pin_memory=self.pin_memory
        )

    def _image(self, inst: Instance) -> np.ndarray:
        # Several persons share an image (and a small data set has few): recent ones stay decoded.
        return self._images.get(inst.image_id, inst.image_file)


def fresh_stream_for_rank(
    reader,
    ann_file: str,
    image_root: str,
    input_size: tuple[int, int],
    rank: int,
    world_size: int,
    batch_size: int,
    seed: int,
    prefetch: int = 0,
    pin_memory: bool = False,
) -> FreshViewStream:
    """This rank's fresh-view stream over its share of the cache's instances."""
    ids = rank_instance_ids(reader, rank, world_size)
    return FreshViewStream(
        instances_with_ids(ann_file, ids, input_size),
        image_root=image_root,
        input_size=input_size,
        steps=steps_per_epoch(reader, world_size, batch_size),
        batch_size=batch_size,
        seed=seed,
        prefetch=prefetch,
        pin_memory=pin_memory,
    )
