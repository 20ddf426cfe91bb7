"""Zarr v3 cache store: one group per unit (view of a shard), ``shards/shard-00012/view-003.zarr``.

Every stored array of a unit is exactly one object: big arrays (heatmaps, tokens, crop
bytes) use the sharding codec with the whole unit as one zarr shard and inner chunks of
``CHUNK_ROWS`` rows (so a random row fetches ~16 rows, not 256); small arrays are one
plain chunk. Chunks are zstd-3 with a content checksum (zarr's inner chunks carry none by
default, and corrupt zstd data can decode silently); floats fill with NaN so a lost
object never reads as a valid empty heatmap (see docs/platform-notes.md#zarr-integrity).

A unit is encoded into an in-memory store first. That gives one code path for disk and
S3, the exact bytes for sha256 and the per-field sizes, and lets the local writer publish
the unit with a single directory rename.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import numpy as np
import zarr
import zarr.storage
from zarr.codecs import ZstdCodec

from pipeline import storage
from pipeline.cache.base import (
    OVERHEAD,
    TMP_PREFIX,
    CacheReader,
    CacheWriter,
    objects_sha256,
    shard_stem,
    view_stem,
)
from pipeline.cache.encodings import bytes_array
from pipeline.cache.manifest import ViewUnit
from pipeline.cache.schema import (
    CROP_FIELD,
    HEATMAP_FIELD,
    SCHEMA_VERSION,
    TOKEN_FIELDS,
    ArrayDef,
    CacheSpec,
    stored_arrays,
)

FORMAT = "zarr"
SUFFIX = ".zarr"
CHUNK_ROWS = 16
CROP_CHUNK_BYTES = 1 << 16
CROP_OFFSETS = CROP_FIELD + "_offsets"
GROUP_ATTR = "distilpose_cache"
MAX_PARALLEL_ARRAYS = 8


def _compressors() -> list[ZstdCodec]:
    return [ZstdCodec(level=3, checksum=True)]


def _is_big(array: ArrayDef) -> bool:
    return array.name in (HEATMAP_FIELD, *TOKEN_FIELDS)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def pack_bytes(items: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Object array of bytes -> (concatenated uint8, int64 offsets with n+1 entries)."""
    lengths = np.fromiter((len(b) for b in items), dtype=np.int64, count=len(items))
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    data = np.frombuffer(b"".join(items), dtype=np.uint8)
    return data, offsets


def _create(group: zarr.Group, name: str, data: np.ndarray, chunk_rows: int | None, fill_value) -> None:
    """Write one array: sharded with ``chunk_rows`` inner chunks, or one plain chunk."""
    shape = data.shape
    per_row = shape[1:]
    if chunk_rows is None:
        chunks, shards = (max(shape[0], 1), *per_row), None
    else:
        chunks = (chunk_rows, *per_row)
        shards = (_round_up(max(shape[0], 1), chunk_rows), *per_row)
    array = group.create_array(
        name,
        shape=shape,
        dtype=data.dtype,
        chunks=chunks,
        shards=shards,
        compressors=_compressors(),
        fill_value=fill_value,
        # Object count and sha256 must not depend on the values (all-fill chunks).
        config={"write_empty_chunks": True},
    )
    array[...] = data


def encode_unit_objects(spec: CacheSpec, raw: Mapping[str, np.ndarray]) -> dict[str, bytes]:
    """Raw arrays -> {relative object name: bytes} of a complete Zarr group. Deterministic,
    and independent of the unit's shard index, so equal content gives an equal sha256.
    ``spec`` is the unit's (``CacheSpec.unit_spec``), recorded in the group's attributes."""
    objects: dict[str, zarr.core.buffer.Buffer] = {}
    group = zarr.create_group(
        store=zarr.storage.MemoryStore(objects),
        zarr_format=3,
        attributes={
            GROUP_ATTR: {
                "schema_version": SCHEMA_VERSION,
                "rows": len(raw["instance_id"]),
                "spec": spec.to_dict(),
            }
        },
    )
    for name, array in stored_arrays(spec).items():
        if name == CROP_FIELD:
            data, offsets = pack_bytes(raw[name])
            _create(group, CROP_FIELD, data, CROP_CHUNK_BYTES, 0)
            _create(group, CROP_OFFSETS, offsets, None, -1)
            continue
        values = np.ascontiguousarray(raw[name])
        _create(group, name, values, CHUNK_ROWS if _is_big(array) else None, array.fill_value)
    return {key: buffer.to_bytes() for key, buffer in objects.items()}


def bytes_per_field(spec: CacheSpec, sizes: Mapping[str, int]) -> dict[str, int]:
    """Attribute object sizes to logical fields (via the array directory they live in)."""
    array_field = {a.name: a.field for a in stored_arrays(spec).values()}
    array_field[CROP_OFFSETS] = CROP_FIELD
    totals: dict[str, int] = {}
    for name, size in sizes.items():
        top = name.split("/", 1)[0]
        field = array_field.get(top, OVERHEAD) if "/" in name else OVERHEAD
        totals[field] = totals.get(field, 0) + size
    return totals


def stored_digest(unit_uri: str) -> tuple[str, int] | None:
    """(sha256 as in ViewUnit, total bytes) of a unit as stored now; None if absent."""
    sizes = storage.find_files(unit_uri)
    if not sizes:
        return None
    blobs = storage.read_many_bytes([storage.join(unit_uri, name) for name in sizes])
    objects = {name: blobs[storage.join(unit_uri, name)] for name in sizes}
    return objects_sha256(objects), sum(len(b) for b in objects.values())


class ZarrCacheWriter(CacheWriter):
    format = FORMAT

    def unit_name(self, shard: int, view: int) -> str:
        return f"{shard_stem(shard)}/{view_stem(view)}{SUFFIX}"

    def _write_unit_data(self, shard: int, view: int, raw: Mapping[str, np.ndarray]) -> tuple[str, dict[str, int]]:
        spec = self.spec.unit_spec(view)  # no token arrays from view spec.token_views on
        objects = encode_unit_objects(spec, raw)
        target = self.unit_uri(shard, view)
        if storage.is_s3(target):
            # No rename on S3: clear stale objects of an earlier attempt, upload; the
            # commit record written afterwards is what makes the unit visible.
            storage.remove(target, recursive=True)
            storage.write_many_bytes(target, objects)
        else:
            self._publish_local(target, objects)
        return objects_sha256(objects), bytes_per_field(spec, {k: len(v) for k, v in objects.items()})

    def _publish_local(self, target: str, objects: Mapping[str, bytes]) -> None:
        """Write into a temp dir beside the target, then rename it into place."""
        final = storage.local_path(target)
        parent = os.path.dirname(final)
        tmp = os.path.join(parent, f"{TMP_PREFIX}{os.path.basename(final)}-{uuid.uuid4().hex[:8]}")
        os.makedirs(parent, exist_ok=True)
        try:
            storage.write_many_bytes(tmp, objects)
            if os.path.exists(final):
                # A directory cannot be replaced atomically when the target is non-empty:
                # move the old one aside first (it is already uncommitted).
                old = tmp + ".old"
                os.replace(final, old)
                os.replace(tmp, final)
                shutil.rmtree(old)
            else:
                os.replace(tmp, final)
        finally:
            if os.path.exists(tmp):
                shutil.rmtree(tmp)


class ZarrCacheReader(CacheReader):
    format = FORMAT

    def _read_raw(self, unit: ViewUnit, arrays: dict[str, ArrayDef], rows: np.ndarray | None) -> dict[str, np.ndarray]:
        store = storage.zarr_store(self.unit_uri(unit), read_only=True)
        where = f"{self.uri} unit {unit.name}"

        # Arrays are opened one by one (no group listing, no consolidated metadata), so a
        # field that is not asked for costs no request at all. They are fetched
        # concurrently: on S3 each array is two small round trips.
        def read(name: str) -> np.ndarray:
            if name == CROP_FIELD:
                return self._read_crops(store, rows)
            array = zarr.open_array(store=store, path=name, mode="r", zarr_format=3)
            if array.shape[0] != unit.rows:
                raise ValueError(f"{where}: array {name} has {array.shape[0]} rows, expected {unit.rows}")
            return array[...] if rows is None else array.oindex[rows]

        with ThreadPoolExecutor(max_workers=min(MAX_PARALLEL_ARRAYS, max(len(arrays), 1))) as pool:
            return dict(zip(arrays, pool.map(partial(storage.retry, read, what=f"cache {where}"), arrays)))

    @staticmethod
    def _read_crops(store, rows: np.ndarray | None) -> np.ndarray:
        offsets = zarr.open_array(store=store, path=CROP_OFFSETS, mode="r", zarr_format=3)[...]
        data = zarr.open_array(store=store, path=CROP_FIELD, mode="r", zarr_format=3)
        if rows is None:
            blob = data[...].tobytes()
            return bytes_array([blob[offsets[i] : offsets[i + 1]] for i in range(len(offsets) - 1)])
        return bytes_array([data[offsets[i] : offsets[i + 1]].tobytes() for i in rows])
