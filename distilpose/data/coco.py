"""Top-down person instances from COCO person-keypoints files.

Conventions (docs/method.md#conventions): coordinates are (x, y) in image pixels with pixel
centres at integers; sizes are (H, W). A box becomes a crop centre and a crop size
(`scale`, stored as the box (w, h) in image px, i.e. mmpose's `scale * 200`) by fitting the
box to the model input's aspect ratio and padding it by 1.25 (mmpose `_xywh2cs`).

Bad-input policy (docs/method.md#conventions): one bad record never stops a job. A record that is a normal quirk of
real data sets (crowd region, no labelled joints, degenerate or off-image box, detection
below the score threshold, non-person detection) and a record that is malformed (no integer
id, wrong keypoint count, negative or malformed box, unknown image id; `MALFORMED_REASONS`)
are skipped and counted in a `SkipReport` by reason, with the first few ids. `strict=True`
raises `DataError` on the first malformed record instead, for a data set that must be used
as a whole. A file that is wrong as a whole (not JSON, missing sections, no person
category, a bad images entry) always raises `DataError` naming the file.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from distilpose import fileio
from distilpose.data.fast_crop import decode_jpeg
from distilpose.keypoints import NUM_JOINTS

PERSON_CATEGORY_ID = 1
DEFAULT_INPUT_SIZE = (256, 192)  # (H, W) of the paper presets
BOX_PADDING = 1.25
MAX_SKIP_EXAMPLES = 5
# Skip reasons of records that are broken rather than a quirk of the data: what --strict refuses.
MALFORMED_REASONS = ("bad_keypoints", "bad_box", "unknown_image_id", "no_annotation_id", "bad_score")


class DataError(ValueError):
    """An annotation or detection file that cannot be used as it is."""


class RecordError(DataError):
    """One malformed record; `reason` is its skip reason (one of MALFORMED_REASONS)."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason

    def __reduce__(self):
        # Rebuilt from its fields when it crosses processes (Ray tasks, loader processes).
        return (type(self), (str(self), self.reason))


class ImageError(OSError):
    """An image that is missing or cannot be decoded; `image_file` names it."""

    def __init__(self, image_file: str, uri: str, reason: str):
        super().__init__(f"image {image_file!r} ({uri}): {reason}")
        self.image_file = image_file
        self.uri = uri
        self.reason = reason

    def __reduce__(self):
        # Rebuilt from its fields when it crosses processes (Ray tasks, loader processes).
        return (type(self), (self.image_file, self.uri, self.reason))


@dataclass
class Instance:
    """One person to crop: the unit the teacher stage and the student loader iterate over."""

    instance_id: int  # annotation id (GT boxes) or running detection index (detector boxes)
    image_id: int
    image_file: str
    center: np.ndarray  # (2,) float32, box centre (x, y) in image px
    scale: np.ndarray  # (2,) float32, crop (w, h) in image px after aspect fit and padding
    joints: np.ndarray  # (K, 3) float32: x, y image px + visibility 0/1 (zeros for detections)
    box_score: float  # 1.0 for GT boxes
    area: float  # COCO annotation area (GT) or box w*h (detections); OKS-NMS uses the crop box instead
    bbox: np.ndarray = field(default_factory=lambda: np.zeros(4, np.float32))  # x, y, w, h used
    image_size: tuple[int, int] = (0, 0)  # (H, W) from the annotation file


@dataclass
class SkipReport:
    """Records dropped while loading, by reason, with a few example ids per reason."""

    source: str
    kept: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[int]] = field(default_factory=dict)

    def add(self, reason: str, record_id: int | None = None) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        if record_id is not None:
            ids = self.examples.setdefault(reason, [])
            if len(ids) < MAX_SKIP_EXAMPLES:
                ids.append(record_id)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        """One line; malformed records also name their first ids, so they can be found and fixed."""
        parts = ", ".join(f"{reason}={n}{self._ids(reason)}" for reason, n in sorted(self.counts.items()))
        return f"{self.source}: kept {self.kept}, skipped {self.total}" + (f" ({parts})" if parts else "")

    def _ids(self, reason: str) -> str:
        ids = self.examples.get(reason)
        if reason not in MALFORMED_REASONS or not ids:
            return ""
        more = ", ..." if self.counts[reason] > len(ids) else ""
        return f" [ids {', '.join(map(str, ids))}{more}]"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class DataFingerprint:
    """Identifies the annotation file a cache or checkpoint was made from."""

    ann_file: str
    sha256: str
    num_images: int
    num_annotations: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def join_uri(root_uri: str, name: str) -> str:
    """Join a folder (local path or URL-like prefix) and a relative file name with '/'."""
    return root_uri.rstrip("/") + "/" + name.lstrip("/") if root_uri else name


def read_bytes(uri: str) -> bytes:
    """The file's bytes; transient storage errors are retried (`distilpose.fileio`)."""
    return fileio.read_bytes(uri)


def read_json_file(uri: str) -> tuple[Any, bytes]:
    """Parse a JSON file; returns (object, raw bytes) so callers can hash what they parsed."""
    try:
        raw = read_bytes(uri)
    except FileNotFoundError as e:
        raise DataError(f"{uri}: file not found") from e
    try:
        return json.loads(raw), raw
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{uri}: not valid JSON ({e})") from e


def data_fingerprint(ann_file: str) -> DataFingerprint:
    """sha256 of the annotation file's bytes plus its image and annotation counts."""
    data, raw = read_json_file(ann_file)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DataError(f"{ann_file}: not a COCO annotation file (no 'images' list)")
    return DataFingerprint(
        ann_file=ann_file,
        sha256=hashlib.sha256(raw).hexdigest(),
        num_images=len(data["images"]),
        num_annotations=len(data.get("annotations", [])),
    )


def read_image(root_uri: str, image_file: str) -> np.ndarray:
    """Decode an image below `root_uri` (local folder or s3:// prefix) to RGB uint8 (H, W, 3).

    Grayscale, palette, CMYK, RGBA and 16-bit PNGs are converted to RGB. EXIF orientation
    is deliberately not applied: COCO keypoints refer to the stored pixel grid.
    For s3:// the endpoint comes from AWS_ENDPOINT_URL (honoured by s3fs/botocore).
    A missing or undecodable image raises `ImageError` (permanent: callers may count it as a
    skip); storage that keeps failing transiently raises `fileio.TransientIOError` (never a skip).
    """
    uri = join_uri(root_uri, image_file)
    try:
        raw = fileio.read_bytes(uri, what=f"image {uri}")
    except fileio.TransientIOError:
        raise  # storage unavailable, not a bad image: the caller's unit of work fails and is redone
    except FileNotFoundError as e:
        raise ImageError(image_file, uri, "file not found") from e
    except OSError as e:
        raise ImageError(image_file, uri, f"cannot read ({e})") from e
    fast = decode_jpeg(raw)  # Pillow's pixels at a fraction of its CPU; None: Pillow decodes
    if fast is not None:
        return fast
    try:
        with Image.open(io.BytesIO(raw)) as im:
            im.load()  # decode now: truncated files fail here, not later in a worker
            return np.array(_to_rgb(im), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as e:
        raise ImageError(image_file, uri, f"cannot decode ({e})") from e
    except Image.DecompressionBombError as e:
        raise ImageError(image_file, uri, f"refused ({e})") from e


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        # PIL's direct I->RGB conversion clips at 255; rescale 16-bit data to 8 bits first.
        arr = np.asarray(im, dtype=np.uint32) >> 8
        im = Image.fromarray(arr.astype(np.uint8), mode="L")
    return im.convert("RGB")


def box_to_center_scale(
    bbox: Sequence[float], input_size: tuple[int, int] = DEFAULT_INPUT_SIZE, padding: float = BOX_PADDING
) -> tuple[np.ndarray, np.ndarray]:
    """COCO box (x, y, w, h) -> centre (x, y) and crop size (w, h) in image px (mmpose _xywh2cs).

    The box is grown (never shrunk) to the W:H aspect of `input_size` (H, W), then padded.
    """
    x, y, w, h = (float(v) for v in bbox[:4])
    aspect = input_size[1] / input_size[0]
    center = np.array([x + w * 0.5, y + h * 0.5], dtype=np.float32)
    if w > aspect * h:
        h = w / aspect
    elif w < aspect * h:
        w = h * aspect
    scale = np.array([w * padding, h * padding], dtype=np.float32)
    return center, scale


def clip_box(bbox: Sequence[float], width: int, height: int) -> tuple[float, float, float, float] | None:
    """Clip a COCO box to the image as mmpose v0.22 does; None when nothing positive remains.

    mmpose keeps [x1, y1, x2 - x1, y2 - y1] with x1 = max(0, x), x2 = min(W - 1, x1 + w - 1):
    the box spans pixel centres (one pixel narrower than w), and a box sticking out on the
    left/top is moved inside rather than cut (an mmpose quirk kept for fidelity; COCO GT boxes
    practically never stick out). Boxes wholly outside the image are rejected before this.
    """
    x, y, w, h = (float(v) for v in bbox[:4])
    x1, y1 = max(0.0, x), max(0.0, y)
    x2 = min(width - 1.0, x1 + max(0.0, w - 1.0))
    y2 = min(height - 1.0, y1 + max(0.0, h - 1.0))
    if x2 <= x1 or y2 <= y1:
        return None
    return x1, y1, x2 - x1, y2 - y1


def _parse_box(bbox: Any, where: str) -> list[float]:
    if not isinstance(bbox, list | tuple) or len(bbox) != 4:
        raise RecordError(f"{where}: bbox must be [x, y, w, h], got {bbox!r}", "bad_box")
    try:
        values = [float(v) for v in bbox]
    except (TypeError, ValueError) as e:
        raise RecordError(f"{where}: bbox has non-numeric values {bbox!r}", "bad_box") from e
    if not all(math.isfinite(v) for v in values) or values[2] < 0 or values[3] < 0:
        raise RecordError(f"{where}: bbox must be finite with w, h >= 0, got {bbox!r}", "bad_box")
    return values


def _box_skip_reason(box: list[float], width: int, height: int) -> str | None:
    """Why a well-formed box cannot give a crop, or None when it can."""
    x, y, w, h = box
    if w * h <= 0:
        return "zero_area_box"
    if x >= width or y >= height or x + w <= 0 or y + h <= 0:
        return "box_outside_image"
    if clip_box(box, width, height) is None:
        return "zero_area_box"  # less than one pixel left inside the image
    return None


def _parse_joints(keypoints: Any, num_joints: int, where: str) -> np.ndarray:
    """COCO flat [x, y, v] * K -> (K, 3) float32 with visibility 1 for v in {1, 2}."""
    if not isinstance(keypoints, list) or len(keypoints) != 3 * num_joints:
        n = len(keypoints) if isinstance(keypoints, list) else type(keypoints).__name__
        raise RecordError(
            f"{where}: expected {3 * num_joints} keypoint values ({num_joints} joints), got {n}", "bad_keypoints"
        )
    try:
        kp = np.asarray(keypoints, dtype=np.float64).reshape(num_joints, 3)
    except (TypeError, ValueError) as e:
        raise RecordError(f"{where}: keypoints are not numeric", "bad_keypoints") from e
    flags = kp[:, 2]
    if not np.isin(flags, (0, 1, 2)).all() or not np.isfinite(kp).all():
        raise RecordError(
            f"{where}: keypoint visibility flags must be 0, 1 or 2 and coordinates finite", "bad_keypoints"
        )
    joints = np.zeros((num_joints, 3), dtype=np.float32)
    labelled = flags > 0
    joints[labelled, :2] = kp[labelled, :2]
    joints[labelled, 2] = 1.0
    return joints


@dataclass(frozen=True)
class ImageInfo:
    """One entry of the file's `images` list."""

    file_name: str
    width: int
    height: int


def _index_images(data: dict[str, Any], ann_file: str) -> dict[int, ImageInfo]:
    images: dict[int, ImageInfo] = {}
    for entry in data["images"]:
        try:
            images[int(entry["id"])] = ImageInfo(str(entry["file_name"]), int(entry["width"]), int(entry["height"]))
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"{ann_file}: image entry {entry!r} needs id, file_name, width, height") from e
    return images


def _check_category(data: dict[str, Any], ann_file: str, num_joints: int) -> None:
    categories = data.get("categories")
    person = [c for c in categories or [] if isinstance(c, dict) and c.get("id") == PERSON_CATEGORY_ID]
    if not person:
        raise DataError(
            f"{ann_file}: no person category (id {PERSON_CATEGORY_ID}) in 'categories'; "
            "pass a COCO person-keypoints file"
        )
    if "keypoints" in person[0] and len(person[0]["keypoints"]) != num_joints:
        raise DataError(
            f"{ann_file}: person category lists {len(person[0]['keypoints'])} keypoints, expected {num_joints}"
        )


def load_coco(ann_file: str, num_joints: int = NUM_JOINTS) -> tuple[dict[str, Any], dict[int, ImageInfo]]:
    """Parse and sanity-check a COCO keypoints file; returns (raw dict, image index)."""
    data, _ = read_json_file(ann_file)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DataError(f"{ann_file}: not a COCO annotation file (no 'images' list)")
    if not isinstance(data.get("annotations"), list):
        raise DataError(f"{ann_file}: not a COCO annotation file (no 'annotations' list)")
    _check_category(data, ann_file, num_joints)
    return data, _index_images(data, ann_file)


def _image_for(images: dict[int, ImageInfo], image_id: Any, where: str) -> ImageInfo:
    try:
        return images[int(image_id)]
    except (KeyError, TypeError, ValueError) as e:
        message = f"{where}: image_id {image_id!r} is not in the annotation file's images"
        raise RecordError(message, "unknown_image_id") from e


def _gt_instances(
    data: dict[str, Any],
    images: dict[int, ImageInfo],
    ann_file: str,
    report: SkipReport,
    input_size: tuple[int, int],
    num_joints: int,
    strict: bool,
) -> list[Instance]:
    instances = []
    for index, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict) or not isinstance(ann.get("id"), int):
            message = f"{ann_file}: annotation #{index} is not an object with an integer 'id'"
            _skip_or_raise(RecordError(message, "no_annotation_id"), report, None, strict)
            continue
        ann_id = ann["id"]
        where = f"{ann_file}: annotation id {ann_id}"
        if ann.get("category_id", PERSON_CATEGORY_ID) != PERSON_CATEGORY_ID:
            report.add("not_person", ann_id)
            continue
        if ann.get("iscrowd", 0):
            report.add("crowd", ann_id)
            continue
        try:
            info = _image_for(images, ann.get("image_id"), where)
            joints = _parse_joints(ann.get("keypoints"), num_joints, where)
            box = _parse_box(ann.get("bbox"), where)
        except RecordError as e:
            _skip_or_raise(e, report, ann_id, strict)
            continue
        if not joints[:, 2].any() or ann.get("num_keypoints", 1) == 0:
            report.add("no_labelled_joints", ann_id)
            continue
        reason = _box_skip_reason(box, info.width, info.height)
        if reason is not None or ann.get("area", 1) <= 0:
            report.add(reason or "zero_area_box", ann_id)
            continue
        clean = clip_box(box, info.width, info.height)
        center, scale = box_to_center_scale(clean, input_size)
        instances.append(
            Instance(
                instance_id=int(ann_id),
                image_id=int(ann["image_id"]),
                image_file=info.file_name,
                center=center,
                scale=scale,
                joints=joints,
                box_score=1.0,
                area=float(ann.get("area", clean[2] * clean[3])),
                bbox=np.asarray(clean, dtype=np.float32),
                image_size=(info.height, info.width),
            )
        )
    return instances


def _parse_score(score: Any, where: str) -> float:
    try:
        return float(score)
    except (TypeError, ValueError) as e:
        raise RecordError(f"{where}: missing or non-numeric score", "bad_score") from e


def _skip_or_raise(error: RecordError, report: SkipReport, record_id: int | None, strict: bool) -> None:
    if strict:
        raise error
    report.add(error.reason, record_id)


def _detection_instances(
    det_file: str,
    images: dict[int, ImageInfo],
    report: SkipReport,
    score_thr: float,
    input_size: tuple[int, int],
    num_joints: int,
    strict: bool,
) -> list[Instance]:
    """Person detections (list of {image_id, category_id, bbox, score}) -> instances."""
    dets, _ = read_json_file(det_file)
    if not isinstance(dets, list):
        raise DataError(f"{det_file}: expected a list of detections")
    return detections_to_instances(
        list(enumerate(dets)), det_file, images, report, score_thr, input_size, num_joints, strict
    )


def detections_to_instances(
    detections: Sequence[tuple[int, Any]],
    source: str,
    images: dict[int, ImageInfo],
    report: SkipReport,
    score_thr: float = 0.0,
    input_size: tuple[int, int] = DEFAULT_INPUT_SIZE,
    num_joints: int = NUM_JOINTS,
    strict: bool = False,
) -> list[Instance]:
    """(index in `source`, detection record) pairs -> instances; `images` indexes the images
    the detections may name (jobs/predict.py passes one image at a time).

    As in mmpose, detector boxes are used unclipped and `instance_id` is the running index
    of the kept detections; boxes that give no usable crop are skipped and counted.
    """
    instances = []
    for index, det in detections:
        where = f"{source}: detection #{index}"
        if not isinstance(det, dict):
            raise DataError(f"{where}: expected an object, got {type(det).__name__}")
        if det.get("category_id", PERSON_CATEGORY_ID) != PERSON_CATEGORY_ID:
            report.add("not_person", index)
            continue
        try:
            score = _parse_score(det.get("score"), where)
            if score < score_thr:
                report.add("below_score_thr", index)
                continue
            info = _image_for(images, det.get("image_id"), where)
            box = _parse_box(det.get("bbox"), where)
        except RecordError as e:
            _skip_or_raise(e, report, index, strict)
            continue
        reason = _box_skip_reason(box, info.width, info.height)
        if reason is not None:
            report.add(reason, index)
            continue
        center, scale = box_to_center_scale(box, input_size)
        instances.append(
            Instance(
                instance_id=len(instances),
                image_id=int(det["image_id"]),
                image_file=info.file_name,
                center=center,
                scale=scale,
                joints=np.zeros((num_joints, 3), dtype=np.float32),
                box_score=score,
                area=box[2] * box[3],
                bbox=np.asarray(box, dtype=np.float32),
                image_size=(info.height, info.width),
            )
        )
    return instances


def load_instances(
    ann_file: str,
    split_kind: str = "train",
    boxes: str = "gt",
    score_thr: float = 0.0,
    input_size: tuple[int, int] = DEFAULT_INPUT_SIZE,
    num_joints: int = NUM_JOINTS,
    strict: bool = False,
) -> tuple[list[Instance], SkipReport]:
    """Top-down instances of a COCO person-keypoints file.

    split_kind "train" uses GT boxes (docs/method.md#conventions); "val" uses GT boxes
    (`boxes="gt"`) or a person-detector results file (`boxes=<path or uri>`), keeping scores
    >= `score_thr`. `input_size` (H, W) sets the crop aspect ratio. Malformed records are
    skipped and counted in the report, or with `strict` raise `DataError` at the first one.
    """
    if split_kind not in ("train", "val"):
        raise ValueError(f"split_kind must be 'train' or 'val', got {split_kind!r}")
    if split_kind == "train" and boxes != "gt":
        raise ValueError("training instances use GT boxes; detector boxes are for split_kind='val'")
    data, images = load_coco(ann_file, num_joints)
    if boxes == "gt":
        report = SkipReport(source=ann_file)
        instances = _gt_instances(data, images, ann_file, report, input_size, num_joints, strict)
    else:
        report = SkipReport(source=boxes)
        instances = _detection_instances(boxes, images, report, score_thr, input_size, num_joints, strict)
    report.kept = len(instances)
    return instances, report
