"""Cache stores (Zarr v3 and WebDataset), locally and on S3 (moto server over HTTP): round trips,
columnar reads, commits and resume, multi-process writers."""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import subprocess
import sys
import tarfile
from functools import partial

import numpy as np
import pytest
from cache_rows import (
    FORMATS,
    SMALL_SPEC,
    assert_decoded_close,
    assert_raw_equal,
    base_manifest,
    concat_rows,
    teacher_like_rows,
    write_cache,
)

from pipeline import storage
from pipeline.cache import (
    CacheMismatchError,
    CacheSpec,
    encode_views,
    open_reader,
    open_writer,
)
from pipeline.cache.schema import (
    CROP_FIELD,
)
from pipeline.cache.verify import verify_cache
from pipeline.cache.wds_store import decode_wds_sample, register_s3_gopen

# ------------------------------------------------------------------ round trips


@pytest.mark.parametrize("fmt", FORMATS)
def test_roundtrip_every_field(cache_root: str, fmt: str) -> None:
    batches = write_cache(cache_root, fmt)
    expected_raw = [encode_views(b, SMALL_SPEC) for b in batches]
    reader = open_reader(cache_root)
    assert reader.manifest.format == fmt and reader.manifest.complete
    assert len(reader) == 32 and reader.shard_indices == [0, 1]
    assert [s.instances for s in reader.manifest.shards] == [5, 3]

    for index, batch in enumerate(batches):
        assert_raw_equal(reader.read_shard(index, decode=False), expected_raw[index])
        assert_decoded_close(reader.read_shard(index), batch, SMALL_SPEC)
        for view in range(4):  # one unit: the shard's instances in id order, all in this view
            one = reader.read_shard(index, view=view, fields=["instance_id", "view", "heatmaps"])
            mine = batch["view"] == view
            assert (one["view"] == view).all() and list(one["instance_id"]) == sorted(batch["instance_id"][mine])
            assert_decoded_close(one, {k: batch[k][mine] for k in one}, SMALL_SPEC)

    everything = concat_rows(batches)
    rows = [31, 0, 5, 5, 21, 19, 20]
    picked = reader.read_rows(rows, fields=["instance_id", "view", "heatmaps", "vis_tokens", CROP_FIELD])
    assert sorted(picked) == ["crop_jpeg", "heatmaps", "instance_id", "view", "vis_tokens"]
    assert_decoded_close(
        picked,
        {k: ([everything[k][r] for r in rows] if k == CROP_FIELD else everything[k][rows]) for k in picked},
        SMALL_SPEC,
    )
    assert reader.read_rows([], fields=["gauss"])["gauss"].shape == (0, 17, 4)

    assert reader.locate(instance_id=everything["instance_id"][21], view=everything["view"][21]) == 21
    with pytest.raises(KeyError, match="instance 999 view 0"):
        reader.locate(999, 0)
    with pytest.raises(IndexError):
        reader.read_rows([32])
    with pytest.raises(KeyError, match="no view 4"):
        reader.read_shard(0, view=4)


@pytest.mark.parametrize("fmt", FORMATS)
def test_no_crops_spec_and_unknown_field(tmp_path, fmt: str) -> None:
    spec = dataclasses.replace(SMALL_SPEC, store_crops=False, heatmap_encoding="fp16-thresh", token_encoding="fp16")
    batches = write_cache(str(tmp_path), fmt, shard_rows=(6,), spec=spec, views=2)
    reader = open_reader(str(tmp_path))
    assert CROP_FIELD not in reader.read_shard(0)
    assert_decoded_close(reader.read_shard(0), batches[0], spec)
    with pytest.raises(KeyError, match="crop_jpeg"):
        reader.read_shard(0, fields=[CROP_FIELD])


def test_zarr_columnar_read_touches_only_asked_fields(cache_root: str) -> None:
    batches = write_cache(cache_root, "zarr")
    reader = open_reader(cache_root)
    # Remove metadata and data of every array the read does not need: if the reader
    # touched them at all, it would fail.
    for view in range(4):
        unit = storage.join(cache_root, "shards", "shard-00001", f"view-{view:03d}.zarr")
        for array in ("heatmaps", "heatmaps_scale", "vis_tokens", "vis_tokens_scale", CROP_FIELD, "crop_jpeg_offsets"):
            storage.remove(storage.join(unit, array), recursive=True)
    # Units of views not asked for are not opened at all.
    storage.remove(storage.join(cache_root, "shards", "shard-00000", "view-001.zarr"), recursive=True)

    got = reader.read_shard(1, fields=["gauss", "confidence"])
    np.testing.assert_array_equal(got["gauss"], batches[1]["gauss"])
    np.testing.assert_array_equal(got["confidence"], batches[1]["confidence"])
    view2 = reader.read_shard(0, fields=["gauss"], view=2)
    np.testing.assert_array_equal(view2["gauss"], batches[0]["gauss"][batches[0]["view"] == 2])
    got = reader.read_rows([25, 20], fields=["kpt_tokens", "instance_id"])  # kpt_tokens_scale kept
    assert got["kpt_tokens"].shape == (2, 17, 8)
    with pytest.raises(Exception, match="heatmaps"):
        reader.read_shard(1)


@pytest.mark.parametrize("fmt", FORMATS)
def test_wds_members_are_never_pickled(tmp_path, fmt: str) -> None:
    write_cache(str(tmp_path), fmt, shard_rows=(3,), views=1)
    for dirpath, _, files in os.walk(tmp_path):
        for name in files:
            path = os.path.join(dirpath, name)
            if name.endswith(".tar"):
                with tarfile.open(path) as tar:
                    exts = {m.name.split(".", 1)[1] for m in tar.getmembers()}
                assert exts <= {
                    "small.npy",
                    "small.npy.zst",
                    "hm.npy.zst",
                    "kt.npy",
                    "kt.npy.zst",
                    "vt.npy",
                    "vt.npy.zst",
                    "jpg",
                }
                assert "hm.npy.zst" in exts  # heatmaps always win from zstd


def test_webdataset_pipeline_reads_s3_shards(s3_bucket: str) -> None:
    wds = pytest.importorskip("webdataset")
    uri = s3_bucket + "/wds"
    batches = write_cache(uri, "wds", shard_rows=(5,), views=1)
    register_s3_gopen()
    fields = ["instance_id", "heatmaps", "kpt_tokens", CROP_FIELD]
    url = storage.join(uri, "shards", "shard-00000.view-000.tar")
    dataset = wds.WebDataset(url, shardshuffle=False).map(partial(decode_wds_sample, spec=SMALL_SPEC, fields=fields))
    samples = list(dataset)
    assert len(samples) == 5
    stacked = {k: ([s[k] for s in samples] if k == CROP_FIELD else np.stack([s[k] for s in samples])) for k in fields}
    assert_decoded_close(stacked, {k: batches[0][k] for k in fields}, SMALL_SPEC)


def test_cache_layer_imports_neither_torch_nor_ray() -> None:
    code = (
        "import sys, pipeline.cache, pipeline.cache.verify, pipeline.cache.inspect; "
        "bad = [m for m in ('torch', 'ray', 'webdataset') if m in sys.modules]; "
        "sys.exit(f'imported {bad}' if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


# --------------------------------------------------------------- commits/resume


@pytest.mark.parametrize("fmt", FORMATS)
def test_commit_record_semantics(cache_root: str, fmt: str) -> None:
    writer = open_writer(cache_root, SMALL_SPEC, fmt)
    rows0 = teacher_like_rows(SMALL_SPEC, 6, seed=0, views=2)
    first = writer.write_shard(0, rows0)
    assert [u.name for u in first.units] == [writer.unit_name(0, 0), writer.unit_name(0, 1)]
    writer.write_shard(1, teacher_like_rows(SMALL_SPEC, 4, seed=1, views=2))
    storage.remove(writer.commit_uri(1, 1))  # data written, commit lost: the unit does not exist

    assert set(writer.committed()) == {(0, 0), (0, 1), (1, 0)}
    assert writer.committed()[(0, 1)] == first.unit(1)
    with pytest.raises(RuntimeError, match="1 of 4 shard-views are not committed"):
        writer.finalize(base_manifest(views=2), expected_shards=2)

    again = writer.write_shard(0, rows0)  # rewriting identical content is idempotent
    assert again == first and writer.committed()[(0, 0)] == first.unit(0)
    other = writer.write_shard(2, rows0)
    assert [u.sha256 for u in other.units] == [u.sha256 for u in first.units]  # same bytes, same digest
    assert other.units[0].name != first.units[0].name
    changed = writer.write_shard(0, teacher_like_rows(SMALL_SPEC, 6, seed=5, views=2))
    assert changed.units[0].sha256 != first.units[0].sha256
    storage.remove(writer.commit_uri(1, 0))  # shard 1 is now wholly uncommitted

    manifest = writer.finalize(base_manifest(views=2))
    assert [s.index for s in manifest.shards] == [0, 2] and manifest.num_rows == 12
    reader = open_reader(cache_root)
    assert len(reader) == 12 and reader.shard_indices == [0, 2]
    # Global rows: shard 2's view 0 starts at row 6 (after shard 0's two units of 3 rows).
    np.testing.assert_array_equal(reader.read_rows([6])["instance_id"], rows0["instance_id"][:1])
    leftovers = verify_cache(cache_root).leftovers
    assert leftovers == [writer.unit_name(1, 0), writer.unit_name(1, 1)]


def test_interrupted_commit_then_resume(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    uri = str(tmp_path)
    writer = open_writer(uri, SMALL_SPEC, "zarr")
    rows = teacher_like_rows(SMALL_SPEC, 5, views=1)
    real_write = storage.atomic_write_bytes

    def crash_on_commit(target: str, data: bytes) -> None:
        if "/commits/" in target:
            raise KeyboardInterrupt("killed between data and commit")
        real_write(target, data)

    monkeypatch.setattr(storage, "atomic_write_bytes", crash_on_commit)
    with pytest.raises(KeyboardInterrupt):
        writer.write_shard(0, rows)
    monkeypatch.undo()
    assert writer.committed() == {}
    with pytest.raises(FileNotFoundError, match="not finalized"):
        open_reader(uri)

    resumed = open_writer(uri, SMALL_SPEC, "zarr")
    todo = [i for i in range(2) if (i, 0) not in resumed.committed()]
    for i in todo:
        resumed.write_shard(i, rows)
    resumed.finalize(base_manifest(views=1), expected_shards=2)
    assert len(open_reader(uri)) == 10
    assert not [p for p in storage.find_files(str(tmp_path / "shards")) if ".tmp-" in p]


def test_writer_refuses_a_different_cache(tmp_path) -> None:
    uri = str(tmp_path)
    open_writer(uri, SMALL_SPEC, "zarr").write_shard(0, teacher_like_rows(SMALL_SPEC, 2))
    with pytest.raises(CacheMismatchError, match="format"):
        open_writer(uri, SMALL_SPEC, "wds")
    with pytest.raises(CacheMismatchError, match="spec"):
        open_writer(uri, dataclasses.replace(SMALL_SPEC, token_encoding="fp16"), "zarr")
    with pytest.raises(ValueError, match="unknown cache format"):
        open_writer(uri, SMALL_SPEC, "parquet")


def test_old_layout_is_refused_with_one_line(tmp_path) -> None:
    """A schema-1 cache (all views of a shard in one object) is refused, finalized or not."""
    import json

    uri = str(tmp_path / "old")
    write_cache(uri, "zarr", shard_rows=(4,), views=1)
    manifest_uri = storage.join(uri, "manifest.json")
    old = json.loads(storage.read_bytes(manifest_uri))
    storage.atomic_write_bytes(manifest_uri, json.dumps({**old, "schema_version": 1}).encode())
    for opener in (open_reader, lambda u: open_writer(u, SMALL_SPEC, "zarr")):
        with pytest.raises(CacheMismatchError, match="schema version 1.*Rebuild the cache") as err:
            opener(uri)
        assert "\n" not in str(err.value)

    partial_uri = str(tmp_path / "partial")
    storage.atomic_write_bytes(storage.join(partial_uri, "commits", "shard-00000.json"), b"{}")
    with pytest.raises(CacheMismatchError, match="schema version 1.*Rebuild the cache"):
        open_writer(partial_uri, SMALL_SPEC, "zarr")


def _write_one_shard(uri: str, spec: CacheSpec, index: int) -> list[str]:
    shard = open_writer(uri, spec, "zarr").write_shard(index, teacher_like_rows(spec, 6, seed=index, views=2))
    return [u.sha256 for u in shard.units]


def test_multiprocess_writers_on_s3(s3_bucket: str) -> None:
    uri = s3_bucket + "/mp"
    context = multiprocessing.get_context("spawn")
    with context.Pool(2) as pool:
        digests = pool.map(partial(_write_one_shard, uri, SMALL_SPEC), range(4))
    writer = open_writer(uri, SMALL_SPEC, "zarr")
    committed = writer.committed()
    assert [[committed[(i, v)].sha256 for v in range(2)] for i in range(4)] == digests
    writer.finalize(base_manifest(views=2), expected_shards=4)
    assert len(open_reader(uri)) == 24 and verify_cache(uri).ok


def test_write_encoded_view_checks_raw_arrays(tmp_path) -> None:
    writer = open_writer(str(tmp_path), SMALL_SPEC, "zarr")
    raw = encode_views(teacher_like_rows(SMALL_SPEC, 3, views=1), SMALL_SPEC)
    with pytest.raises(ValueError, match="'heatmaps' is float32"):
        writer.write_encoded_view(0, 0, {**raw, "heatmaps": raw["heatmaps"].astype(np.float32)})
    with pytest.raises(ValueError, match=r"\['vis_tokens_scale'\] are missing"):
        writer.write_encoded_view(0, 0, {k: v for k, v in raw.items() if k != "vis_tokens_scale"})
    with pytest.raises(ValueError, match=r"rows of views \[0\] given"):
        writer.write_encoded_view(0, 1, raw)
    assert writer.committed() == {}


@pytest.mark.parametrize("token_encoding", ["int8-token-scale", "fp16"])
def test_write_shard_takes_encoded_rows_and_extra(tmp_path, token_encoding: str) -> None:
    spec = dataclasses.replace(SMALL_SPEC, token_encoding=token_encoding)
    rows = teacher_like_rows(spec, 4)
    writer = open_writer(str(tmp_path), spec, "wds")
    from_fp32 = writer.write_shard(0, rows)
    from_raw = writer.write_shard(1, encode_views(rows, spec), extra={"skipped": {"no_visible_joints": 2}})
    assert [u.sha256 for u in from_raw.units] == [u.sha256 for u in from_fp32.units]
    manifest = writer.finalize(base_manifest())
    assert manifest.shards[1].units[3].extra == {"skipped": {"no_visible_joints": 2}}
    assert open_reader(str(tmp_path)).manifest.shards[1].units[3].extra == {"skipped": {"no_visible_joints": 2}}
