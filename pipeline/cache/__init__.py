"""Teacher-output cache: one writer/reader interface over Zarr v3 and WebDataset stores.

writer = open_writer("s3://bucket/cache", spec, fmt="zarr")
for (shard, view), rows in units.items():       # rows: dict of fp32 numpy arrays
    if (shard, view) not in writer.committed_keys():
        writer.write_view(shard, view, rows)    # one unit: one view of the shard's instances
writer.finalize(Manifest(teacher=..., data=..., views=4, seed=0), expected_shards=n)

reader = open_reader("s3://bucket/cache")      # format comes from manifest.json
check_compatible(reader.manifest, {"teacher": {"checkpoint_sha256": sha}})
batch = reader.read_shard(0, view=2, fields=["gauss", "confidence"])
"""

from __future__ import annotations

from distilpose.errors import UserError
from pipeline.cache.base import MANIFEST_NAME, CacheReader, CacheWriter, read_commits, read_manifest
from pipeline.cache.encodings import decode_fields, encode_views
from pipeline.cache.manifest import DataInfo, Manifest, ShardInfo, TeacherInfo, ViewUnit, check_compatible
from pipeline.cache.schema import FORMATS, SCHEMA_VERSION, CacheMismatchError, CacheSpec
from pipeline.cache.wds_store import WdsCacheReader, WdsCacheWriter
from pipeline.cache.zarr_store import ZarrCacheReader, ZarrCacheWriter

WRITERS: dict[str, type[CacheWriter]] = {"zarr": ZarrCacheWriter, "wds": WdsCacheWriter}
READERS: dict[str, type[CacheReader]] = {"zarr": ZarrCacheReader, "wds": WdsCacheReader}


def open_writer(uri: str, spec: CacheSpec, fmt: str = "zarr") -> CacheWriter:
    """Writer for a new or partly written cache at ``uri`` ("zarr" or "wds")."""
    if fmt not in WRITERS:
        raise UserError(f"unknown cache format {fmt!r}; choose one of {list(FORMATS)}")
    return WRITERS[fmt](uri, spec)


def open_reader(uri: str) -> CacheReader:
    """Reader for a finalized cache; the format is taken from its manifest (a cache of
    another schema version is refused by ``read_manifest``)."""
    from pipeline import storage

    manifest = read_manifest(uri)
    if manifest is None and not storage.exists(uri):
        raise UserError(f"cache {uri} does not exist; check the path, or build it with jobs/cache_teacher.py")
    if manifest is None:
        committed = len(read_commits(uri))
        raise FileNotFoundError(
            f"no {MANIFEST_NAME} at {uri}: the cache is not finalized ({committed} shard-view(s) committed). "
            "Finish (or re-run) the teacher caching job, or check the URI."
        )
    if manifest.format not in READERS:
        raise ValueError(f"{uri}: manifest names unknown format {manifest.format!r}")
    return READERS[manifest.format](uri, manifest)


__all__ = [
    "FORMATS",
    "SCHEMA_VERSION",
    "CacheMismatchError",
    "CacheReader",
    "CacheSpec",
    "CacheWriter",
    "DataInfo",
    "Manifest",
    "ShardInfo",
    "TeacherInfo",
    "ViewUnit",
    "check_compatible",
    "decode_fields",
    "encode_views",
    "open_reader",
    "open_writer",
]
