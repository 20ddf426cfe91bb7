"""WebDataset cache store: one tar per unit (view of a shard), ``shards/shard-00012.view-003.tar``.

Members per row (key = row number in the unit, 6 digits):

    <key>.small.npy[.zst]   one structured record packing every small field (a tar member
                            costs >= 1 KB with header and padding, so small arrays share one)
    <key>.hm.npy[.zst]      heatmaps (+ their scales), structured record
    <key>.kt.npy[.zst]      keypoint tokens (+ scales)
    <key>.vt.npy[.zst]      visual tokens (+ scales)
    <key>.jpg               crop JPEG (store_crops only)

A cache with ``token_views`` Vt has no .kt/.vt members in the tars of views >= Vt.

Tar members are not compressed, so each .npy is zstd-compressed (level 3, with content
checksum) when that saves at least ``MIN_ZSTD_SAVING``; the ``.zst`` suffix says which.
Measured on teacher-like data: u8 heatmaps shrink ~3x, int8/fp16 tokens 6-8%.

Everything is .npy written by numpy.lib.format and read with allow_pickle=False; the
webdataset package's ``.decode()`` is never used (its default table unpickles .pyd/.pkl).
Reading goes through tarfile over an fsspec file, so local and s3:// shards work alike and
``import webdataset`` (which imports torch) is only needed for ``register_s3_gopen``.
The unit is built in memory: its fp32 input is ~5x larger than the tar, so this costs
no more memory than the caller already holds, and the upload is a single PUT.
"""

from __future__ import annotations

import hashlib
import io
import sys
import tarfile
from collections.abc import Iterable, Iterator, Mapping
from typing import IO, Any

import numcodecs
import numpy as np

from pipeline import storage
from pipeline.cache.base import OVERHEAD, CacheReader, CacheWriter, unit_stem
from pipeline.cache.encodings import bytes_array, decode_fields
from pipeline.cache.manifest import ViewUnit
from pipeline.cache.schema import (
    CROP_FIELD,
    HEATMAP_FIELD,
    SMALL_FIELDS,
    TOKEN_FIELDS,
    ArrayDef,
    CacheSpec,
    arrays_for_fields,
    field_names,
    resolve_fields,
    stored_arrays,
)

FORMAT = "wds"
SUFFIX = ".tar"
SMALL_GROUP = "small"
# Member extension (without .npy) of each group of stored arrays.
GROUP_EXT = {SMALL_GROUP: "small", HEATMAP_FIELD: "hm", "kpt_tokens": "kt", "vis_tokens": "vt"}
CROP_EXT = "jpg"
ZSTD_SUFFIX = ".zst"
MIN_ZSTD_SAVING = 0.02
KEY_DIGITS = 6


# The content checksum makes a flipped bit in a member fail loudly at decode time.
ZSTD = numcodecs.Zstd(level=3, checksum=True)


def group_of(array: ArrayDef) -> str:
    return SMALL_GROUP if array.field in SMALL_FIELDS else array.field


def member_groups(arrays: Mapping[str, ArrayDef]) -> dict[str, list[ArrayDef]]:
    """Stored arrays grouped by the tar member that holds them (crops excluded)."""
    groups: dict[str, list[ArrayDef]] = {}
    for array in arrays.values():
        if array.field != CROP_FIELD:
            groups.setdefault(group_of(array), []).append(array)
    return groups


def record_dtype(arrays: Iterable[ArrayDef]) -> np.dtype:
    """Packed structured dtype (no object fields, so .npy loads without pickle)."""
    return np.dtype([(a.name, a.dtype, a.shape) for a in arrays])


def npy_bytes(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.lib.format.write_array(out, array, allow_pickle=False)
    return out.getvalue()


def load_npy(data: bytes) -> np.ndarray:
    return np.lib.format.read_array(io.BytesIO(data), allow_pickle=False)


def _tar_member_size(payload_len: int) -> int:
    """Bytes a member occupies in the tar: 512 B header + payload padded to 512 B."""
    return tarfile.BLOCKSIZE + -(-payload_len // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


def _add_member(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    # Fixed metadata so that identical content gives byte-identical tars (and sha256).
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    info.mtime = 0
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(payload))


def encode_tar(spec: CacheSpec, raw: Mapping[str, np.ndarray]) -> tuple[bytes, dict[str, int]]:
    """Raw arrays of one unit -> (tar bytes, stored bytes per field)."""
    arrays = stored_arrays(spec)
    groups = member_groups(arrays)
    n = len(raw["instance_id"])
    records = {}
    for group, defs in groups.items():
        records[group] = np.zeros(n, dtype=record_dtype(defs))
        for array in defs:
            records[group][array.name] = raw[array.name]
    sizes: dict[str, int] = {}
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for row in range(n):
            key = f"{row:0{KEY_DIGITS}d}"
            for group, record in records.items():
                name = f"{key}.{GROUP_EXT[group]}.npy"
                payload = npy_bytes(record[row : row + 1].reshape(()))
                compressed = ZSTD.encode(payload)
                if len(compressed) <= (1 - MIN_ZSTD_SAVING) * len(payload):
                    name, payload = name + ZSTD_SUFFIX, compressed
                _add_member(tar, name, payload)
                sizes[group] = sizes.get(group, 0) + _tar_member_size(len(payload))
            if spec.store_crops:
                crop = raw[CROP_FIELD][row]
                _add_member(tar, f"{key}.{CROP_EXT}", crop)
                sizes[CROP_FIELD] = sizes.get(CROP_FIELD, 0) + _tar_member_size(len(crop))
    data = out.getvalue()
    sizes[OVERHEAD] = len(data) - sum(sizes.values())
    return data, sizes


def iter_tar_views(stream: IO[bytes]) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: payload}) per view, streaming a tar in order."""
    key, members = None, {}
    with tarfile.open(fileobj=stream, mode="r|") as tar:
        for info in tar:
            if not info.isfile():
                continue
            member_key, _, ext = info.name.rsplit("/", 1)[-1].partition(".")
            if member_key != key:
                if key is not None:
                    yield key, members
                key, members = member_key, {}
            members[ext] = tar.extractfile(info).read()
    if key is not None:
        yield key, members


def decode_members(members: Mapping[str, bytes], arrays: Mapping[str, ArrayDef], where: str) -> dict[str, Any]:
    """One view's member payloads -> {array name: value} for ``arrays`` only."""
    out: dict[str, Any] = {}
    for group, defs in member_groups(arrays).items():
        ext = GROUP_EXT[group] + ".npy"
        if ext in members:
            payload = members[ext]
        elif ext + ZSTD_SUFFIX in members:
            payload = ZSTD.decode(members[ext + ZSTD_SUFFIX])
        else:
            raise ValueError(f"{where}: member .{ext} is missing")
        record = load_npy(bytes(payload))
        for array in defs:
            if array.name not in (record.dtype.names or ()):
                raise ValueError(f"{where}: member .{ext} has no array {array.name!r}")
            value = record[array.name]
            if value.shape != array.shape or value.dtype != np.dtype(array.dtype):
                raise ValueError(
                    f"{where}: {array.name} is {value.dtype}{value.shape}, expected {array.dtype}{array.shape}"
                )
            out[array.name] = value
    if CROP_FIELD in arrays:
        if CROP_EXT not in members:
            raise ValueError(f"{where}: member .{CROP_EXT} is missing")
        out[CROP_FIELD] = bytes(members[CROP_EXT])
    return out


def decode_wds_sample(
    sample: Mapping[str, Any], spec: CacheSpec, fields: Iterable[str] | None = None
) -> dict[str, Any]:
    """A webdataset sample dict (raw bytes per extension) -> decoded fields of one view.
    Use as ``wds.WebDataset(urls, shardshuffle=False).map(partial(decode_wds_sample, spec=spec))``."""
    if fields is None and spec.token_views is not None:
        # A view from token_views on has no token members: decode what the sample holds.
        fields = [
            name
            for name in field_names(spec)
            if name not in TOKEN_FIELDS or any(k.startswith(GROUP_EXT[name] + ".npy") for k in sample)
        ]
    fields = resolve_fields(spec, fields)
    where = f"{sample.get('__url__', '?')} key {sample.get('__key__', '?')}"
    values = decode_members(sample, arrays_for_fields(spec, fields), where)
    raw = {name: (bytes_array([v]) if name == CROP_FIELD else np.asarray(v)[None]) for name, v in values.items()}
    decoded = decode_fields(raw, spec, fields)
    return {name: a[0] for name, a in decoded.items()}


def _open_gopen_s3(url: str, mode: str = "rb", bufsize: int = 8192, **_: Any) -> IO[bytes]:
    if mode != "rb":
        raise ValueError(f"s3 gopen handler is read-only, got mode {mode!r}")
    fs, path = storage.open_fs(url)
    return fs.open(path, "rb")


def register_s3_gopen() -> None:
    """Let ``webdataset`` open ``s3://`` URLs through pipeline.storage (same endpoint and
    credential chain as the rest of the pipeline). Imports webdataset (and so torch)."""
    import webdataset  # noqa: F401  (registers the webdataset.gopen module)

    # The attribute ``webdataset.gopen`` is the function; the module is only in sys.modules.
    sys.modules["webdataset.gopen"].gopen_schemes["s3"] = _open_gopen_s3


def stored_digest(unit_uri: str) -> tuple[str, int] | None:
    """(sha256 of the tar, its size) as stored now; None if absent."""
    try:
        data = storage.read_bytes(unit_uri)
    except FileNotFoundError:
        return None
    return hashlib.sha256(data).hexdigest(), len(data)


class WdsCacheWriter(CacheWriter):
    format = FORMAT

    def unit_name(self, shard: int, view: int) -> str:
        return unit_stem(shard, view) + SUFFIX

    def _write_unit_data(self, shard: int, view: int, raw: Mapping[str, np.ndarray]) -> tuple[str, dict[str, int]]:
        data, sizes = encode_tar(self.spec.unit_spec(view), raw)  # no token members from spec.token_views on
        storage.atomic_write_bytes(self.unit_uri(shard, view), data)
        return hashlib.sha256(data).hexdigest(), sizes


class WdsCacheReader(CacheReader):
    """Reads whole units (a tar has no index); fields not asked for are skipped, not decoded."""

    format = FORMAT

    def _read_raw(self, unit: ViewUnit, arrays: dict[str, ArrayDef], rows: np.ndarray | None) -> dict[str, np.ndarray]:
        uri = self.unit_uri(unit)
        views = storage.retry(self._read_views, uri, what=f"cache unit {uri}")
        if len(views) != unit.rows:
            raise ValueError(f"{uri}: {len(views)} rows, the commit record says {unit.rows} (truncated?)")
        selected = range(unit.rows) if rows is None else rows.tolist()
        columns: dict[str, list[Any]] = {name: [] for name in arrays}
        for row in selected:
            key, members = views[row]
            for name, value in decode_members(members, arrays, f"{uri} key {key}").items():
                columns[name].append(value)
        return {
            name: bytes_array(values)
            if name == CROP_FIELD
            else np.stack(values)
            if values
            else np.zeros((0, *arrays[name].shape), arrays[name].dtype)
            for name, values in columns.items()
        }

    @staticmethod
    def _read_views(uri: str) -> list[tuple[str, dict[str, bytes]]]:
        fs, path = storage.open_fs(uri)
        with fs.open(path, "rb") as stream:
            return list(iter_tar_views(stream))
