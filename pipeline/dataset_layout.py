"""Where a split's annotation file and images live under a data set root.

Two layouts are understood, so the real COCO tree and our synthetic one work unchanged:

    COCO 2017:  annotations/person_keypoints_train2017.json   train2017/
    synthetic:  annotations/person_keypoints_train.json       images/train/

Either can be overridden with explicit paths (`--ann-file`, `--images`).
"""

from __future__ import annotations

from dataclasses import dataclass

from distilpose.data.coco import split_layouts
from pipeline import storage


@dataclass(frozen=True)
class DatasetLayout:
    root: str
    split: str
    ann_file: str
    image_root: str


def resolve_layout(root: str, split: str, ann_file: str | None = None, images: str | None = None) -> DatasetLayout:
    # Absolute local paths: the layout is recorded in cache manifests and read by Ray
    # workers, whose working directory is not the driver's.
    root, ann_file, images = (storage.absolute(u) if u else u for u in (root, ann_file, images))
    layouts = split_layouts(root, split)
    ann_candidates = [ann for ann, _ in layouts]
    image_candidates = [image_root for _, image_root in layouts]
    ann = ann_file or next((c for c in ann_candidates if storage.exists(c)), None)
    if ann is None:
        tried = ", ".join(ann_candidates)
        raise FileNotFoundError(f"no annotation file for split '{split}' under {root} (tried {tried}); pass --ann-file")
    img = images or next((c for c in image_candidates if storage.exists(c)), None)
    if img is None:
        tried = ", ".join(image_candidates)
        raise FileNotFoundError(f"no image folder for split '{split}' under {root} (tried {tried}); pass --images")
    return DatasetLayout(root=root, split=split, ann_file=ann, image_root=img)
