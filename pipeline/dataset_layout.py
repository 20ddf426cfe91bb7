"""A split's files under a data set root, as the pipeline records them.

The layouts themselves are `distilpose.data.layout`; here paths become absolute, because
the result is recorded in cache manifests and read by Ray workers, whose working directory
is not the driver's.
"""

from __future__ import annotations

from distilpose.data.layout import SplitFiles, split_files
from pipeline import storage


def resolve_layout(root: str, split: str, ann_file: str | None = None, images: str | None = None) -> SplitFiles:
    root, ann_file, images = (storage.absolute(u) if u else u for u in (root, ann_file, images))
    return split_files(root, split, ann_file, images)
