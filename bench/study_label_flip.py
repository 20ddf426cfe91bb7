"""What a label-side flip costs in target accuracy: the cached teacher heatmaps of a view,
mirrored at load time (`distilpose.label_flip.flip_heatmaps`), against the teacher run on the
mirrored crop itself - side by side with the teacher's own error on those crops.

    make demo && python bench/study_label_flip.py          # the demo's teacher and data

For each of the first N training instances and its cached views 1..V-1 (the cache's seed),
it prints, in crop px of the decoded joints (DARK, no flip test) and per heatmap pixel:

- warp error: flip_heatmaps(teacher(crop)) vs teacher(mirrored crop): what the student is
  taught instead of what the online teacher would say;
- teacher error: teacher(crop) vs the ground truth: how wrong the targets are anyway;
- heatmap RMSE of the warp, and of the cached encoding's bound for comparison.

A fixed amount of work (N instances x V-1 views); the ratio of the warp error to the
teacher's own error is the figure to read.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from distilpose.coco_metrics import heatmap_to_crop  # noqa: E402
from distilpose.data.coco import load_instances, read_image  # noqa: E402
from distilpose.data.layout import split_files  # noqa: E402
from distilpose.data.transforms import apply_view, normalize_batch  # noqa: E402
from distilpose.data.views import view_for  # noqa: E402
from distilpose.heatmaps import decode_heatmaps  # noqa: E402
from distilpose.label_flip import flip_heatmaps, flip_joints  # noqa: E402
from distilpose.teacher_forward import build_teacher  # noqa: E402


def decoded(heatmaps: np.ndarray, input_size: tuple[int, int]) -> np.ndarray:
    coords, _ = decode_heatmaps(torch.from_numpy(heatmaps))
    return heatmap_to_crop(coords.numpy(), heatmaps.shape[-2:], input_size)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demo", type=Path, default=ROOT / "runs" / "demo")
    p.add_argument("--teacher", default="tokenpose-tiny")
    p.add_argument("--instances", type=int, default=128)
    p.add_argument("--views", type=int, default=9, help="cached views per instance (1..V-1 are measured)")
    p.add_argument("--seed", type=int, default=0, help="the cache's view seed")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "label-flip.json", help="the figures, as JSON")
    args = p.parse_args(argv)
    checkpoint = args.demo / "teacher" / "teacher.pt"
    if not checkpoint.exists():
        p.error(f"{checkpoint} does not exist: run `make demo` first (or pass --demo)")
    torch.set_num_threads(2)
    teacher = build_teacher(args.teacher, checkpoint)
    size = tuple(teacher.config.input_size)
    files = split_files(str(args.demo / "data"), "train")
    instances, _ = load_instances(files.ann_file, split_kind="train", input_size=size)
    instances = sorted(instances, key=lambda inst: inst.instance_id)[: args.instances]

    crops, joints = [], []
    for inst in instances:
        image = read_image(files.image_root, inst.image_file)
        for v in range(1, args.views):
            crop, crop_joints = apply_view(image, inst.joints, view_for(inst, v, args.seed), size)
            crops.append(crop)
            joints.append(crop_joints)
    crops, joints = np.stack(crops), np.stack(joints)
    with torch.inference_mode():
        plain = np.concatenate([teacher(normalize_batch(c)).heatmaps.numpy() for c in np.array_split(crops, 16)])
        mirrored_crops = np.ascontiguousarray(crops[:, :, ::-1])
        online = np.concatenate(
            [teacher(normalize_batch(c)).heatmaps.numpy() for c in np.array_split(mirrored_crops, 16)]
        )
    warped = flip_heatmaps(plain, size[1])
    visible = joints[..., 2] > 0
    flipped_gt, flipped_visible = flip_joints(joints[..., :2], visible.astype(np.float32), size[1])

    warp_px = np.linalg.norm(decoded(warped, size) - decoded(online, size), axis=-1)[flipped_visible > 0]
    teacher_px = np.linalg.norm(decoded(online, size) - flipped_gt, axis=-1)[flipped_visible > 0]
    scale = np.abs(online).max(axis=(-2, -1), keepdims=True).clip(min=1e-6)
    rmse = float(np.sqrt((((warped - online) / scale) ** 2).mean()))
    print(f"label-side flip, {len(instances)} instances x views 1..{args.views - 1} ({len(crops)} crops, {size})")
    print(
        f"warp error (flip_heatmaps(teacher(crop)) vs teacher(mirrored crop)), decoded joints: mean "
        f"{warp_px.mean():.2f} px, median {np.median(warp_px):.2f}, p90 {np.percentile(warp_px, 90):.2f}"
    )
    print(
        f"teacher error on the mirrored crops (vs ground truth): mean {teacher_px.mean():.2f} px, median "
        f"{np.median(teacher_px):.2f}, p90 {np.percentile(teacher_px, 90):.2f}"
    )
    print(f"warp / teacher error (means): {warp_px.mean() / teacher_px.mean():.2f}")
    print(f"heatmap RMSE of the warp, per joint's max |x|: {rmse:.3f} (the i8-thresh encoding allows 0.010)")
    record = {
        "instances": len(instances),
        "views": f"1..{args.views - 1}",
        "crops": len(crops),
        "input_size": list(size),
        "warp_px": {
            "mean": float(warp_px.mean()),
            "median": float(np.median(warp_px)),
            "p90": float(np.percentile(warp_px, 90)),
        },
        "teacher_px": {
            "mean": float(teacher_px.mean()),
            "median": float(np.median(teacher_px)),
            "p90": float(np.percentile(teacher_px, 90)),
        },
        "warp_over_teacher": float(warp_px.mean() / teacher_px.mean()),
        "heatmap_rmse_rel": rmse,
    }
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
