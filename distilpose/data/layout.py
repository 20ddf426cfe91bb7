"""Where a split's annotation file and images live under a data set root (local or s3://).

Two layouts are understood, so the real COCO tree and the synthetic one work unchanged:

    synthetic:  annotations/person_keypoints_train.json       images/train/
    COCO 2017:  annotations/person_keypoints_train2017.json   train2017/

Either path can be given explicitly instead (`--ann-file`, `--images`).
"""

from __future__ import annotations

from dataclasses import dataclass

from distilpose import fileio
from distilpose.data.coco import join_uri


@dataclass(frozen=True)
class SplitFiles:
    ann_file: str
    image_root: str


def split_layouts(root: str, split: str) -> list[tuple[str, str]]:
    """(annotation file, image folder) of `split` under a data set root, in the order tried."""
    return [
        (join_uri(root, f"annotations/person_keypoints_{split}.json"), join_uri(root, f"images/{split}")),
        (join_uri(root, f"annotations/person_keypoints_{split}2017.json"), join_uri(root, f"{split}2017")),
    ]


def uri_exists(uri: str) -> bool:
    return fileio.exists(uri)


def split_files(root: str, split: str, ann_file: str | None = None, images: str | None = None) -> SplitFiles:
    """Annotation file and image folder of `split`: the first layout under `root` that has
    both, so the two never come from different layouts. `ann_file` / `images` replace the
    layout's own path."""
    layouts = [(ann_file or ann, images or image_root) for ann, image_root in split_layouts(root, split)]
    for ann, image_root in layouts:
        if uri_exists(ann) and uri_exists(image_root):
            return SplitFiles(ann, image_root)
    tried = "; ".join(f"{ann} + {image_root}" for ann, image_root in layouts)
    raise FileNotFoundError(f"no '{split}' split under {root} (tried {tried}); pass --ann-file and --images")
