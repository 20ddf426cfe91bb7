"""The teacher caching stage end to end: real Ray Data, real files, real S3 (moto).

The in-process tests run in the session's local Ray (tests/pipeline_fixtures.py). The
SIGKILL-resume, job-submit and multi-node tests start their own clusters and take minutes:
they are heavy (`make test-heavy`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from pipeline_fixtures import ensure_local_ray

from distilpose.data.coco import DataError, load_coco, load_instances, read_image
from distilpose.data.synthetic import make_synthetic_coco
from distilpose.data.transforms import apply_view, crop_of_view
from distilpose.data.views import view_for
from distilpose.errors import UserError
from distilpose.teacher_forward import build_teacher, run_teacher
from pipeline import storage
from pipeline.cache import CacheMismatchError, check_compatible, open_reader
from pipeline.cache.encodings import decode_crop_jpeg, decode_field, encode_crop_jpeg, encode_field, error_bound
from pipeline.cache_loader import CachedViewStream
from pipeline.teacher_stage import CacheJobConfig, run_cache_job

ROOT = Path(__file__).resolve().parents[1]
TEACHER = "tokenpose-tiny"


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    make_synthetic_coco(root, num_train=12, num_val=4, seed=1)
    return root


def _config(synth: Path, out: str, **kw) -> CacheJobConfig:
    base = dict(data=str(synth), teacher=TEACHER, out=out, views=2, shard_instances=8, batch_size=8)
    base.update(kw)
    return CacheJobConfig(**base)


def _shard_hashes(uri: str) -> dict[str, str]:
    """sha256 of every unit (one view of one shard) of a finalized cache, by unit name."""
    return {u.name: u.sha256 for u in open_reader(uri).manifest.units()}


@pytest.fixture(scope="module")
def zarr_cache(synth, s3_server, tmp_path_factory):  # s3_server: its env before Ray starts
    """One default zarr cache job over `synth`: (root, summary), shared by the tests that read
    it or copy it to rerun the job on."""
    ensure_local_ray()
    out = str(tmp_path_factory.mktemp("zarr-cache") / "cache")
    return out, run_cache_job(_config(synth, out))


def test_cache_job_zarr_fields_match_a_direct_teacher_run(synth, zarr_cache):
    out, summary = zarr_cache
    assert summary.complete and summary.rows == summary.instances * 2
    annotations = json.loads((synth / "annotations" / "person_keypoints_train.json").read_text())["annotations"]
    crowd = sum(1 for a in annotations if a.get("iscrowd"))
    assert crowd > 0 and summary.skipped.get("crowd") == crowd and summary.wall_s > 0
    assert "TOTAL" in summary.table()

    reader = open_reader(out)
    fields = [
        "instance_id",
        "image_id",
        "view",
        "view_params",
        "affine",
        "heatmaps",
        "gauss",
        "confidence",
        "kpt_tokens",
        "vis_tokens",
        "joints",
        "joint_weights",
    ]
    rows = np.arange(len(reader))
    cached = reader.read_rows(rows, fields=fields)
    layout_ann = str(synth / "annotations" / "person_keypoints_train.json")
    instances = {i.instance_id: i for i in load_instances(layout_ann, input_size=(128, 96))[0]}
    _, images = load_coco(layout_ann)
    teacher = build_teacher(TEACHER, None)
    crops, joints = [], []
    for iid, img_id, v in zip(cached["instance_id"], cached["image_id"], cached["view"]):
        inst = instances[int(iid)]
        view = view_for(inst, int(v), seed=0)
        crop, jc = apply_view(
            read_image(str(synth / "images" / "train"), images[int(img_id)].file_name), inst.joints, view, (128, 96)
        )
        crops.append(crop)
        joints.append(jc)
        np.testing.assert_array_equal(view.to_array(), cached["view_params"][len(crops) - 1])
    joints = np.stack(joints)
    np.testing.assert_array_equal(joints[..., :2], cached["joints"])
    np.testing.assert_array_equal(joints[..., 2], cached["joint_weights"])
    fresh = run_teacher(teacher, np.stack(crops), 8, torch.device("cpu"))
    for name in ("heatmaps", "kpt_tokens", "vis_tokens"):
        expected = decode_field(name, encode_field(name, fresh[name], reader.spec), reader.spec)
        np.testing.assert_allclose(cached[name], expected, atol=1e-6, err_msg=name)
    np.testing.assert_allclose(cached["gauss"], fresh["gauss"], atol=1e-5)
    np.testing.assert_allclose(cached["confidence"], fresh["confidence"], atol=1e-5)
    # Each instance has views 0..V-1, and view 0 is the un-augmented crop.
    assert sorted(set(cached["view"].tolist())) == [0, 1]
    assert np.all(cached["view_params"][cached["view"] == 0][:, 4:] == 0)


def test_the_in_process_engine_writes_the_ray_data_stages_units(synth, zarr_cache, tmp_path, capsys):
    """`--engine in-process` runs the same crop task, teacher and sink code without Ray: every
    unit is byte for byte the one the Ray Data stage wrote (the tests that only need a cache
    build theirs this way)."""
    ray_built, ray_summary = zarr_cache
    out = str(tmp_path / "cache")
    summary = run_cache_job(_config(synth, out, engine="in-process"))
    assert "[cache] in-process: 3 shards one after another, no Ray" in capsys.readouterr().out
    assert summary.complete and summary.skipped == ray_summary.skipped and summary.rows == ray_summary.rows
    assert _shard_hashes(out) == _shard_hashes(ray_built) and len(_shard_hashes(out)) == 6
    for ray_only in ({"workers": 2}, {"gpus_per_worker": 1.0}):
        with pytest.raises(ValueError, match="--engine in-process runs one teacher"):
            _config(synth, out, engine="in-process", **ray_only)


@pytest.mark.heavy  # four cache jobs (the grow tests build local and S3, Zarr and WebDataset too): ~30 s
def test_cache_job_same_bytes_local_and_s3_both_formats(synth, local_ray, tmp_path, s3_bucket):
    for fmt in ("zarr", "wds"):
        local = str(tmp_path / fmt)
        remote = f"{s3_bucket}/cache-{fmt}"
        run_cache_job(_config(synth, local, format=fmt, store_crops="jpeg"))
        run_cache_job(_config(synth, remote, format=fmt, store_crops="jpeg"))
        assert _shard_hashes(local) == _shard_hashes(remote)
        a, b = open_reader(local), open_reader(remote)
        assert a.manifest.format == fmt and len(a) == len(b)
        rows_a, rows_b = a.read_shard(0), b.read_shard(0)
        assert set(rows_a) == set(rows_b)
        for key in rows_a:
            np.testing.assert_array_equal(np.asarray(rows_a[key]), np.asarray(rows_b[key]), err_msg=key)
        assert len(rows_a["crop_jpeg"][0]) > 100  # stored JPEG crops


def test_stored_jpeg_crops_are_the_pixels_the_teacher_saw(synth, tmp_path, tiny_teacher):
    """--store-crops jpeg: the teacher runs on the decoded stored crop, so the loader's crop
    and the cached targets agree; rerunning the teacher on the loader's batch gives them back."""
    out = str(tmp_path / "cache")
    run_cache_job(_config(synth, out, store_crops="jpeg", checkpoint=tiny_teacher, engine="in-process"))
    reader = open_reader(out)
    rows = reader.read_shard(reader.manifest.shards[0].index, fields=["image_id", "view_params", "crop_jpeg"])
    _, images = load_coco(str(synth / "annotations" / "person_keypoints_train.json"))
    changed = 0
    for image_id, params, jpeg in zip(rows["image_id"], rows["view_params"], rows["crop_jpeg"]):
        raw = crop_of_view(
            read_image(str(synth / "images" / "train"), images[int(image_id)].file_name), params, (128, 96)
        )
        np.testing.assert_array_equal(decode_crop_jpeg(jpeg), decode_crop_jpeg(encode_crop_jpeg(raw)))
        changed += int(np.abs(decode_crop_jpeg(jpeg).astype(int) - raw).max() > 2)
    assert changed > 0  # JPEG moves pixels: the teacher must see the decoded crop, not the raw one

    fields = ("heatmaps", "kpt_tokens", "vis_tokens")
    stream = CachedViewStream(reader, None, None, (128, 96), fields, rank=0, world_size=1, batch_size=8, seed=0)
    batch = next(iter(stream.epoch(0)))
    with torch.inference_mode():
        again = build_teacher(TEACHER, tiny_teacher)(batch["image"])
    for name in fields:
        fresh = getattr(again, name).numpy()
        # The encoding's bound, taken per (view, joint) / per token: the two forwards run in
        # different batches, so a value on the threshold may fall on either side of it.
        slice_axes = (-2, -1) if name == "heatmaps" else (-1,)
        bound = error_bound(name, fresh, reader.spec).max(axis=slice_axes, keepdims=True)
        assert np.all(np.abs(batch[name].numpy() - fresh) <= bound * 1.001 + 1e-6), name


def test_rerun_reuses_committed_shards_and_refuses_other_settings(synth, zarr_cache, local_ray, tmp_path):
    out = str(tmp_path / "cache")
    shutil.copytree(zarr_cache[0], out)  # a finished run of the same command
    first = zarr_cache[1]
    again = run_cache_job(_config(synth, out))
    assert again.units_reused == again.units_total == first.units_total == 2 * first.shards_total
    assert again.views_computed == 0 and "views computed this run 0" in again.table()
    with pytest.raises(UserError, match=r"(?s)1 difference\(s\).*seed: cache has 0, this run 3"):
        run_cache_job(_config(synth, out, seed=3))
    # A nested difference is named by its path, not by two truncated copies of the section.
    with pytest.raises(CacheMismatchError, match=r"(?s)\n  - spec\.heatmap_encoding: cache has 'i8-thresh'"):
        run_cache_job(_config(synth, out, heatmap_encoding="fp16"))
    # A job.json written before fields were added (here: the teacher's head, the spec's
    # tokens) is the same cache: an upgraded version resumes it instead of refusing it.
    job = tmp_path / "cache" / "job.json"
    older = json.loads(job.read_text())
    del older["teacher"]["config"]["head"], older["spec"]["tokens"]
    job.write_text(json.dumps(older))
    assert run_cache_job(_config(synth, out)).views_computed == 0
    with pytest.raises(UserError, match="--views 1 would shrink it.*--cache-views 1"):
        run_cache_job(_config(synth, out, views=1))
    manifest = open_reader(out).manifest
    with pytest.raises(CacheMismatchError, match="checkpoint_sha256"):
        check_compatible(manifest, {"teacher": {"checkpoint_sha256": "0" * 64}})


def test_bad_inputs_are_counted_not_fatal(synth, local_ray, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(synth, data)
    ann = data / "annotations" / "person_keypoints_train.json"
    doc = json.loads(ann.read_text())
    broken = doc["images"][0]["file_name"]
    (data / "images" / "train" / broken).write_bytes(b"not a jpeg")
    # People away from the broken image, so that image still has instances to fail on.
    people = [a for a in doc["annotations"] if not a["iscrowd"] and a["image_id"] != doc["images"][0]["id"]]
    people[0]["keypoints"] = [0] * 51
    people[0]["num_keypoints"] = 0
    # Malformed rows: a keypoint list of the wrong length, a negative box size, an unknown image.
    people[1]["keypoints"] = people[1]["keypoints"][:-3]
    people[2]["bbox"][2] = -people[2]["bbox"][2]
    people[3]["image_id"] = 10**9
    ann.write_text(json.dumps(doc))
    summary = run_cache_job(_config(data, str(tmp_path / "cache")))
    assert summary.complete
    assert summary.skipped["no_labelled_joints"] >= 1
    assert {k: summary.skipped[k] for k in ("bad_keypoints", "bad_box", "unknown_image_id")} == {
        "bad_keypoints": 1,
        "bad_box": 1,
        "unknown_image_id": 1,
    }
    assert summary.skipped["image: cannot decode"] >= 2, summary.skipped
    # The summary names the instances lost with the bad image, so it can be found.
    on_broken = {a["id"] for a in doc["annotations"] if a["image_id"] == doc["images"][0]["id"]}
    named = re.search(r"images: image: cannot decode \[instance ids ([\d, ]+)\]", summary.table())
    assert named and {int(i) for i in named.group(1).split(", ")} <= on_broken, summary.table()
    assert f"bad_box=1 [ids {people[2]['id']}]" in summary.table()
    with pytest.raises(DataError, match=f"annotation id {people[1]['id']}: expected 51 keypoint values"):
        run_cache_job(_config(data, str(tmp_path / "strict"), strict=True))
    # --strict also stops at a bad image (raised in a Ray task, reported as itself).
    ann.write_text(json.dumps(json.loads((synth / "annotations" / "person_keypoints_train.json").read_text())))
    with pytest.raises(UserError, match=f"--strict: instance .*{broken}.*cannot decode"):
        run_cache_job(_config(data, str(tmp_path / "strict-image"), strict=True))


@pytest.mark.heavy  # a cache job and two CLI subprocesses (verify itself: test_cache_manifest.py): ~10 s
def test_verify_cli_detects_a_flipped_byte(synth, local_ray, tmp_path):
    out = tmp_path / "cache"
    run_cache_job(_config(synth, str(out), format="wds"))
    job = [sys.executable, str(ROOT / "jobs" / "cache_teacher.py"), "--verify", str(out)]
    assert subprocess.run(job, capture_output=True, timeout=120).returncode == 0
    shard = sorted((out / "shards").glob("*.tar"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    result = subprocess.run(job, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "corrupt" in result.stdout.lower()


# ----------------------------------------------------------------------------- own clusters


def _job_cmd(synth: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        str(ROOT / "jobs" / "cache_teacher.py"),
        "--data",
        str(synth),
        "--teacher",
        TEACHER,
        "--out",
        str(out),
        "--views",
        "2",
        "--shard-instances",
        "2",
        "--batch-size",
        "4",
        *extra,
    ]


def _env() -> dict:
    # The venv first on PATH: a submitted job's `python` must be the one with our packages,
    # as it is in the cluster image.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = dict(os.environ, RAY_AUTH_MODE="disabled", PYTHONUNBUFFERED="1", PATH=path)
    env.pop("RAY_ADDRESS", None)
    return env


@pytest.mark.heavy
def test_sigkill_mid_run_then_rerun_gives_identical_cache(synth, tmp_path):
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    # The reference in-process (the same units, and no Ray start); the killed run is Ray's.
    subprocess.run(
        _job_cmd(synth, clean, "--engine", "in-process"), check=True, capture_output=True, timeout=300, env=_env()
    )
    # Own session: the kill takes the driver and the local Ray it started, like a lost machine.
    proc = subprocess.Popen(
        _job_cmd(synth, killed),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        env=_env(),
    )
    try:
        deadline = time.time() + 240
        while time.time() < deadline and len(list((killed / "commits").glob("*.json"))) < 2:
            time.sleep(0.2)
        assert proc.poll() is None, "the job finished before it could be killed; make the data set larger"
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert not (killed / "manifest.json").exists()
    rerun = subprocess.run(_job_cmd(synth, killed), capture_output=True, text=True, timeout=300, env=_env())
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "resuming" in rerun.stdout
    assert _shard_hashes(str(killed)) == _shard_hashes(str(clean))


@pytest.mark.heavy
def test_two_node_cluster(synth, tmp_path):
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()  # this test brings its own cluster
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1)
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        from pipeline.ray_env import init_ray

        init_ray(address=cluster.address)
        assert len([n for n in ray.nodes() if n["Alive"]]) == 3
        summary = run_cache_job(_config(synth, str(tmp_path / "cache"), workers=2, shard_instances=4))
        assert summary.complete and summary.rows == summary.instances * 2
    finally:
        ray.shutdown()
        cluster.shutdown()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.heavy
def test_ray_job_submit_against_a_local_head(synth, tmp_path):
    gcs, dash, agent = _free_port(), _free_port(), _free_port()
    env = _env()
    head = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "ray"),
            "start",
            "--head",
            "--block",
            f"--port={gcs}",
            "--num-cpus=2",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dash}",
            # Not the fixed default (52365): another Ray on this host may hold it, and without
            # its HTTP port the job agent never comes up ("No available agent to submit job").
            f"--dashboard-agent-listen-port={agent}",
            "--disable-usage-stats",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        env=env,
    )
    try:
        out = tmp_path / "cache"
        submit = [
            str(Path(sys.executable).parent / "ray"),
            "job",
            "submit",
            "--address",
            f"http://127.0.0.1:{dash}",
            "--working-dir",
            str(ROOT),
            "--",
            "python",
            "jobs/cache_teacher.py",
            "--data",
            str(synth),
            "--teacher",
            TEACHER,
            "--out",
            str(out),
            "--views",
            "1",
            "--shard-instances",
            "16",
        ]
        # The jobs API comes up a few seconds after the head, and on a loaded machine its job
        # agent later still (HTTP 500 "No available agent"): retry both, for a bounded time.
        not_ready = ("Connection", "No available agent to submit job")
        deadline, result = time.time() + 120, None
        while time.time() < deadline:
            result = subprocess.run(submit, capture_output=True, text=True, timeout=300, env=env)
            if result.returncode == 0 or not any(m in result.stdout + result.stderr for m in not_ready):
                break
            time.sleep(2)
        assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
        assert "succeeded" in result.stdout + result.stderr
        assert open_reader(str(out)).manifest.complete
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(timeout=30)


def test_storage_layout_has_no_pickle(synth, tmp_path):
    out = str(tmp_path / "cache")
    run_cache_job(_config(synth, out, format="wds", engine="in-process"))
    names = storage.find_files(out)
    assert not any(n.endswith((".pkl", ".pickle", ".pyd", ".pth")) for n in names), names


def test_progress_counts_shards_from_one_listing_without_reading_records(tmp_path, monkeypatch, capsys):
    """The progress line polls every 10 s during a run: one listing each time, never one read
    per commit record (on S3 that grew with shards^2 over a run). finalize then reuses the
    records the job read once."""
    from test_cache_store import SMALL_SPEC, base_manifest, teacher_like_rows

    from pipeline.cache import open_writer
    from pipeline.progress import ShardProgress
    from pipeline.teacher_stage import ShardSpec

    uri = str(tmp_path / "cache")
    writer = open_writer(uri, SMALL_SPEC, "zarr")
    shards = 16
    for index in range(shards - 6):
        writer.write_shard(index, teacher_like_rows(SMALL_SPEC, 8, seed=index, first_instance=2 * index))
    calls = {"listdir": 0, "read": 0}

    def counted(name, fn, key):
        def wrapper(*args, **kwargs):
            calls[key] += 1
            return fn(*args, **kwargs)

        monkeypatch.setattr(storage, name, wrapper)

    counted("listdir", storage.listdir, "listdir")
    counted("read_bytes", storage.read_bytes, "read")
    counted("read_many_bytes", storage.read_many_bytes, "read")
    # The instance count is all progress needs of a shard: two per shard, four views each.
    todo = [ShardSpec(index, instances=[None, None], views=(0, 1, 2, 3)) for index in range(5, shards)]
    ShardProgress(writer, todo)._report()
    assert "20/44 shard-views, 40/88 views" in capsys.readouterr().out
    assert calls == {"listdir": 1, "read": 0}

    for index in range(shards - 6, shards):
        writer.write_shard(index, teacher_like_rows(SMALL_SPEC, 8, seed=index, first_instance=2 * index))
    committed = writer.committed()
    calls.update(listdir=0, read=0)
    final = writer.finalize(base_manifest(), expected_shards=shards, committed=committed)
    assert calls["read"] == 0 and final.num_rows == 8 * shards


def test_store_crops_auto_stores_them_where_images_cost_requests(tmp_path, s3_bucket, capsys):
    """--store-crops auto: JPEG crops when the cache or the images are on S3 (students then
    GET no source image per epoch), none for local ones, and an existing cache's choice."""
    from pipeline.cache_claim import resolve_store_crops

    local = str(tmp_path / "images")
    assert resolve_store_crops("auto", str(tmp_path / "a"), local) == "none"
    assert resolve_store_crops("auto", f"{s3_bucket}/cache", local) == "jpeg"
    assert resolve_store_crops("auto", str(tmp_path / "b"), f"{s3_bucket}/images") == "jpeg"
    assert resolve_store_crops("none", f"{s3_bucket}/cache", local) == "none"  # an explicit choice stands
    assert "--store-crops auto: jpeg (the cache or the images are on S3" in capsys.readouterr().out
    started = tmp_path / "started"
    started.mkdir()
    (started / "job.json").write_text(json.dumps({"spec": {"store_crops": True}}))
    assert resolve_store_crops("auto", str(started), local) == "jpeg"
