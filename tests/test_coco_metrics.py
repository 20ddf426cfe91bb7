"""distilpose.coco_metrics: decoding, flip-back, COCO results, OKS-NMS and COCOeval on a tiny real data set."""

import json
import math

import numpy as np
import pytest

from distilpose.coco_metrics import (
    METRIC_NAMES,
    crop_box_areas,
    crop_to_image,
    evaluate_keypoints,
    flip_back,
    format_table,
    heatmap_to_crop,
    make_results,
    normalized_to_crop,
    oks_nms,
    oks_one_to_many,
)
from distilpose.keypoints import FLIP_PAIRS, OKS_SIGMAS

# A standing person in a unit box, COCO joint order (x, y).
TEMPLATE = np.array(
    [
        [0.50, 0.08],
        [0.55, 0.06],
        [0.45, 0.06],
        [0.60, 0.08],
        [0.40, 0.08],
        [0.70, 0.22],
        [0.30, 0.22],
        [0.80, 0.38],
        [0.20, 0.38],
        [0.85, 0.52],
        [0.15, 0.52],
        [0.62, 0.55],
        [0.38, 0.55],
        [0.63, 0.75],
        [0.37, 0.75],
        [0.64, 0.95],
        [0.36, 0.95],
    ]
)
# (image_id, box x, y, w, h): medium and large persons, well apart within each image.
PERSONS = [
    (1, 20, 30, 60, 120),
    (1, 200, 40, 150, 300),
    (1, 420, 100, 70, 130),
    (2, 50, 50, 160, 320),
    (2, 300, 60, 55, 110),
    (3, 10, 10, 65, 125),
    (3, 150, 20, 170, 330),
    (3, 400, 200, 60, 115),
]


@pytest.fixture(scope="module")
def coco_gt(tmp_path_factory):
    """Writes a COCO person_keypoints json; returns (path, gt coords (M,17,2), visibility, areas, ids)."""
    rng = np.random.default_rng(0)
    images = [{"id": i, "file_name": f"{i:06d}.jpg", "width": 640, "height": 480} for i in (1, 2, 3)]
    annotations, coords, visible, areas = [], [], [], []
    for ann_id, (image_id, x, y, w, h) in enumerate(PERSONS, start=1):
        joints = (TEMPLATE + rng.uniform(-0.03, 0.03, TEMPLATE.shape)) * [w, h] + [x, y]
        vis = np.ones(17, dtype=int) * 2
        vis[rng.choice(17, size=3, replace=False)] = 0  # a few unlabelled joints per person
        kpts = np.concatenate([np.where(vis[:, None] > 0, joints, 0.0), vis[:, None]], axis=1)
        area = 0.6 * w * h
        annotations.append(
            {
                "id": ann_id,
                "image_id": image_id,
                "category_id": 1,
                "keypoints": kpts.reshape(-1).tolist(),
                "num_keypoints": int((vis > 0).sum()),
                "bbox": [x, y, w, h],
                "area": area,
                "iscrowd": 0,
            }
        )
        coords.append(joints)
        visible.append(vis > 0)
        areas.append(area)
    dataset = {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": 1, "name": "person", "keypoints": [str(k) for k in range(17)], "skeleton": []}],
    }
    path = tmp_path_factory.mktemp("coco") / "person_keypoints_val.json"
    path.write_text(json.dumps(dataset))
    image_ids = np.array([p[0] for p in PERSONS])
    return path, np.array(coords), np.array(visible), np.array(areas), image_ids


def _results(coco_gt, coords):
    _, _, _, areas, image_ids = coco_gt
    n = len(image_ids)
    return make_results(image_ids, coords, np.ones((n, 17)), np.ones(n), areas)


def test_ground_truth_as_predictions_scores_perfect_ap(coco_gt, tmp_path, capsys):
    path, coords, visible, _, _ = coco_gt
    results = _results(coco_gt, coords)
    out_json = tmp_path / "sub" / "results.json"
    metrics = evaluate_keypoints(path, results, out_json=out_json)
    assert set(metrics) == set(METRIC_NAMES)
    for name in ("AP", "AP50", "AP75", "APM", "APL", "AR"):
        assert metrics[name] == pytest.approx(1.0), name
    assert capsys.readouterr().out == ""  # pycocotools' prints are silenced
    assert json.loads(out_json.read_text()) == results
    assert "bbox" not in results[0]  # pycocotools got copies, not our dicts


def test_ap_drops_monotonically_with_jitter(coco_gt):
    path, coords, _, areas, _ = coco_gt
    noise = np.random.default_rng(1).standard_normal(coords.shape)
    scale = np.sqrt(areas)[:, None, None]  # jitter relative to person size, as OKS measures it
    aps = [
        evaluate_keypoints(path, _results(coco_gt, coords + level * scale * noise))["AP"]
        for level in (0.0, 0.03, 0.06, 0.12)
    ]
    assert aps[0] == pytest.approx(1.0)
    assert aps[0] > aps[1] > aps[2] > aps[3], aps


def test_empty_predictions_give_zeros_and_a_warning(coco_gt):
    with pytest.warns(UserWarning, match="no predictions"):
        metrics = evaluate_keypoints(coco_gt[0], [])
    assert metrics == dict.fromkeys(METRIC_NAMES, 0.0)


def test_unknown_image_id_is_a_clear_error(coco_gt):
    path, coords, _, areas, _ = coco_gt
    results = make_results([99], coords[:1], np.ones((1, 17)), [1.0], areas[:1])
    with pytest.raises(ValueError, match="not in the ground truth"):
        evaluate_keypoints(path, results)


def test_make_results_layout_and_person_score():
    coords = np.arange(2 * 17 * 2, dtype=float).reshape(2, 17, 2)
    scores = np.full((2, 17), 0.1)
    scores[0, :4] = [0.5, 0.7, 0.9, 0.2]  # only values above 0.2 count
    results = make_results(np.array([7, 8]), coords, scores, [0.8, 0.9], [100.0, 200.0])
    first = results[0]
    assert (first["image_id"], first["category_id"], first["area"]) == (7, 1, 100.0)
    assert len(first["keypoints"]) == 51
    assert first["keypoints"][3:6] == [2.0, 3.0, 0.7]
    assert first["score"] == pytest.approx(0.8 * 0.7)
    assert results[1]["score"] == 0.0  # no joint above vis_thr
    json.dumps(results)  # plain Python types only


def test_oks_nms_drops_duplicate_keeps_distinct_person(coco_gt):
    _, coords, _, areas, _ = coco_gt
    person_a, person_b = coords[0], coords[2]  # same image, different people
    dets = make_results(
        [1, 1, 1, 2],
        np.stack([person_a, person_a + 0.5, person_b, person_a]),
        np.ones((4, 17)),
        [0.9, 0.8, 0.7, 0.6],
        [areas[0], areas[0], areas[2], areas[0]],
    )
    kept = oks_nms(dets, thr=0.9)
    assert [(r["image_id"], r["score"]) for r in kept] == [(1, 0.9), (1, 0.7), (2, 0.6)]
    assert len(oks_nms(dets, thr=1.0)) == 4


def _eval_affines(boxes, input_size=(256, 192)):
    from distilpose.data.coco import box_to_center_scale
    from distilpose.data.transforms import ViewParams, affine_matrix

    views = [ViewParams(*(tuple(v) for v in box_to_center_scale(box, input_size))) for box in boxes]
    return np.stack([affine_matrix(view, input_size) for view in views])


def test_crop_box_area_is_the_padded_aspect_fitted_box():
    # (30, 80) is too narrow for 192:256 -> (60, 80), padded x1.25 -> (75, 100); (90, 40) too flat.
    affines = _eval_affines([(10, 20, 30, 80), (5, 5, 90, 40)])
    np.testing.assert_allclose(crop_box_areas(affines, (256, 192)), [75 * 100, 112.5 * 150], rtol=1e-5)


def test_oks_nms_crop_box_areas_suppress_what_box_areas_keep():
    # Two detections of one person, the second shifted by 4 px: with the padded crop-box area
    # (as mmpose) they are one person (OKS > 0.9), with the raw box area they are two.
    box = (100, 50, 60, 160)
    pose = np.array([box[0], box[1]]) + TEMPLATE * np.array([box[2], box[3]])
    coords = np.stack([pose, pose + 4.0])
    crop_areas = crop_box_areas(_eval_affines([box, box]), (256, 192))
    box_areas = [box[2] * box[3]] * 2
    oks_crop = oks_one_to_many(pose, crop_areas[0], coords[1:], crop_areas[1:], OKS_SIGMAS)[0]
    oks_box = oks_one_to_many(pose, box_areas[0], coords[1:], np.array(box_areas[1:]), OKS_SIGMAS)[0]
    assert oks_box < 0.9 < oks_crop
    for areas, survivors in ((crop_areas, [0.9]), (box_areas, [0.9, 0.8])):
        results = make_results([1, 1], coords, np.ones((2, 17)), [0.9, 0.8], areas)
        assert [r["score"] for r in oks_nms(results, thr=0.9)] == pytest.approx(survivors)


def test_oks_nms_breaks_ties_as_mmpose():
    # mmpose keeps scores.argsort()[::-1][0]: of equal scores, the later result.
    pose = TEMPLATE * 100
    results = make_results([1, 1], np.stack([pose, pose + 1.0]), np.ones((2, 17)), [0.5, 0.5], [1e4, 1e4])
    kept = oks_nms(results, thr=0.9)
    assert len(kept) == 1 and kept[0]["keypoints"][0] == pytest.approx(pose[0, 0] + 1.0)


def test_crop_to_image_inverts_rotated_scaled_affine():
    rng = np.random.default_rng(2)
    affines = []
    for angle, sx, sy in ((30.0, 0.5, 0.5), (-75.0, 2.0, 1.5), (0.0, 1.0, 1.0)):
        c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
        linear = np.array([[c, -s], [s, c]]) @ np.diag([sx, sy])
        affines.append(np.concatenate([linear, rng.uniform(-100, 100, (2, 1))], axis=1))
    affines = np.array(affines, dtype=np.float32)
    points = rng.uniform(0, 500, (3, 17, 2))
    crop = np.einsum("nij,nkj->nki", affines[:, :, :2].astype(float), points) + affines[:, None, :, 2]
    np.testing.assert_allclose(crop_to_image(crop, affines), points, atol=1e-3)


def test_decoding_helpers_scale_per_axis():
    np.testing.assert_allclose(heatmap_to_crop([[[10.0, 20.0]]], (64, 48), (256, 192)), [[[40.0, 80.0]]])
    np.testing.assert_allclose(normalized_to_crop([[[0.5, 0.25]]], (256, 192)), [[[96.0, 64.0]]])


def test_flip_back_exact_is_an_involution_and_swaps_partners():
    rng = np.random.default_rng(3)
    coords, scores = rng.uniform(0, 1, (2, 17, 2)), rng.uniform(0, 1, (2, 17))
    once = flip_back(coords, scores, FLIP_PAIRS, mode="exact", input_width=192)
    twice = flip_back(*once, FLIP_PAIRS, mode="exact", input_width=192)
    np.testing.assert_allclose(twice[0], coords)
    np.testing.assert_allclose(twice[1], scores)
    for left, right in FLIP_PAIRS:
        np.testing.assert_allclose(once[0][:, left, 0], 191 / 192 - coords[:, right, 0])
        np.testing.assert_allclose(once[0][:, right, 1], coords[:, left, 1])
        np.testing.assert_allclose(once[1][:, left], scores[:, right])
    np.testing.assert_allclose(once[1][:, 0], scores[:, 0])


def test_flip_back_exact_recovers_pixel_position():
    width, x_px = 192, 37.0
    flipped = np.array([[[(width - 1 - x_px) / width, 0.3]]])  # the joint as seen in the mirrored crop
    coords, _ = flip_back(flipped, np.ones((1, 1)), [], mode="exact", input_width=width)
    assert coords[0, 0, 0] * width == pytest.approx(x_px)


def test_flip_back_official_mirrors_in_normalized_units_and_keeps_score_order():
    rng = np.random.default_rng(4)
    coords, scores = rng.uniform(0, 1, (2, 17, 2)), rng.uniform(0, 1, (2, 17))
    official = flip_back(coords, scores, FLIP_PAIRS, mode="official")
    exact = flip_back(coords, scores, FLIP_PAIRS, mode="exact", input_width=192)
    np.testing.assert_allclose(official[0][:, 5, 0], 1.0 - coords[:, 6, 0])
    np.testing.assert_allclose(official[0][..., 0] - exact[0][..., 0], 1 / 192)  # the 1-px quirk
    np.testing.assert_allclose(official[0][..., 1], exact[0][..., 1])
    np.testing.assert_allclose(official[1], scores)  # scores not swapped
    with pytest.raises(ValueError, match="input_width"):
        flip_back(coords, scores, mode="exact")
    with pytest.raises(ValueError, match="flip mode"):
        flip_back(coords, scores, mode="udp", input_width=192)


def test_format_table_aligns_columns():
    table = format_table([{"model": "distilpose-s", "AP": 0.716}, {"model": "teacher", "AP": 0.75, "note": "w48"}])
    lines = table.splitlines()
    assert lines[0].split() == ["model", "AP", "note"]
    assert lines[2].split() == ["distilpose-s", "0.7160", "-"]
    assert lines[2].index("0.7160") == lines[3].index("0.7500")
    assert OKS_SIGMAS.shape == (17,)
