"""manifest.json of a cache (what it holds, how it was made, its shards) and the check
that refuses a cache which does not match what a run expects."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.cache.schema import (
    HEATMAP_ENCODINGS,
    SCHEMA_VERSION,
    TEACHER_PRECISIONS,
    TOKEN_ENCODINGS,
    UNRECORDED_TEACHER_PRECISION,
    CacheMismatchError,
    CacheSpec,
    stored_arrays,
    teacher_fields,
)
from pipeline.mismatch import refuse_differences


@dataclass(frozen=True)
class ViewUnit:
    """One view of one shard: the unit of storage, write and commit. Its rows are the
    shard's instances in id order, all seen in view ``view``; its bytes depend only on the
    spec, those instances, the view index and the seed (never on how many views exist)."""

    shard: int
    view: int
    name: str  # path below shards/, e.g. shard-00012/view-003.zarr
    rows: int
    sha256: str
    # Stored bytes attributed to each logical field; "overhead" holds container
    # metadata (zarr.json, tar end blocks), so the values sum to the unit's size.
    bytes_per_field: dict[str, int]
    # Producer's notes on the unit, e.g. {"skipped": {"no_visible_joints": 3}}.
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes_per_field.values())

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ViewUnit:
        return cls(
            shard=int(d["shard"]),
            view=int(d["view"]),
            name=str(d["name"]),
            rows=int(d["rows"]),
            sha256=str(d["sha256"]),
            bytes_per_field={k: int(v) for k, v in d["bytes_per_field"].items()},
            extra=dict(d.get("extra", {})),
        )


@dataclass(frozen=True)
class ShardInfo:
    """A shard: a fixed set of instances, stored as one unit per view (views 0..V-1)."""

    index: int
    units: tuple[ViewUnit, ...]  # in view order

    @property
    def name(self) -> str:
        return f"shard-{self.index:05d}"

    @property
    def instances(self) -> int:
        return self.units[0].rows if self.units else 0

    @property
    def rows(self) -> int:
        return sum(u.rows for u in self.units)

    @property
    def total_bytes(self) -> int:
        return sum(u.total_bytes for u in self.units)

    @property
    def bytes_per_field(self) -> dict[str, int]:
        totals: dict[str, int] = {}
        for unit in self.units:
            for name, size in unit.bytes_per_field.items():
                totals[name] = totals.get(name, 0) + size
        return totals

    def unit(self, view: int) -> ViewUnit:
        for unit in self.units:
            if unit.view == view:
                return unit
        raise KeyError(f"{self.name} has no view {view}; it has views {[u.view for u in self.units]}")

    @classmethod
    def from_units(cls, units: list[ViewUnit]) -> list[ShardInfo]:
        """Group units by shard (shards in index order, units in view order)."""
        by_shard: dict[int, list[ViewUnit]] = {}
        for unit in units:
            by_shard.setdefault(unit.shard, []).append(unit)
        return [cls(i, tuple(sorted(by_shard[i], key=lambda u: u.view))) for i in sorted(by_shard)]


@dataclass(frozen=True)
class TeacherInfo:
    preset: str
    checkpoint_sha256: str
    config: dict[str, Any] = field(default_factory=dict)
    # Where the checkpoint was read from (absolute path or s3:// URI; "" without one): the
    # DistilPose-L recipe starts the student backbone from it (pipeline.backbone_start).
    checkpoint: str = ""
    # What the teacher ran in (schema.TEACHER_PRECISIONS); "" in caches made before it was recorded.
    precision: str = ""

    @property
    def effective_precision(self) -> str:
        return self.precision or UNRECORDED_TEACHER_PRECISION


@dataclass(frozen=True)
class DataInfo:
    ann_file_sha256: str
    num_images: int
    split: str
    # Where the data came from, so a student can rebuild its views from the images
    # (URIs only; never credentials or presigned URLs).
    ann_file: str = ""
    image_root: str = ""


@dataclass(frozen=True)
class Manifest:
    """manifest.json of a cache. ``complete`` is true only once every shard is committed."""

    teacher: TeacherInfo
    data: DataInfo
    views: int
    seed: int
    spec: CacheSpec | None = None
    format: str = ""
    shards: tuple[ShardInfo, ...] = ()
    num_rows: int = 0
    created_at: str = ""
    complete: bool = False
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. the augmentation config
    schema_version: int = SCHEMA_VERSION

    def units(self) -> list[ViewUnit]:
        """Every stored unit in global row order: shards in index order, views in order."""
        return [unit for shard in self.shards for unit in shard.units]

    def first_rows(self) -> list[int]:
        """Global row number of each unit's first row (in ``units()`` order)."""
        starts, total = [], 0
        for unit in self.units():
            starts.append(total)
            total += unit.rows
        return starts

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "schema_version": self.schema_version,
            "format": self.format,
            "complete": self.complete,
            "created_at": self.created_at,
            "num_rows": self.num_rows,
            "views": self.views,
            "seed": self.seed,
            "teacher": dataclasses.asdict(self.teacher),
            "data": dataclasses.asdict(self.data),
            "spec": self.spec.to_dict() if self.spec else None,
            "extra": self.extra,
        }
        if self.spec:
            # For humans and other tools reading manifest.json; from_dict recomputes them.
            # "fields": the teacher outputs this cache holds (no token fields for a teacher without tokens).
            d["fields"] = list(teacher_fields(self.spec))
            if self.spec.token_views is not None:
                # The token fields are stored for views 0..token_views-1 only (spec.token_views).
                d["token_views"] = self.spec.token_views
            d["encodings"] = {"heatmaps": dataclasses.asdict(HEATMAP_ENCODINGS[self.spec.heatmap_encoding])}
            if self.spec.tokens:
                d["encodings"]["tokens"] = dataclasses.asdict(TOKEN_ENCODINGS[self.spec.token_encoding])
            # Cached value vs a float32 forward: within the encoding's bound plus these
            # fractions of the field's max |x| (what spot_check allows).
            d["teacher_precision"] = dataclasses.asdict(TEACHER_PRECISIONS[self.teacher.effective_precision])
            d["arrays"] = {
                a.name: {"field": a.field, "dtype": a.dtype, "shape": list(a.shape)}
                for a in stored_arrays(self.spec).values()
            }
        starts = iter(self.first_rows())
        d["shards"] = [
            {
                "index": shard.index,
                "instances": shard.instances,
                "views": [{**unit.to_dict(), "first_row": next(starts)} for unit in shard.units],
            }
            for shard in self.shards
        ]
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Manifest:
        units = [ViewUnit.from_dict(u) for s in d.get("shards", []) for u in s["views"]]
        shards = tuple(ShardInfo.from_units(units))
        manifest = cls(
            teacher=TeacherInfo(**d["teacher"]),
            data=DataInfo(**d["data"]),
            views=int(d["views"]),
            seed=int(d["seed"]),
            spec=CacheSpec.from_dict(d["spec"]) if d.get("spec") else None,
            format=str(d.get("format", "")),
            shards=shards,
            num_rows=int(d.get("num_rows", 0)),
            created_at=str(d.get("created_at", "")),
            complete=bool(d.get("complete", False)),
            extra=dict(d.get("extra", {})),
            schema_version=int(d["schema_version"]),
        )
        recorded = [u.get("first_row") for s in d.get("shards", []) for u in s["views"]]
        if any(r is not None for r in recorded) and recorded != manifest.first_rows():
            raise ValueError("manifest shards: first_row values do not match the units' row counts")
        return manifest

    @classmethod
    def from_json(cls, text: str | bytes) -> Manifest:
        return cls.from_dict(json.loads(text))


# What a mismatch is called in the error message (dotted manifest key -> words).
KEY_LABELS = {
    "schema_version": "schema version",
    "format": "store format",
    "complete": "completeness (manifest.complete)",
    "teacher.preset": "teacher preset",
    "teacher.checkpoint_sha256": "teacher checkpoint",
    "teacher.precision": "teacher precision",
    "data.ann_file_sha256": "data fingerprint (annotation file sha256)",
    "data.num_images": "data fingerprint (number of images)",
    "data.split": "data split",
    "views": "views per instance",
    "seed": "view seed",
    "spec.heatmap_encoding": "heatmap encoding",
    "spec.token_encoding": "token encoding",
    "spec.token_views": "views with tokens (--token-views)",
}


def _json_default(value: Any) -> Any:
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, np.generic | np.ndarray):
        return value.tolist()
    raise TypeError(f"cannot compare a {type(value).__name__} with a manifest value")


def _plain(value: Any) -> Any:
    """JSON-comparable form: tuples -> lists, dataclasses -> dicts, numpy -> python."""
    return json.loads(json.dumps(value, default=_json_default))


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, Mapping) and value:
        flat: dict[str, Any] = {}
        for key, item in value.items():
            flat.update(_flatten(item, f"{prefix}{key}."))
        return flat
    return {prefix.rstrip("."): value}


def check_compatible(manifest: Manifest, expected: Mapping[str, Any], *, uri: str | None = None) -> None:
    """Refuse a cache whose manifest differs from what a run expects.

    ``expected`` is nested like the manifest (``{"teacher": {"checkpoint_sha256": ...}}``) or
    uses dotted keys (``{"teacher.checkpoint_sha256": ...}``); only the given keys are
    compared, plus the schema version and completeness, which are always required.
    Raises CacheMismatchError naming every differing key.
    """
    have = _flatten(_plain(manifest.to_dict()))
    want = {"schema_version": SCHEMA_VERSION, "complete": True}
    want.update(_flatten(_plain(dict(expected))))
    where = f" at {uri}" if uri else ""
    refuse_differences(
        have,
        want,
        what=f"teacher cache{where} does not match this run",
        advice="Rebuild the cache for this configuration or point the run at a matching cache.",
        recorded_as="cache has",
        current_as="expected",
        labels={key: f"{KEY_LABELS.get(key, key)} ({key})" for key in want},
        error=CacheMismatchError,
    )
