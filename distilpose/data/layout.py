"""Where a split's annotation file and images live under a data set root (local or s3://).

Two layouts are understood, so the real COCO tree and the synthetic one work unchanged:

    synthetic:  annotations/person_keypoints_train.json       images/train/
    COCO 2017:  annotations/person_keypoints_train2017.json   train2017/

Either path can be given explicitly instead (`--ann-file`, `--images`); with both, no data
set root is needed, so any layout works (PoseTrack-style `images/val/<video>/<frame>.jpg`
file names in the annotation file, for instance). `DataOptions` is that option group, shared
by every job that reads a split (cache, distill, evaluate, visualize, train_teacher);
`ValDataOptions` is the same for the val split a training job evaluates on.
"""

from __future__ import annotations

from dataclasses import dataclass

from distilpose import fileio
from distilpose.data.coco import join_uri
from distilpose.errors import UserError
from distilpose.options import option

DATA_GROUP = "data source (--data, or --ann-file with --images)"
VAL_GROUP = "val data source (--val, or --val-ann-file with --val-images)"


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


def split_files(root: str | None, split: str, ann_file: str | None = None, images: str | None = None) -> SplitFiles:
    """Annotation file and image folder of `split`: the first layout under `root` that has
    both, so the two never come from different layouts. `ann_file` / `images` replace the
    layout's own path; with both, `root` may be None."""
    if ann_file and images:
        for flag, uri in (("--ann-file", ann_file), ("--images", images)):
            if not uri_exists(uri):
                raise FileNotFoundError(f"{flag} {uri}: no such file or folder")
        return SplitFiles(ann_file, images)
    if not root:
        raise UserError(f"no data set for the '{split}' split: give --data, or both --ann-file and --images")
    layouts = [(ann_file or ann, images or image_root) for ann, image_root in split_layouts(root, split)]
    for ann, image_root in layouts:
        if uri_exists(ann) and uri_exists(image_root):
            return SplitFiles(ann, image_root)
    tried = "; ".join(f"{ann} + {image_root}" for ann, image_root in layouts)
    raise FileNotFoundError(f"no '{split}' split under {root} (tried {tried}); pass --ann-file and --images")


@dataclass(kw_only=True)
class DataOptions:
    """Where a job's split comes from: a data set root, or its two files given directly."""

    data: str | None = option(
        None,
        group=DATA_GROUP,
        help="data set root (local or s3://): COCO 2017 or synthetic layout (not needed with both --ann-file "
        "and --images)",
    )
    ann_file: str | None = option(
        None, group=DATA_GROUP, help="the split's annotation json (default: the layout's under --data)"
    )
    images: str | None = option(
        None,
        group=DATA_GROUP,
        help="the folder the annotation file's file_names are relative to (default: the layout's under --data)",
    )

    def has_data_source(self) -> bool:
        return bool(self.data or (self.ann_file and self.images))

    def check_data_source(self) -> None:
        """ValueError (a usage error in the jobs) when neither a root nor both files are given."""
        if not self.has_data_source():
            raise ValueError("give --data, or both --ann-file and --images")

    def split_files(self, split: str) -> SplitFiles:
        return split_files(self.data, split, self.ann_file, self.images)


@dataclass(kw_only=True)
class ValDataOptions:
    """The val split a training job evaluates on: a data set root, or its two files."""

    val: str | None = option(None, group=VAL_GROUP, help="data set root whose val split is evaluated (pycocotools)")
    val_ann_file: str | None = option(
        None, group=VAL_GROUP, help="the val split's annotation json (default: the layout's under --val)"
    )
    val_images: str | None = option(
        None, group=VAL_GROUP, help="the val split's image folder (default: the layout's under --val)"
    )

    def has_val_source(self) -> bool:
        return bool(self.val or (self.val_ann_file and self.val_images))

    def val_files(self) -> SplitFiles:
        return split_files(self.val, "val", self.val_ann_file, self.val_images)
