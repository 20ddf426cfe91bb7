"""COCO loading and image decoding (distilpose.data.coco); crop views: test_transforms.py."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from distilpose.data.coco import (
    DataError,
    ImageError,
    Instance,
    box_to_center_scale,
    clip_box,
    data_fingerprint,
    load_instances,
    read_image,
)

INPUT = (256, 192)  # (H, W)


# ----------------------------------------------------------------------------- helpers


def keypoints(pairs: dict[int, tuple[float, float, int]]) -> list[float]:
    flat = [0.0] * 51
    for k, (x, y, v) in pairs.items():
        flat[3 * k : 3 * k + 3] = [x, y, v]
    return flat


FULL_BODY = {k: (40.0 + 2 * k, 20.0 + 4 * k, 2) for k in range(17)}


def person(ann_id: int, bbox, kps=None, **extra) -> dict:
    kp = keypoints(FULL_BODY if kps is None else kps)
    ann = {
        "id": ann_id,
        "image_id": 1,
        "category_id": 1,
        "iscrowd": 0,
        "bbox": bbox,
        "area": 100.0,
        "keypoints": kp,
        "num_keypoints": sum(1 for v in kp[2::3] if v > 0),
    }
    ann.update(extra)
    return ann


def write_coco(path: Path, annotations: list[dict], width: int = 120, height: int = 100) -> str:
    data = {
        "images": [{"id": 1, "file_name": "a.jpg", "width": width, "height": height}],
        "annotations": annotations,
        "categories": [{"id": 1, "name": "person", "keypoints": [str(k) for k in range(17)]}],
    }
    path.write_text(json.dumps(data))
    return str(path)


def make_instance(joints: np.ndarray, center=(60.0, 50.0), scale=(60.0, 80.0)) -> Instance:
    return Instance(
        instance_id=1,
        image_id=1,
        image_file="a.jpg",
        center=np.asarray(center, np.float32),
        scale=np.asarray(scale, np.float32),
        joints=joints.astype(np.float32),
        box_score=1.0,
        area=100.0,
    )


def full_joints(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    j = np.ones((17, 3), np.float32)
    j[:, 0] = rng.uniform(30, 90, 17)
    j[:, 1] = rng.uniform(10, 90, 17)
    return j


def noise_image(h: int = 100, w: int = 120, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# ----------------------------------------------------------------------------- coco instances


def test_train_instances_skip_reasons_are_counted(tmp_path):
    ann_file = write_coco(
        tmp_path / "ann.json",
        [
            person(10, [20, 10, 40, 80]),
            person(11, [0, 0, 50, 50], iscrowd=1),
            person(12, [10, 10, 30, 30], kps={}),
            person(13, [10, 10, 0, 30]),
            person(14, [500, 10, 30, 30]),
            person(15, [10, 10, 30, 30], category_id=2),
            person(16, [-30, -20, 60, 70], kps={0: (5, 5, 1), 1: (8, 6, 2)}),
        ],
    )
    instances, report = load_instances(ann_file)
    assert [i.instance_id for i in instances] == [10, 16]
    assert report.counts == {
        "crowd": 1,
        "no_labelled_joints": 1,
        "zero_area_box": 1,
        "box_outside_image": 1,
        "not_person": 1,
    }
    assert report.examples["crowd"] == [11] and report.kept == 2 and report.total == 5
    assert "skipped 5" in report.summary()
    first = instances[0]
    assert first.image_file == "a.jpg" and first.image_size == (100, 120) and first.box_score == 1.0
    np.testing.assert_array_equal(first.joints[:, 2], np.ones(17))
    assert first.joints.shape == (17, 3) and first.joints.dtype == np.float32
    # v=1 and v=2 both become visible 1; a box sticking out is clipped as mmpose does.
    np.testing.assert_array_equal(instances[1].joints[:2, 2], [1, 1])
    np.testing.assert_allclose(instances[1].bbox, [0, 0, 59, 69])


def test_center_scale_fits_input_aspect_with_padding():
    center, scale = box_to_center_scale([10, 20, 30, 80], (256, 192))  # tall box: width grows
    np.testing.assert_allclose(center, [25, 60])
    np.testing.assert_allclose(scale, [80 * 0.75 * 1.25, 80 * 1.25])
    _, scale = box_to_center_scale([0, 0, 90, 40], (256, 192))  # wide box: height grows
    np.testing.assert_allclose(scale, [90 * 1.25, 120 * 1.25])
    _, scale = box_to_center_scale([0, 0, 90, 40], (128, 128))  # aspect comes from input_size
    np.testing.assert_allclose(scale, [90 * 1.25, 90 * 1.25])
    assert center.dtype == np.float32 and scale.dtype == np.float32


def test_clip_box_follows_mmpose():
    assert clip_box([10, 5, 50, 20], 100, 100) == (10, 5, 49, 19)
    assert clip_box([-10, 5, 50, 20], 100, 100) == (0, 5, 49, 19)  # moved inside, not cut
    assert clip_box([90, 90, 30, 30], 100, 100) == (90, 90, 9, 9)
    assert clip_box([99, 10, 5, 5], 100, 100) is None


def test_detector_boxes_with_score_threshold(tmp_path):
    ann_file = write_coco(tmp_path / "ann.json", [person(10, [20, 10, 40, 80])])
    dets = [
        {"image_id": 1, "category_id": 1, "bbox": [10, 10, 30, 60], "score": 0.9},
        {"image_id": 1, "category_id": 1, "bbox": [50, 20, 20, 40], "score": 0.2},
        {"image_id": 1, "category_id": 1, "bbox": [60, 20, 30, 40], "score": 0.5},
        {"image_id": 1, "category_id": 2, "bbox": [10, 10, 30, 60], "score": 0.9},
        {"image_id": 1, "category_id": 1, "bbox": [10, 10, 30, 0], "score": 0.9},
        {"image_id": 1, "category_id": 1, "bbox": [-80, 10, 30, 30], "score": 0.9},
    ]
    det_file = tmp_path / "dets.json"
    det_file.write_text(json.dumps(dets))
    instances, report = load_instances(ann_file, "val", str(det_file), score_thr=0.3)
    assert [i.box_score for i in instances] == [0.9, 0.5]
    assert [i.instance_id for i in instances] == [0, 1]
    assert report.counts == {"below_score_thr": 1, "not_person": 1, "zero_area_box": 1, "box_outside_image": 1}
    np.testing.assert_allclose(instances[0].center, [25, 40])
    np.testing.assert_allclose(instances[0].scale, [45 * 1.25, 60 * 1.25])
    assert instances[0].area == 30 * 60 and not instances[0].joints.any()
    everything, report = load_instances(ann_file, "val", str(det_file), score_thr=0.0)
    assert len(everything) == 3 and "below_score_thr" not in report.counts
    gt, _ = load_instances(ann_file, "val", "gt")
    assert len(gt) == 1
    with pytest.raises(ValueError, match="GT boxes"):
        load_instances(ann_file, "train", str(det_file))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not valid JSON"),
        (json.dumps({"annotations": []}), "no 'images' list"),
    ],
)
def test_unparsable_or_wrong_annotation_file_raises(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(DataError, match=message) as err:
        load_instances(str(path))
    assert str(path) in str(err.value)


def test_missing_annotation_file_raises(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_instances(str(tmp_path / "nope.json"))


MALFORMED = [
    (person(7, [10, 10, 30, 30]) | {"keypoints": [1.0] * 48}, "bad_keypoints", "expected 51 keypoint values"),
    (person(7, [10, 10, -5, 30]), "bad_box", "w, h >= 0"),
    (person(7, [10, 10, 30]), "bad_box", r"bbox must be \[x, y, w, h\]"),
    (person(7, [10, 10, 30, 30]) | {"image_id": 99}, "unknown_image_id", "image_id 99"),
    (person(7, [10, 10, 30, 30], kps={0: (5, 5, 3)}), "bad_keypoints", "visibility flags"),
]


@pytest.mark.parametrize(("ann", "reason", "message"), MALFORMED)
def test_malformed_annotation_is_a_counted_skip_naming_its_id(tmp_path, ann, reason, message):
    ann_file = write_coco(tmp_path / "ann.json", [person(1, [10, 10, 30, 30]), ann, ann | {"id": 8}])
    instances, report = load_instances(ann_file)
    assert [i.instance_id for i in instances] == [1]
    assert report.counts == {reason: 2} and report.examples[reason] == [7, 8]
    assert f"{reason}=2 [ids 7, 8]" in report.summary()


@pytest.mark.parametrize(("ann", "reason", "message"), MALFORMED)
def test_strict_raises_on_the_first_malformed_annotation(tmp_path, ann, reason, message):
    ann_file = write_coco(tmp_path / "ann.json", [person(1, [10, 10, 30, 30]), ann])
    with pytest.raises(DataError, match=message) as err:
        load_instances(ann_file, strict=True)
    assert "annotation id 7" in str(err.value) and ann_file in str(err.value)


def test_skip_summary_lists_only_the_first_ids_of_malformed_records(tmp_path):
    bad = [person(100 + i, [10, 10, 30, 30]) | {"image_id": 99} for i in range(7)]
    crowd = [person(200 + i, [10, 10, 30, 30], iscrowd=1) for i in range(2)]
    _, report = load_instances(write_coco(tmp_path / "ann.json", [person(1, [10, 10, 30, 30]), *bad, *crowd]))
    assert "unknown_image_id=7 [ids 100, 101, 102, 103, 104, ...]" in report.summary()
    assert "crowd=2," in report.summary()  # a normal quirk of the data: counted, no ids


def test_annotation_without_id_is_skipped_or_raises_when_strict(tmp_path):
    ann = person(1, [10, 10, 30, 30])
    del ann["id"]
    ann_file = write_coco(tmp_path / "ann.json", [ann, person(2, [10, 10, 30, 30])])
    instances, report = load_instances(ann_file)
    assert [i.instance_id for i in instances] == [2] and report.counts == {"no_annotation_id": 1}
    with pytest.raises(DataError, match="annotation #0"):
        load_instances(ann_file, strict=True)


@pytest.mark.parametrize("categories", [[], [{"id": 2, "name": "dog"}], None])
def test_file_without_a_person_category_raises(tmp_path, categories):
    path = tmp_path / "ann.json"
    doc = json.loads(Path(write_coco(path, [person(1, [10, 10, 30, 30])])).read_text())
    if categories is None:
        del doc["categories"]
    else:
        doc["categories"] = categories
    path.write_text(json.dumps(doc))
    with pytest.raises(DataError, match="no person category") as err:
        load_instances(str(path))
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_malformed_detections_are_counted_skips(tmp_path):
    ann_file = write_coco(tmp_path / "ann.json", [person(10, [20, 10, 40, 80])])
    det_file = tmp_path / "dets.json"
    good = {"image_id": 1, "category_id": 1, "bbox": [20, 10, 40, 80], "score": 0.9}
    bad = [good | {"image_id": 5}, good | {"bbox": [1, 2, -3, 4]}, good | {"score": None}]
    det_file.write_text(json.dumps([good, *bad]))
    instances, report = load_instances(ann_file, "val", str(det_file))
    assert len(instances) == 1
    assert report.counts == {"unknown_image_id": 1, "bad_box": 1, "bad_score": 1}
    with pytest.raises(DataError, match="detection #1"):
        load_instances(ann_file, "val", str(det_file), strict=True)


def test_unparsable_detection_file_raises(tmp_path):
    ann_file = write_coco(tmp_path / "ann.json", [person(10, [20, 10, 40, 80])])
    det_file = tmp_path / "dets.json"
    det_file.write_text("[{")
    with pytest.raises(DataError, match="dets.json"):
        load_instances(ann_file, "val", str(det_file))


def test_data_fingerprint(tmp_path):
    ann_file = write_coco(tmp_path / "ann.json", [person(10, [20, 10, 40, 80])])
    fp = data_fingerprint(ann_file)
    assert fp.sha256 == hashlib.sha256(Path(ann_file).read_bytes()).hexdigest()
    assert (fp.num_images, fp.num_annotations) == (1, 1)
    assert fp.to_dict()["sha256"] == fp.sha256


# ----------------------------------------------------------------------------- read_image


def _save(image: Image.Image, path: Path, **kwargs) -> None:
    image.save(path, **kwargs)


def test_read_image_converts_modes_to_rgb(tmp_path):
    rgb = noise_image(30, 40)
    _save(Image.fromarray(rgb), tmp_path / "rgb.png")
    _save(Image.fromarray(rgb[..., 0]), tmp_path / "gray.jpg", quality=95)
    _save(Image.fromarray(rgb).convert("CMYK"), tmp_path / "cmyk.jpg", quality=95)
    _save(Image.fromarray(np.dstack([rgb, np.full((30, 40), 128, np.uint8)])), tmp_path / "rgba.png")
    _save(Image.fromarray(rgb).convert("P"), tmp_path / "palette.png")
    _save(Image.fromarray(rgb[..., 1].astype(np.uint16) << 8), tmp_path / "gray16.png")
    for name in ("rgb.png", "gray.jpg", "cmyk.jpg", "rgba.png", "palette.png", "gray16.png"):
        out = read_image(str(tmp_path), name)
        assert out.shape == (30, 40, 3) and out.dtype == np.uint8, name
    np.testing.assert_array_equal(read_image(str(tmp_path), "rgb.png"), rgb)
    np.testing.assert_array_equal(read_image(str(tmp_path), "rgba.png"), rgb)
    np.testing.assert_array_equal(read_image(str(tmp_path), "gray16.png")[..., 2], rgb[..., 1])
    gray = read_image(str(tmp_path), "gray.jpg").astype(int)
    assert np.abs(gray[..., 0] - gray[..., 2]).max() == 0
    cmyk = read_image(str(tmp_path), "cmyk.jpg").astype(int)
    assert np.abs(cmyk - rgb.astype(int)).mean() < 25  # lossy JPEG of noise, same colours


def test_read_image_missing_and_corrupt_raise_image_error(tmp_path):
    with pytest.raises(ImageError, match="missing.jpg") as err:
        read_image(str(tmp_path), "missing.jpg")
    assert err.value.image_file == "missing.jpg" and "not found" in err.value.reason
    (tmp_path / "garbage.jpg").write_bytes(b"definitely not an image")
    with pytest.raises(ImageError, match="garbage.jpg"):
        read_image(str(tmp_path), "garbage.jpg")
    buf = io.BytesIO()
    Image.fromarray(noise_image()).save(buf, format="JPEG")
    (tmp_path / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ImageError, match="truncated.jpg"):
        read_image(str(tmp_path), "truncated.jpg")


def test_read_image_from_s3(tmp_path, monkeypatch):
    moto_server = pytest.importorskip("moto.server")
    boto3 = pytest.importorskip("boto3")
    import s3fs

    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        for key, value in {
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }.items():
            monkeypatch.setenv(key, value)
        s3fs.S3FileSystem.clear_instance_cache()  # a cached client would keep an old endpoint
        client = boto3.client("s3", endpoint_url=endpoint)
        client.create_bucket(Bucket="bkt")
        rgb = noise_image(20, 30)
        buf = io.BytesIO()
        Image.fromarray(rgb).save(buf, format="PNG")
        client.put_object(Bucket="bkt", Key="coco/images/a.png", Body=buf.getvalue())
        np.testing.assert_array_equal(read_image("s3://bkt/coco/images/", "a.png"), rgb)
        with pytest.raises(ImageError, match="b.png"):
            read_image("s3://bkt/coco/images", "b.png")
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
        server.stop()
