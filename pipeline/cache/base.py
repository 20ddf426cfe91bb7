"""What both stores share: the cache root layout, commit records, the manifest, and the
reader's row bookkeeping. A store only says how one unit's raw arrays become objects.

A shard is a fixed set of instances (in id order; membership depends on the instances
only, never on V). Each view of a shard is its own unit of storage, write and commit, so
a student epoch reads one unit per shard (1/V of the cache) and raising V adds units
without touching the others. Cache root layout (local directory or S3 prefix):

    manifest.json                          written by finalize(), last of all; complete=true
    shards/shard-00012/view-003.zarr       one Zarr group per unit, or
    shards/shard-00012.view-003.tar        one tar per unit (WebDataset)
    commits/shard-00012.view-003.json      written after the unit's data: no commit, no unit
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
from pipeline.cache.manifest import Manifest, ShardInfo, ViewUnit
from pipeline.cache.schema import (
    CROP_FIELD,
    SCHEMA_VERSION,
    TOKEN_FIELDS,
    ArrayDef,
    CacheMismatchError,
    CacheSpec,
    arrays_for_fields,
    old_schema_error,
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

Unit = tuple[int, int]  # (shard index, view)


def shard_stem(index: int) -> str:
    if index < 0:
        raise ValueError(f"shard index must be >= 0, got {index}")
    return f"shard-{index:05d}"


def view_stem(view: int) -> str:
    if view < 0:
        raise ValueError(f"view must be >= 0, got {view}")
    return f"view-{view:03d}"


def unit_stem(shard: int, view: int) -> str:
    return f"{shard_stem(shard)}.{view_stem(view)}"


def parse_unit_stem(name: str) -> Unit | None:
    """(shard, view) from ``shard-00012.view-003.json`` / ``.tar``; None for other names."""
    parts = name.split(".")
    if len(parts) < 2 or not parts[0].startswith("shard-") or not parts[1].startswith("view-"):
        return None
    shard, view = parts[0][6:], parts[1][5:]
    return (int(shard), int(view)) if shard.isdigit() and view.isdigit() else None


def is_old_commit_name(name: str) -> bool:
    """A schema-1 commit record (``shard-00012.json``, one per shard with all its views)."""
    stem = name.removesuffix(".json")
    return name.endswith(".json") and stem.startswith("shard-") and stem[6:].isdigit()


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


def commit_record(fmt: str, spec: CacheSpec, unit: ViewUnit) -> bytes:
    record = {"schema_version": SCHEMA_VERSION, "format": fmt, "spec": spec.to_dict(), "unit": unit.to_dict()}
    return (json.dumps(record, indent=2) + "\n").encode()


def commit_names(uri: str) -> list[str]:
    """File names of the commit records below a cache root (one listing, nothing read).
    Refuses a root that holds schema-1 (shard-major) commit records."""
    names = storage.listdir(storage.join(uri, COMMITS_DIR))
    if any(is_old_commit_name(n) for n in names):
        raise old_schema_error(uri, 1)
    return [n for n in names if n.endswith(".json") and parse_unit_stem(n) is not None]


def read_commits(uri: str, first_only: bool = False) -> dict[Unit, dict[str, Any]]:
    """Commit records below a cache root, by (shard, view) (only the lowest with ``first_only``)."""
    commits_uri = storage.join(uri, COMMITS_DIR)
    names = sorted(commit_names(uri), key=parse_unit_stem)
    names = names[:1] if first_only else names
    blobs = storage.read_many_bytes([storage.join(commits_uri, n) for n in names])
    return {parse_unit_stem(n): json.loads(blobs[storage.join(commits_uri, n)]) for n in names}


def committed_units(uri: str) -> dict[Unit, ViewUnit]:
    """Every committed unit below a cache root, by (shard, view)."""
    return {key: ViewUnit.from_dict(record["unit"]) for key, record in read_commits(uri).items()}


def read_manifest(uri: str) -> Manifest | None:
    """The manifest at ``uri``, None if there is none; refuses one of another schema."""
    manifest_uri = storage.join(uri, MANIFEST_NAME)
    try:
        d = json.loads(storage.read_bytes(manifest_uri))
    except FileNotFoundError:
        return None
    if d.get("schema_version") != SCHEMA_VERSION:
        raise old_schema_error(uri, d.get("schema_version"))
    return Manifest.from_dict(d)


class CacheWriter(ABC):
    """Writes units (one view of one shard); any number of processes may write disjoint
    units into one root, and one of them calls ``finalize`` once every unit is committed.

    Holds only the URI and the spec, so it pickles cheaply into Ray workers.
    """

    format: ClassVar[str]

    def __init__(self, uri: str, spec: CacheSpec) -> None:
        self.uri = uri.rstrip("/")
        self.spec = spec
        self._check_existing()

    def _check_existing(self) -> None:
        """Refuse to mix formats, specs or layouts in one root (e.g. resuming with other settings)."""
        recorded: dict[str, Any] = {}
        current: dict[str, Any] = {}
        manifest = read_manifest(self.uri)
        if manifest is not None:
            recorded.update(format=manifest.format, spec=manifest.spec)
            current.update(format=self.format, spec=self.spec)
        # Every writer runs this check before committing, so the first record stands for all
        # (one GET instead of one per unit for every worker that opens a writer).
        for (shard, view), record in read_commits(self.uri, first_only=True).items():
            where = f"unit {unit_stem(shard, view)}"
            recorded[f"{where} format"] = record.get("format")
            current[f"{where} format"] = self.format
            if record.get("format") == self.format:
                recorded[f"{where} spec"] = CacheSpec.from_dict(record["spec"])
                current[f"{where} spec"] = self.spec
        refuse_differences(
            recorded,
            current,
            what=f"cannot write to {self.uri}: it already holds a different cache",
            advice="Use a new output URI or delete the old cache.",
            recorded_as="cache has",
            current_as="this writer has",
            error=CacheMismatchError,
        )

    @abstractmethod
    def unit_name(self, shard: int, view: int) -> str:
        """Path of a unit below ``shards/``."""

    def unit_uri(self, shard: int, view: int) -> str:
        return storage.join(self.uri, SHARDS_DIR, self.unit_name(shard, view))

    def commit_uri(self, shard: int, view: int) -> str:
        return storage.join(self.uri, COMMITS_DIR, unit_stem(shard, view) + ".json")

    def write_shard(
        self, shard_index: int, rows: Mapping[str, Any], extra: Mapping[str, Any] | None = None
    ) -> ShardInfo:
        """Write a batch of views of one shard: one unit per distinct ``view`` value, each
        with its rows in the order given. ``extra`` is recorded with every unit. Rows of
        views without tokens (``spec.token_views``) may leave the token fields out."""
        views = np.asarray(rows["view"])
        units = []
        for view in np.unique(views):
            keep = np.flatnonzero(views == view)
            part = {k: ([v[i] for i in keep] if isinstance(v, list) else np.asarray(v)[keep]) for k, v in rows.items()}
            units.append(self.write_view(shard_index, int(view), part, extra))
        return ShardInfo(shard_index, tuple(units))

    def write_view(
        self, shard_index: int, view: int, rows: Mapping[str, Any], extra: Mapping[str, Any] | None = None
    ) -> ViewUnit:
        """Write one unit: view ``view`` of every instance of shard ``shard_index``.

        ``rows`` is the fp32 record batch, or the output of ``encode_views`` (encoding in
        the producer moves ~5x fewer bytes between processes). ``extra`` (JSON) is kept
        in the commit record and the manifest's unit entry.
        """
        spec = self.spec.unit_spec(view)
        raw = rows if is_encoded(rows, spec) else encode_views(rows, spec)
        return self.write_encoded_view(shard_index, view, raw, extra)

    def write_encoded_view(
        self, shard_index: int, view: int, raw: Mapping[str, np.ndarray], extra: Mapping[str, Any] | None = None
    ) -> ViewUnit:
        """Write one unit from already encoded (raw) arrays, e.g. when converting formats.

        Order matters: drop the old commit record (the unit becomes invisible), write the
        data, then commit. A crash anywhere leaves either no commit or a complete unit.
        Arrays the unit does not store (tokens from view ``spec.token_views`` on) are ignored.
        """
        where = unit_stem(shard_index, view)
        stored = stored_arrays(self.spec.unit_spec(view))
        missing = [name for name in stored if name not in raw]
        if missing:
            raise ValueError(f"{where}: raw arrays {missing} are missing for this spec")
        lengths = {name: len(raw[name]) for name in stored}
        n = len(raw["instance_id"])
        if set(lengths.values()) != {n}:
            raise ValueError(f"{where}: raw arrays differ in length: {lengths}")
        for name, array in stored.items():
            value = raw[name]
            if name != CROP_FIELD and (value.dtype != np.dtype(array.dtype) or value.shape[1:] != array.shape):
                raise ValueError(
                    f"{where}: raw array {name!r} is {value.dtype}{value.shape[1:]}, "
                    f"expected {array.dtype}{array.shape} (encode with encode_views)"
                )
        if n == 0:
            raise ValueError(f"{where}: refusing to write an empty unit")
        if np.any(np.asarray(raw["view"]) != view):
            raise ValueError(f"{where}: rows of views {sorted(set(np.asarray(raw['view']).tolist()))} given")
        raw = {name: raw[name] for name in stored}
        manifest_uri = storage.join(self.uri, MANIFEST_NAME)
        if storage.exists(manifest_uri):
            log.warning("%s was finalized; writing unit %s un-finalizes it", self.uri, where)
            storage.remove(manifest_uri)
        storage.remove(self.commit_uri(shard_index, view))
        objects_sha, sizes = self._write_unit_data(shard_index, view, raw)
        unit = ViewUnit(
            shard=shard_index,
            view=view,
            name=self.unit_name(shard_index, view),
            rows=n,
            sha256=objects_sha,
            bytes_per_field=sizes,
            extra=dict(extra or {}),
        )
        storage.atomic_write_bytes(self.commit_uri(shard_index, view), commit_record(self.format, self.spec, unit))
        return unit

    @abstractmethod
    def _write_unit_data(self, shard: int, view: int, raw: Mapping[str, np.ndarray]) -> tuple[str, dict[str, int]]:
        """Write one unit's objects so that they are complete before returning; returns
        (sha256, stored bytes per field)."""

    def committed(self) -> dict[Unit, ViewUnit]:
        """Units with a commit record (the only ones that exist), by (shard, view)."""
        return committed_units(self.uri)

    def committed_keys(self) -> set[Unit]:
        """(shard, view) of the committed units from one listing: no commit record is read,
        so polling it costs one request however many units there are."""
        return {parse_unit_stem(n) for n in commit_names(self.uri)}

    def finalize(
        self, manifest: Manifest, expected_shards: int | None = None, committed: dict[Unit, ViewUnit] | None = None
    ) -> Manifest:
        """Write manifest.json (complete=true) listing every committed unit.

        ``manifest`` supplies teacher, data, views, seed and extra; shards, rows, spec,
        format and timestamps are filled in here. Every listed shard must hold views
        0..manifest.views-1 with equal row counts (the same instances); with
        ``expected_shards`` every shard 0..expected_shards-1 must be there. ``committed``:
        the result of ``committed()`` when the caller just read it (not read again).
        """
        units = self.committed() if committed is None else committed
        if not units:
            raise RuntimeError(f"cannot finalize {self.uri}: no unit is committed")
        if self.spec.token_views is not None and self.spec.token_views > manifest.views:
            raise RuntimeError(
                f"cannot finalize {self.uri}: token_views {self.spec.token_views} is more than its "
                f"{manifest.views} views"
            )
        shard_indices = {shard for shard, _ in units}
        if expected_shards is not None:
            shard_indices |= set(range(expected_shards))
        wanted = {(shard, view) for shard in shard_indices for view in range(manifest.views)}
        missing = sorted(wanted - set(units))
        if missing:
            first = ", ".join(unit_stem(*key) for key in missing[:5])
            raise RuntimeError(
                f"cannot finalize {self.uri}: {len(missing)} of {len(wanted)} shard-views are not "
                f"committed (first: {first}); re-run the job to resume"
            )
        extra_views = sorted(set(units) - wanted)
        if extra_views:
            raise RuntimeError(
                f"cannot finalize {self.uri} with {manifest.views} views: units beyond them are committed "
                f"(first: {unit_stem(*extra_views[0])}); finalize with more views or delete them"
            )
        shards = ShardInfo.from_units(list(units.values()))
        for shard in shards:
            if len({u.rows for u in shard.units}) != 1:
                raise RuntimeError(
                    f"cannot finalize {self.uri}: the views of {shard.name} hold different row counts "
                    f"{[u.rows for u in shard.units]} (they must all hold the shard's instances)"
                )
        final = replace(
            manifest,
            schema_version=SCHEMA_VERSION,
            format=self.format,
            spec=self.spec,
            shards=tuple(shards),
            num_rows=sum(s.rows for s in shards),
            created_at=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            complete=True,
        )
        storage.atomic_write_bytes(storage.join(self.uri, MANIFEST_NAME), final.to_json().encode())
        return final


class CacheReader(ABC):
    """Reads a finalized cache. Fields come back decoded (float32) unless ``decode=False``.

    Global rows number the rows of all units: shards in index order, within a shard its
    views in order, within a unit the shard's instances in id order.
    """

    format: ClassVar[str]

    def __init__(self, uri: str, manifest: Manifest) -> None:
        if manifest.spec is None:
            raise ValueError(f"{uri}: manifest has no spec")
        self.uri = uri.rstrip("/")
        self.manifest = manifest
        self.spec: CacheSpec = manifest.spec
        self._shards = {s.index: s for s in manifest.shards}
        self._units = manifest.units()
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

    def unit_uri(self, unit: ViewUnit) -> str:
        return storage.join(self.uri, SHARDS_DIR, unit.name)

    def read_shard(
        self,
        shard_index: int,
        fields: Iterable[str] | None = None,
        decode: bool = True,
        view: int | None = None,
    ) -> dict[str, np.ndarray]:
        """Rows of one shard: only unit ``view`` (the shard's instances in id order), or
        with ``view=None`` every unit, views in order. Only the stored arrays of ``fields``
        are fetched (Zarr); only the units asked for are opened."""
        fields = resolve_fields(self.spec, fields)
        arrays = arrays_for_fields(self.spec, fields)
        shard = self.shard_info(shard_index)
        units = shard.units if view is None else (shard.unit(view),)
        parts = [self._read_raw(unit, self._unit_arrays(unit, arrays), None) for unit in units]
        raw = parts[0] if len(parts) == 1 else concat_raw(parts)
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
            unit = self._units[position]
            raw = self._read_raw(unit, self._unit_arrays(unit, arrays), unique_local)
            parts.append({name: a[inverse] for name, a in raw.items()})
            order.append(asked)
        if not parts:
            raw = self._read_raw(self._units[0], arrays, np.zeros(0, dtype=np.int64))
        else:
            raw = concat_raw(parts)
            back = np.empty(len(rows), dtype=np.int64)
            back[np.concatenate(order)] = np.arange(len(rows))
            raw = {name: a[back] for name, a in raw.items()}
        return decode_fields(raw, self.spec, fields) if decode else raw

    def _unit_arrays(self, unit: ViewUnit, arrays: dict[str, ArrayDef]) -> dict[str, ArrayDef]:
        """``arrays``, refused with a clear error when they include token arrays the unit does
        not store (a cache with ``token_views``): a reader never hands back made-up tokens."""
        if self.spec.has_tokens(unit.view) or not self.spec.tokens:
            return arrays
        asked = sorted({a.field for a in arrays.values() if a.field in TOKEN_FIELDS})
        if asked:
            raise KeyError(
                f"{self.uri}: view {unit.view} stores no {', '.join(asked)}: this cache holds the token fields "
                f"for views 0..{self.spec.token_views - 1} only (token_views={self.spec.token_views}); read them "
                "from those views, or leave them out"
            )
        return arrays

    def locate(self, instance_id: int, view: int) -> int:
        """Global row of (instance_id, view). The first call builds an index from the
        id columns (cheap for Zarr; a full pass over the units for WebDataset)."""
        if self._locations is None:
            locations = {}
            arrays = arrays_for_fields(self.spec, ["instance_id"])
            for unit, start in zip(self._units, self._first_rows.tolist()):
                ids = self._read_raw(unit, arrays, None)["instance_id"]
                for offset, key in enumerate(ids.tolist()):
                    locations.setdefault((key, unit.view), start + offset)
            self._locations = locations
        try:
            return self._locations[(int(instance_id), int(view))]
        except KeyError:
            raise KeyError(f"instance {instance_id} view {view} is not in {self.uri}") from None

    @abstractmethod
    def _read_raw(self, unit: ViewUnit, arrays: dict[str, ArrayDef], rows: np.ndarray | None) -> dict[str, np.ndarray]:
        """Raw arrays of one unit; ``rows`` (sorted, unique, unit-local) or all rows."""
