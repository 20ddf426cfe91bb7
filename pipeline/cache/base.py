"""What both stores share: the cache root layout, commit records, the manifest, and the
reader's row bookkeeping. A store only says how one shard's raw arrays become objects.

Cache root layout (local directory or S3 prefix):

    manifest.json              written by finalize(), last of all; complete=true
    shards/shard-00012.<ext>   one Zarr group (directory/prefix) or one tar per shard
    commits/shard-00012.json   written after the shard's data: no commit, no shard
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import replace
from typing import Any, ClassVar

import numpy as np

from pipeline import storage
from pipeline.cache.encodings import concat_raw, decode_fields, encode_views, is_encoded
from pipeline.cache.manifest import Manifest, ShardInfo
from pipeline.cache.schema import (
    CROP_FIELD,
    SCHEMA_VERSION,
    ArrayDef,
    CacheMismatchError,
    CacheSpec,
    arrays_for_fields,
    resolve_fields,
    stored_arrays,
)
from pipeline.mismatch import refuse_differences

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
SHARDS_DIR = "shards"
COMMITS_DIR = "commits"
TMP_PREFIX = ".tmp-"
OVERHEAD = "overhead"


def shard_stem(index: int) -> str:
    if index < 0:
        raise ValueError(f"shard index must be >= 0, got {index}")
    return f"shard-{index:05d}"


def parse_shard_stem(name: str) -> int | None:
    """Shard index from ``shard-00012.json`` / ``shard-00012.zarr``; None for other names."""
    stem = name.split(".", 1)[0]
    if not stem.startswith("shard-") or not stem[6:].isdigit():
        return None
    return int(stem[6:])


def objects_sha256(objects: Mapping[str, bytes]) -> str:
    """sha256 over a set of named objects, in sorted name order. Each object contributes
    its name, a NUL, its length (8 bytes little endian) and its bytes, so renaming or
    moving bytes between objects changes the digest too."""
    digest = hashlib.sha256()
    for name in sorted(objects):
        data = objects[name]
        digest.update(name.encode() + b"\0" + len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()


def commit_record(fmt: str, spec: CacheSpec, info: ShardInfo) -> bytes:
    record = {"schema_version": SCHEMA_VERSION, "format": fmt, "spec": spec.to_dict(), "shard": info.to_dict()}
    return (json.dumps(record, indent=2) + "\n").encode()


def commit_names(uri: str) -> list[str]:
    """File names of the commit records below a cache root (one listing, nothing read)."""
    names = storage.listdir(storage.join(uri, COMMITS_DIR))
    return [n for n in names if n.endswith(".json") and parse_shard_stem(n) is not None]


def read_commits(uri: str, first_only: bool = False) -> dict[int, dict[str, Any]]:
    """Commit records below a cache root, by shard index (only the lowest with ``first_only``)."""
    commits_uri = storage.join(uri, COMMITS_DIR)
    names = commit_names(uri)
    names = sorted(names, key=parse_shard_stem)[:1] if first_only else names
    blobs = storage.read_many_bytes([storage.join(commits_uri, n) for n in names])
    return {parse_shard_stem(n): json.loads(blobs[storage.join(commits_uri, n)]) for n in names}


def read_manifest(uri: str) -> Manifest | None:
    manifest_uri = storage.join(uri, MANIFEST_NAME)
    try:
        return Manifest.from_json(storage.read_bytes(manifest_uri))
    except FileNotFoundError:
        return None


class CacheWriter(ABC):
    """Writes whole shards; any number of processes may write disjoint shard indices into
    one root, and one of them calls ``finalize`` once every shard is committed.

    Holds only the URI and the spec, so it pickles cheaply into Ray workers.
    """

    format: ClassVar[str]
    shard_suffix: ClassVar[str]

    def __init__(self, uri: str, spec: CacheSpec) -> None:
        self.uri = uri.rstrip("/")
        self.spec = spec
        self._check_existing()

    def _check_existing(self) -> None:
        """Refuse to mix formats or specs in one root (e.g. resuming with other settings)."""
        recorded: dict[str, Any] = {}
        current: dict[str, Any] = {}
        manifest = read_manifest(self.uri)
        if manifest is not None:
            recorded.update(format=manifest.format, spec=manifest.spec)
            current.update(format=self.format, spec=self.spec)
        # Every writer runs this check before committing, so the first record stands for all
        # (one GET instead of one per shard for every worker that opens a writer).
        for index, record in read_commits(self.uri, first_only=True).items():
            recorded[f"shard {index} format"] = record.get("format")
            current[f"shard {index} format"] = self.format
            if record.get("format") == self.format:
                recorded[f"shard {index} spec"] = CacheSpec.from_dict(record["spec"])
                current[f"shard {index} spec"] = self.spec
        refuse_differences(
            recorded,
            current,
            what=f"cannot write to {self.uri}: it already holds a different cache",
            advice="Use a new output URI or delete the old cache.",
            recorded_as="cache has",
            current_as="this writer has",
            error=CacheMismatchError,
        )

    def shard_name(self, index: int) -> str:
        return shard_stem(index) + self.shard_suffix

    def shard_uri(self, index: int) -> str:
        return storage.join(self.uri, SHARDS_DIR, self.shard_name(index))

    def commit_uri(self, index: int) -> str:
        return storage.join(self.uri, COMMITS_DIR, shard_stem(index) + ".json")

    def write_shard(
        self, shard_index: int, rows: Mapping[str, Any], extra: Mapping[str, Any] | None = None
    ) -> ShardInfo:
        """Write a batch of views as shard ``shard_index``.

        ``rows`` is the fp32 record batch, or the output of ``encode_views`` (encoding in
        the producer moves ~5x fewer bytes between processes). ``extra`` (JSON) is kept
        in the commit record and the manifest's shard entry.
        """
        raw = rows if is_encoded(rows, self.spec) else encode_views(rows, self.spec)
        return self.write_encoded_shard(shard_index, raw, extra)

    def write_encoded_shard(
        self, shard_index: int, raw: Mapping[str, np.ndarray], extra: Mapping[str, Any] | None = None
    ) -> ShardInfo:
        """Write already encoded (raw) arrays, e.g. when converting between formats.

        Order matters: drop the old commit record (the shard becomes invisible), write the
        data, then commit. A crash anywhere leaves either no commit or a complete shard.
        """
        missing = [name for name in stored_arrays(self.spec) if name not in raw]
        if missing:
            raise ValueError(f"shard {shard_index}: raw arrays {missing} are missing for this spec")
        lengths = {name: len(raw[name]) for name in stored_arrays(self.spec)}
        n = len(raw["instance_id"])
        if set(lengths.values()) != {n}:
            raise ValueError(f"shard {shard_index}: raw arrays differ in length: {lengths}")
        for name, array in stored_arrays(self.spec).items():
            value = raw[name]
            if name != CROP_FIELD and (value.dtype != np.dtype(array.dtype) or value.shape[1:] != array.shape):
                raise ValueError(
                    f"shard {shard_index}: raw array {name!r} is {value.dtype}{value.shape[1:]}, "
                    f"expected {array.dtype}{array.shape} (encode with encode_views)"
                )
        if n == 0:
            raise ValueError(f"shard {shard_index}: refusing to write an empty shard")
        manifest_uri = storage.join(self.uri, MANIFEST_NAME)
        if storage.exists(manifest_uri):
            log.warning("%s was finalized; writing shard %d un-finalizes it", self.uri, shard_index)
            storage.remove(manifest_uri)
        storage.remove(self.commit_uri(shard_index))
        info = replace(self._write_shard_data(shard_index, raw, n), extra=dict(extra or {}))
        storage.atomic_write_bytes(self.commit_uri(shard_index), commit_record(self.format, self.spec, info))
        return info

    @abstractmethod
    def _write_shard_data(self, shard_index: int, raw: Mapping[str, np.ndarray], rows: int) -> ShardInfo:
        """Write one shard's objects so that they are complete before returning."""

    def committed(self) -> dict[int, ShardInfo]:
        """Shards with a commit record (the only ones that exist), by index."""
        return {i: ShardInfo.from_dict(r["shard"]) for i, r in read_commits(self.uri).items()}

    def committed_indices(self) -> set[int]:
        """Indices of the committed shards from one listing: no commit record is read, so
        polling it costs one request however many shards there are."""
        return {parse_shard_stem(n) for n in commit_names(self.uri)}

    def finalize(
        self, manifest: Manifest, expected_shards: int | None = None, committed: dict[int, ShardInfo] | None = None
    ) -> Manifest:
        """Write manifest.json (complete=true) listing every committed shard.

        ``manifest`` supplies teacher, data, views, seed and extra; shards, rows, spec,
        format and timestamps are filled in here. With ``expected_shards`` every index
        0..expected_shards-1 must be committed. ``committed``: the result of ``committed()``
        when the caller just read it (the records are then not read again).
        """
        shards = self.committed() if committed is None else committed
        if expected_shards is not None:
            missing = sorted(set(range(expected_shards)) - set(shards))
            if missing:
                raise RuntimeError(
                    f"cannot finalize {self.uri}: {len(missing)} of {expected_shards} shards are not "
                    f"committed (first: {missing[:10]}); re-run the job to resume"
                )
        if not shards:
            raise RuntimeError(f"cannot finalize {self.uri}: no shard is committed")
        final = replace(
            manifest,
            schema_version=SCHEMA_VERSION,
            format=self.format,
            spec=self.spec,
            shards=tuple(shards[i] for i in sorted(shards)),
            num_rows=sum(s.rows for s in shards.values()),
            created_at=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            complete=True,
        )
        storage.atomic_write_bytes(storage.join(self.uri, MANIFEST_NAME), final.to_json().encode())
        return final


class CacheReader(ABC):
    """Reads a finalized cache. Fields come back decoded (float32) unless ``decode=False``.

    Global rows number the views of all shards in shard-index order.
    """

    format: ClassVar[str]
    shard_suffix: ClassVar[str]

    def __init__(self, uri: str, manifest: Manifest) -> None:
        if manifest.spec is None:
            raise ValueError(f"{uri}: manifest has no spec")
        self.uri = uri.rstrip("/")
        self.manifest = manifest
        self.spec: CacheSpec = manifest.spec
        self._shards = {s.index: s for s in manifest.shards}
        self._first_rows = np.asarray(manifest.first_rows(), dtype=np.int64)
        self._shard_order = [s.index for s in manifest.shards]
        self._locations: dict[tuple[int, int], int] | None = None

    def __len__(self) -> int:
        return self.manifest.num_rows

    @property
    def shard_indices(self) -> list[int]:
        return list(self._shard_order)

    def shard_info(self, shard_index: int) -> ShardInfo:
        try:
            return self._shards[shard_index]
        except KeyError:
            raise KeyError(f"{self.uri} has no shard {shard_index}; shards: {self._shard_order[:10]}...") from None

    def shard_uri(self, shard_index: int) -> str:
        return storage.join(self.uri, SHARDS_DIR, self.shard_info(shard_index).name)

    def read_shard(
        self, shard_index: int, fields: Iterable[str] | None = None, decode: bool = True
    ) -> dict[str, np.ndarray]:
        """All rows of one shard; only the stored arrays of ``fields`` are fetched (Zarr)."""
        fields = resolve_fields(self.spec, fields)
        raw = self._read_raw(self.shard_info(shard_index), arrays_for_fields(self.spec, fields), None)
        return decode_fields(raw, self.spec, fields) if decode else raw

    def read_rows(
        self, rows: Iterable[int], fields: Iterable[str] | None = None, decode: bool = True
    ) -> dict[str, np.ndarray]:
        """Arbitrary global rows, in the order asked (duplicates allowed)."""
        rows = np.asarray(list(rows) if not isinstance(rows, np.ndarray) else rows, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= len(self)):
            raise IndexError(f"row out of range [0, {len(self)}) in {self.uri}")
        fields = resolve_fields(self.spec, fields)
        arrays = arrays_for_fields(self.spec, fields)
        positions = np.searchsorted(self._first_rows, rows, side="right") - 1
        parts, order = [], []
        for position in np.unique(positions):
            asked = np.flatnonzero(positions == position)
            local = rows[asked] - self._first_rows[position]
            unique_local, inverse = np.unique(local, return_inverse=True)
            raw = self._read_raw(self.manifest.shards[position], arrays, unique_local)
            parts.append({name: a[inverse] for name, a in raw.items()})
            order.append(asked)
        if not parts:
            raw = self._read_raw(self.manifest.shards[0], arrays, np.zeros(0, dtype=np.int64))
        else:
            raw = concat_raw(parts)
            back = np.empty(len(rows), dtype=np.int64)
            back[np.concatenate(order)] = np.arange(len(rows))
            raw = {name: a[back] for name, a in raw.items()}
        return decode_fields(raw, self.spec, fields) if decode else raw

    def locate(self, instance_id: int, view: int) -> int:
        """Global row of (instance_id, view). The first call builds an index from the
        id columns (cheap for Zarr; a full pass over the shards for WebDataset)."""
        if self._locations is None:
            locations = {}
            for position, shard in enumerate(self.manifest.shards):
                ids = self.read_shard(shard.index, ["instance_id", "view"])
                start = int(self._first_rows[position])
                for offset, key in enumerate(zip(ids["instance_id"].tolist(), ids["view"].tolist())):
                    locations.setdefault(key, start + offset)
            self._locations = locations
        try:
            return self._locations[(int(instance_id), int(view))]
        except KeyError:
            raise KeyError(f"instance {instance_id} view {view} is not in {self.uri}") from None

    @abstractmethod
    def _read_raw(
        self, shard: ShardInfo, arrays: dict[str, ArrayDef], rows: np.ndarray | None
    ) -> dict[str, np.ndarray]:
        """Raw arrays of one shard; ``rows`` (sorted, unique, shard-local) or all rows."""
