"""Run a student (trained or exported) or a teacher on a user's images: the body of jobs/predict.py.

    images (a folder, a list file, local or s3://) + person boxes (the whole image, a COCO
    detection-results file or a COCO annotation file's GT boxes)
      -> identity crops -> joints in image px -> COCO keypoint results (+ overlay PNGs)

It is the evaluation path without the metric: crops from `data.dataset.build_sample`,
`inference.predict` (flip test, DARK decoding for a teacher), then `make_results` and OKS-NMS
with the evaluation's thresholds, so on a COCO split with the same boxes it writes what
`jobs/evaluate.py --results-json` writes. Images stream through in batches; one that does not
decode is skipped, named and counted.
"""

from __future__ import annotations

import json
import posixpath
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from distilpose import fileio
from distilpose.coco_metrics import make_results, oks_nms
from distilpose.data.coco import (
    DataError,
    ImageError,
    ImageInfo,
    Instance,
    SkipReport,
    box_to_center_scale,
    detections_to_instances,
    load_coco,
    load_instances,
    read_image,
    read_json_file,
)
from distilpose.data.dataset import SampleSpec, build_sample
from distilpose.data.transforms import identity_view
from distilpose.errors import UserError
from distilpose.evaluate import OKS_NMS_THR, VIS_THR
from distilpose.export import exported_format, load_exported
from distilpose.inference import predict
from distilpose.keypoints import NUM_JOINTS
from distilpose.models import checkpoints
from distilpose.options import check_options, option
from distilpose.profiles import DEFAULT_PROFILE, PROFILES, get_profile
from distilpose.visualize import joint_confidence, render_pose_overlay

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
WHOLE_IMAGE = "image"
MAX_NAMED = 5  # bad images named in the summary line


@dataclass
class PredictRequest:
    """What jobs/predict.py asks for."""

    images: str = option(help="folder of images, one image, or a text file listing image paths/URIs (local or s3://)")
    checkpoint: str = option(
        help="our checkpoint (student or teacher), an official .pth (needs --model) or an exported .onnx / "
        "TorchScript student"
    )
    out: str = option(help="COCO keypoint results JSON to write (local or s3://)")
    model: str | None = option(None, help="preset; checked against the file (needed for an official .pth)")
    boxes: str = option(
        WHOLE_IMAGE,
        help="'image' (each image is one person box), a COCO person-detection results file, "
        "or a COCO annotation file (its GT boxes)",
    )
    ann_file: str | None = option(
        None,
        help="COCO annotation file giving the images' ids (detection results name images by id); "
        "default: the number in the file name, as COCO names files",
    )
    score_thr: float = option(0.0, help="drop detections below this score")
    flip_test: bool = option(True, negatable=True, help="flip test")
    profile: str = option(
        DEFAULT_PROFILE,
        choices=tuple(sorted(PROFILES)),
        help="'official': the official code's student flip test; 'intended': the exact one",
    )
    batch_size: int = option(32, minimum=1, help="persons per forward pass")
    device: str = option("cpu", help="torch device (exported models run on the CPU)")
    threads: int = option(2, minimum=1, help="torch / onnxruntime threads")
    overlays: str | None = option(None, help="also write overlay_<image>.png (poses on the image) into this folder")
    progress_s: float = option(10.0, help="seconds between progress lines")

    def __post_init__(self) -> None:
        check_options(self)


# --------------------------------------------------------------------------- images


@dataclass(frozen=True)
class ImageRef:
    name: str  # file name (matched against an annotation file's file_name)
    uri: str
    image_id: int = 0


def _fs(uri: str):
    return fileio.open_fs(uri)  # S3 options (endpoint, retries) as everywhere else


def list_images(images: str) -> list[ImageRef]:
    """The images of a folder (its image files, sorted; not recursive), one image file, or a
    list file (one path or URI per line; relative paths are relative to the list file)."""
    fs, path = _fs(images)
    if fs.isdir(path):
        names = sorted(p for p in fs.ls(path, detail=False) if p.lower().endswith(IMAGE_SUFFIXES))
        prefix = images.rstrip("/")
        refs = [ImageRef(posixpath.basename(p), f"{prefix}/{posixpath.basename(p)}") for p in names]
        if not refs:
            raise UserError(f"--images {images}: no image files ({', '.join(IMAGE_SUFFIXES)}) in this folder")
        return refs
    if not fs.isfile(path):
        raise FileNotFoundError(f"--images {images}: no such folder or file")
    if images.lower().endswith(IMAGE_SUFFIXES):
        return [ImageRef(posixpath.basename(images), images)]
    return _read_list_file(images)


def _read_list_file(list_file: str) -> list[ImageRef]:
    lines = [line.strip() for line in fileio.read_bytes(list_file, what="read image list").decode().splitlines()]
    base = list_file.rsplit("/", 1)[0] if "/" in list_file else "."
    refs = []
    for line in lines:
        if not line or line.startswith("#"):
            continue
        absolute = "://" in line or line.startswith("/")
        refs.append(ImageRef(posixpath.basename(line), line if absolute else f"{base}/{line}"))
    if not refs:
        raise UserError(f"--images {list_file}: the list file names no images")
    return refs


def _number(name: str) -> int | None:
    stem = name.rsplit(".", 1)[0]
    return int(stem) if stem.isdigit() else None


def assign_ids(refs: Sequence[ImageRef], id_by_name: dict[str, int] | None, need_ids: bool) -> list[ImageRef]:
    """Image ids: from an annotation file's `images` (by file name) when given, else the
    number the file is named by (COCO names files <id>.jpg), else 1..N in listing order
    (only when nothing refers to images by id: `need_ids` False)."""
    if id_by_name is not None:
        missing = [r.name for r in refs if r.name not in id_by_name]
        if missing:
            raise UserError(
                f"{len(missing)} image(s) are not in the annotation file's images "
                f"(e.g. {', '.join(missing[:MAX_NAMED])})"
            )
        ids = [id_by_name[r.name] for r in refs]
    elif all(_number(r.name) is not None for r in refs):
        ids = [_number(r.name) for r in refs]
    elif need_ids:
        odd = next(r.name for r in refs if _number(r.name) is None)
        raise UserError(
            f"detection results name images by id, but {odd!r} is not named by a number; "
            "pass --ann-file with the images' ids"
        )
    else:
        ids = list(range(1, len(refs) + 1))
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise UserError(f"several images have the same id {duplicates[:MAX_NAMED]} (same file name in the list?)")
    return [ImageRef(r.name, r.uri, int(i)) for r, i in zip(refs, ids)]


# --------------------------------------------------------------------------- boxes


class BoxSource:
    """Person boxes of one image, from the whole image, detections or GT annotations."""

    def __init__(self, boxes: str, input_size: tuple[int, int], score_thr: float = 0.0) -> None:
        self.kind = WHOLE_IMAGE
        self.input_size = input_size
        self.score_thr = score_thr
        self.source = boxes
        self.report = SkipReport(source=boxes)
        self.detections: dict[int, list[tuple[int, Any]]] = {}
        self.gt: dict[int, list[Instance]] = {}
        self.id_by_name: dict[str, int] | None = None
        if boxes != WHOLE_IMAGE:
            self._read(boxes)

    def _read(self, boxes: str) -> None:
        content, _ = read_json_file(boxes)  # DataError "file not found" / "not valid JSON"
        if isinstance(content, list):
            self.kind = "detections"
            for index, det in enumerate(content):
                image_id = det.get("image_id") if isinstance(det, dict) else None
                if not isinstance(image_id, int):
                    self.report.add("unknown_image_id", index)
                    continue
                self.detections.setdefault(image_id, []).append((index, det))
        elif isinstance(content, dict) and "images" in content and "annotations" in content:
            self.kind = "annotations"
            instances, self.report = load_instances(boxes, "val", boxes="gt", input_size=self.input_size)
            for inst in instances:
                self.gt.setdefault(inst.image_id, []).append(inst)
            _, images = load_coco(boxes)
            self.id_by_name = {info.file_name: image_id for image_id, info in images.items()}
        else:
            raise DataError(f"{boxes}: neither person-detection results (a list) nor a COCO annotation file")

    def count_unused(self, image_ids: set[int]) -> None:
        """Count the boxes of images that were not given (`--images` is a subset of the file's)."""
        for image_id, records in self.detections.items():
            for index, _ in records if image_id not in image_ids else ():
                self.report.add("image_not_given", index)
        for image_id, instances in self.gt.items():
            for instance in instances if image_id not in image_ids else ():
                self.report.add("image_not_given", instance.instance_id)
                self.report.kept -= 1

    def instances(self, ref: ImageRef, size_hw: tuple[int, int]) -> list[Instance]:
        height, width = size_hw
        if self.kind == "annotations":
            return self.gt.get(ref.image_id, [])
        if self.kind == "detections":
            images = {ref.image_id: ImageInfo(ref.name, width, height)}
            records = self.detections.get(ref.image_id, [])
            return detections_to_instances(records, self.source, images, self.report, self.score_thr, self.input_size)
        center, scale = box_to_center_scale((0.0, 0.0, float(width), float(height)), self.input_size)
        return [
            Instance(
                instance_id=ref.image_id,
                image_id=ref.image_id,
                image_file=ref.name,
                center=center,
                scale=scale,
                joints=np.zeros((NUM_JOINTS, 3), np.float32),
                box_score=1.0,
                area=float(width * height),
                bbox=np.array([0, 0, width, height], np.float32),
                image_size=(height, width),
            )
        ]


# --------------------------------------------------------------------------- model


def load_predictor(checkpoint: str, preset: str | None = None, threads: int | None = None) -> nn.Module:
    """A student or teacher from our checkpoint, an official .pth (with `preset`) or an
    exported ONNX / TorchScript file; a `preset` other than the file's is refused."""
    if not Path(checkpoint).is_file():
        raise FileNotFoundError(f"--checkpoint {checkpoint}: no such file")
    if exported_format(checkpoint) is not None:
        return load_exported(checkpoint, preset, threads)
    return checkpoints.load_model(checkpoint, preset)  # our format or an official .pth, by content


# --------------------------------------------------------------------------- the run


@dataclass
class PredictStats:
    images: int = 0  # decoded and cropped
    persons: int = 0
    bad_images: list[str] = field(default_factory=list)
    results: int = 0  # after OKS-NMS
    wall_s: float = 0.0  # decoding, cropping, inference, NMS: what persons/s is measured over
    skipped_boxes: str = ""
    overlays: int = 0
    overlay_s: float = 0.0

    @property
    def persons_per_s(self) -> float:
        return self.persons / self.wall_s if self.wall_s > 0 else 0.0

    def summary(self) -> str:
        bad = ""
        if self.bad_images:
            named = ", ".join(self.bad_images[:MAX_NAMED]) + (", ..." if len(self.bad_images) > MAX_NAMED else "")
            bad = f", {len(self.bad_images)} skipped (not decodable: {named})"
        return (
            f"{self.images} images{bad}, {self.persons} persons, {self.results} results after OKS-NMS, "
            f"{self.wall_s:.1f} s, {self.persons_per_s:.1f} persons/s"
            + (f"; {self.overlays} overlays in {self.overlay_s:.1f} s" if self.overlays else "")
        )


def _batches(
    refs: Sequence[ImageRef],
    boxes: BoxSource,
    spec: SampleSpec,
    batch_size: int,
    stats: PredictStats,
    on_image: Callable[[], None],
) -> Iterator[dict[str, torch.Tensor]]:
    """Batches of identity crops (the evaluation's `build_sample`), image by image."""
    pending: list[dict] = []
    for ref in refs:
        try:
            pixels = read_image("", ref.uri)
        except ImageError as e:
            stats.bad_images.append(ref.name)
            print(f"[predict] skipped {e}", flush=True)
            on_image()
            continue
        for instance in boxes.instances(ref, pixels.shape[:2]):
            sample = build_sample(pixels, instance, identity_view(instance), spec)
            pending.append({"image": sample["image"], "affine": sample["affine"], "image_id": instance.image_id})
            pending[-1]["box_score"] = instance.box_score
            stats.persons += 1
            if len(pending) == batch_size:
                yield _collate(pending)
                pending = []
        stats.images += 1
        on_image()
    if pending:
        yield _collate(pending)


def _collate(samples: list[dict]) -> dict[str, torch.Tensor]:
    return {
        "image": torch.stack([s["image"] for s in samples]),
        "affine": torch.stack([s["affine"] for s in samples]),
        "image_id": torch.tensor([s["image_id"] for s in samples], dtype=torch.int64),
        "box_score": torch.tensor([s["box_score"] for s in samples], dtype=torch.float64),
    }


def _progress(total: int, stats: PredictStats, start: float, every_s: float) -> Callable[[], None]:
    last = [start]

    def report() -> None:
        now, done = time.perf_counter(), stats.images + len(stats.bad_images)
        if now - last[0] >= every_s or done == total:
            last[0] = now
            rate = stats.persons / max(now - start, 1e-9)
            print(f"[predict] {done}/{total} images, {stats.persons} persons, {rate:.1f} persons/s", flush=True)

    return report


def run_predict(request: PredictRequest, model: nn.Module | None = None) -> PredictStats:
    """Predict every person of the requested images; writes `request.out` (and overlays)."""
    torch.set_num_threads(request.threads)
    if model is None:
        model = load_predictor(request.checkpoint, request.model, request.threads)
    if not hasattr(model, "session"):
        model = model.to(request.device)
    input_size = tuple(model.config.input_size)
    boxes = BoxSource(request.boxes, input_size, request.score_thr)
    id_source = boxes.id_by_name
    if request.ann_file is not None:
        _, images = load_coco(request.ann_file)
        id_source = {info.file_name: image_id for image_id, info in images.items()}
    refs = assign_ids(list_images(request.images), id_source, need_ids=boxes.kind == "detections")
    print(f"[predict] {model.config.name} ({model.config.kind}) on {len(refs)} images, boxes: {boxes.kind}", flush=True)

    stats = PredictStats()
    start = time.perf_counter()
    batches = _batches(
        refs,
        boxes,
        SampleSpec(input_size),
        request.batch_size,
        stats,
        _progress(len(refs), stats, start, request.progress_s),
    )
    device = "cpu" if hasattr(model, "session") else request.device
    preds = predict(
        model, batches, request.flip_test, get_profile(request.profile).flip_mode, device=torch.device(device)
    )
    results = oks_nms(
        make_results(
            preds["image_ids"], preds["coords_img"], preds["joint_scores"], preds["box_scores"], preds["areas"], VIS_THR
        ),
        OKS_NMS_THR,
    )
    stats.wall_s = time.perf_counter() - start
    names = {ref.image_id: ref.name for ref in refs}
    for result in results:
        result["file_name"] = names[result["image_id"]]
    stats.results = len(results)
    boxes.count_unused({ref.image_id for ref in refs})
    stats.skipped_boxes = boxes.report.summary() if boxes.report.total else ""
    write_bytes(request.out, _results_json(results))
    if request.overlays:
        # Drawing is matplotlib's (~0.2 s an image): said up front so a long silence is explained.
        print(f"[predict] drawing overlays into {request.overlays} ...", flush=True)
        start = time.perf_counter()
        stats.overlays = write_overlays(
            results, {ref.image_id: ref for ref in refs}, request.overlays, model.config.name
        )
        stats.overlay_s = time.perf_counter() - start
    return stats


def _results_json(results: list[dict]) -> bytes:
    return json.dumps(results).encode()


def write_bytes(uri: str, data: bytes) -> None:
    """Write a file locally (parents created) or to s3://, whole or not at all."""
    fileio.atomic_write_bytes(uri, data)


def write_overlays(results: list[dict], refs: dict[int, ImageRef], out_dir: str, model_name: str) -> int:
    """overlay_<image file stem>.png per image with results: its kept poses on the image."""
    by_image: dict[int, list[np.ndarray]] = {}
    for result in results:
        by_image.setdefault(result["image_id"], []).append(np.asarray(result["keypoints"]).reshape(-1, 3))
    with tempfile.TemporaryDirectory() as tmp:
        for image_id, poses in by_image.items():
            ref = refs[image_id]
            stem = ref.name.rsplit(".", 1)[0]
            local = render_pose_overlay(
                read_image("", ref.uri),
                np.stack([p[:, :2] for p in poses]),
                joint_confidence(np.stack([p[:, 2] for p in poses])),
                Path(tmp) / f"overlay_{stem}.png",
                title=f"{model_name}: {ref.name}, {len(poses)} person(s)",
            )
            write_bytes(f"{out_dir.rstrip('/')}/{local.name}", local.read_bytes())
    return len(by_image)
