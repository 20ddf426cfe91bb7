"""The cache manifest, `verify_cache` (truncated, flipped, missing shards) and the inspect CLI."""

from __future__ import annotations

import dataclasses
import json

import pytest
from cache_rows import (
    FORMATS,
    SMALL_SPEC,
    base_manifest,
    teacher_like_rows,
    write_cache,
)

from pipeline import storage
from pipeline.cache import (
    CacheMismatchError,
    Manifest,
    check_compatible,
    open_reader,
    open_writer,
)
from pipeline.cache import inspect as cache_inspect
from pipeline.cache.schema import (
    SCHEMA_VERSION,
)
from pipeline.cache.verify import CORRUPT, MISSING, TRUNCATED, verify_cache

# -------------------------------------------------------------------- manifest


def test_manifest_json_roundtrip_and_mismatch_messages(tmp_path) -> None:
    write_cache(str(tmp_path), "zarr", shard_rows=(8, 4), views=2)
    manifest = open_reader(str(tmp_path)).manifest
    assert Manifest.from_json(manifest.to_json()) == manifest
    on_disk = json.loads((tmp_path / "manifest.json").read_text())
    assert on_disk["complete"] is True and on_disk["schema_version"] == SCHEMA_VERSION
    assert [s["instances"] for s in on_disk["shards"]] == [4, 2]
    units = [u for s in on_disk["shards"] for u in s["views"]]
    assert [(u["shard"], u["view"], u["first_row"]) for u in units] == [(0, 0, 0), (0, 1, 4), (1, 0, 8), (1, 1, 10)]
    assert units[3]["name"] == "shard-00001/view-001.zarr" and len(units[3]["sha256"]) == 64
    assert on_disk["arrays"]["heatmaps_scale"] == {"field": "heatmaps", "dtype": "float16", "shape": [17]}

    check_compatible(manifest, {"teacher": {"checkpoint_sha256": "a" * 64}, "views": 2, "spec": SMALL_SPEC})
    check_compatible(manifest, {"data.ann_file_sha256": "d" * 64})
    with pytest.raises(CacheMismatchError) as info:
        check_compatible(
            manifest,
            {"teacher": {"checkpoint_sha256": "b" * 64}, "data": {"ann_file_sha256": "e" * 64}, "views": 2},
            uri="s3://bucket/cache",
        )
    message = str(info.value)
    assert "s3://bucket/cache" in message and "2 difference(s)" in message
    assert "teacher checkpoint (teacher.checkpoint_sha256): cache has 'aaaa" in message
    assert "data fingerprint (annotation file sha256)" in message and "'eeee" in message
    assert "views" not in message

    old = dataclasses.replace(manifest, schema_version=SCHEMA_VERSION - 1, complete=False)
    with pytest.raises(CacheMismatchError, match="schema version.*\n.*completeness"):
        check_compatible(old, {})
    with pytest.raises(CacheMismatchError, match="heatmap encoding"):
        check_compatible(manifest, {"spec": {"heatmap_encoding": "fp16"}})


# ---------------------------------------------------------------------- verify


def _corrupt(uri: str, fmt: str, index: int, how: str) -> None:
    """Damage view 0 of shard ``index``."""
    name = f"shard-{index:05d}/view-000.zarr" if fmt == "zarr" else f"shard-{index:05d}.view-000.tar"
    shard = storage.join(uri, "shards", name)
    if how == "delete":
        storage.remove(shard, recursive=True)
        return
    target = shard if fmt == "wds" else storage.join(shard, "vis_tokens", "c", "0", "0", "0")
    data = bytearray(storage.read_bytes(target))
    if how == "truncate":
        data = data[: len(data) // 2]
    else:
        data[len(data) // 3] ^= 0x01
    storage.atomic_write_bytes(target, bytes(data))


@pytest.mark.parametrize("fmt", FORMATS)
def test_verify_finds_truncated_flipped_and_missing_shards(cache_root: str, fmt: str) -> None:
    write_cache(cache_root, fmt, shard_rows=(4, 4, 4, 2), views=2)
    report = verify_cache(cache_root)
    assert report.ok and report.rows_ok == report.expected_rows == 14, report.summary()

    _corrupt(cache_root, fmt, 0, "truncate")
    _corrupt(cache_root, fmt, 1, "flip")
    _corrupt(cache_root, fmt, 3, "delete")
    report = verify_cache(cache_root)
    summary = report.summary()
    print(summary)
    assert not report.ok
    view0 = "shard-{:05d}/view-000.zarr" if fmt == "zarr" else "shard-{:05d}.view-000.tar"
    assert [c.name for c in report.by_status(TRUNCATED)] == [view0.format(0)]
    assert [c.name for c in report.by_status(CORRUPT)] == [view0.format(1)]
    assert [c.name for c in report.by_status(MISSING)] == [view0.format(3)]
    assert report.rows_ok == 2 + 2 + 4 + 1  # the view-1 units of shards 0, 1, 3 and shard 2
    assert "5 ok, 1 corrupt, 1 truncated, 1 missing" in summary and "RESULT: FAILED" in summary


def test_verify_and_inspect_unfinalized_and_inconsistent(tmp_path) -> None:
    uri = str(tmp_path)
    writer = open_writer(uri, SMALL_SPEC, "wds")
    writer.write_shard(0, teacher_like_rows(SMALL_SPEC, 3, views=1))
    report = verify_cache(uri)
    assert report.ok and not report.finalized and "NOT finalized" in report.summary()
    assert "NOT FINALIZED: 1 committed shard-view(s) in 1 shard(s), 3 rows" in cache_inspect.describe_cache(uri)

    writer.finalize(base_manifest(views=1))
    assert verify_cache(uri).finalized
    commit = tmp_path / "commits" / "shard-00000.view-000.json"
    record = json.loads(commit.read_text())
    record["unit"]["rows"] = 4
    commit.write_text(json.dumps(record))
    report = verify_cache(uri)
    assert not report.ok and "commit record differs from the manifest entry" in report.summary()

    writer.write_shard(1, teacher_like_rows(SMALL_SPEC, 3, views=1))  # writing again un-finalizes the cache
    assert not storage.exists(storage.join(uri, "manifest.json"))


def test_inspect_cli(tmp_path, capsys: pytest.CaptureFixture) -> None:
    write_cache(str(tmp_path), "zarr", shard_rows=(4, 2), views=2)
    assert cache_inspect.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for expected in (
        "[zarr]",
        "rows (views): 6",
        "teacher: tokenpose-tiny",
        "annotation sha256 dddd",
        "encodings: heatmaps i8-thresh",
        "vis_tokens",
        "shard-00001",
        "1 instances x 2 views",
        "shards: 2, instances per shard min 1 / max 2, one unit per view (4 units)",
    ):
        assert expected in out, expected
