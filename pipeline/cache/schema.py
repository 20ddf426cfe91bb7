"""What one cached view is: fields, their stored encodings, and the cache manifest.

The teacher stage hands over fp32 numpy batches (one row per augmented view); the stores
keep them in the compact *raw* form produced by ``encode_views`` and give them back through
``decode_fields``. Encodings were chosen by measurement (see tests/test_cache_store.py and
../shared/notes/storage.md): the teacher's heatmaps carry a low noise floor that makes fp16
incompressible, and random-like tokens barely compress, so precision, not the codec,
decides the size.

Stored ("raw") arrays per view, for a spec with K joints, Hh x Wh heatmaps, D-dim tokens,
P visual tokens:

    small fields        exactly as given (int64 ids, int16 view, float32 geometry)
    heatmaps            u8-thresh (default) / u8-joint-scale: uint8 (K,Hh,Wh) + heatmaps_scale float16 (K,)
                        fp16 / fp16-thresh: float16 (K,Hh,Wh)
    kpt_tokens          int8-token-scale: int8 (K,D) + kpt_tokens_scale float16 (K,)
                        fp16: float16 (K,D)
    vis_tokens          as kpt_tokens with P tokens: int8 (P,D) + vis_tokens_scale (P,), or fp16
    crop_jpeg           variable-length bytes (in memory: object array of ``bytes``)
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

SCHEMA_VERSION = 1
FORMATS = ("zarr", "wds")

HEATMAP_FIELD = "heatmaps"
TOKEN_FIELDS = ("kpt_tokens", "vis_tokens")
CROP_FIELD = "crop_jpeg"
SCALE_SUFFIX = "_scale"

# fp16-thresh zeroes values below this fraction of the (view, joint) maximum.
HEATMAP_THRESHOLD = 0.01
FP16_MAX = float(np.finfo(np.float16).max)
# Relative rounding error of fp16 (half an ulp, 10 mantissa bits) and its absolute floor
# for subnormals (half the smallest subnormal step).
FP16_REL_ERR = 2.0**-11
FP16_ABS_ERR = 2.0**-25


class CacheMismatchError(ValueError):
    """A cache's manifest does not match what a run asks for."""


# --------------------------------------------------------------------------- spec


@dataclass(frozen=True)
class Encoding:
    """One way of storing a float tensor, with the error bound it promises."""

    name: str
    value_dtype: str
    has_scale: bool
    error_bound: str


HEATMAP_ENCODINGS: dict[str, Encoding] = {
    "u8-joint-scale": Encoding(
        "u8-joint-scale",
        "uint8",
        True,
        "|err| <= scale/510 (scale = per-(view,joint) max rounded up to fp16); negative values stored as 0",
    ),
    "u8-thresh": Encoding(
        "u8-thresh",
        "uint8",
        True,
        f"x < {HEATMAP_THRESHOLD} * per-(view,joint) max stored as 0 (removes the teacher's noise floor, "
        "which otherwise dominates the compressed size); others |err| <= scale/510",
    ),
    "fp16": Encoding("fp16", "float16", False, "|err| <= 2^-11 |x| (fp16 rounding)"),
    "fp16-thresh": Encoding(
        "fp16-thresh",
        "float16",
        False,
        f"x < {HEATMAP_THRESHOLD} * per-(view,joint) max stored as 0; others |err| <= 2^-11 |x|",
    ),
}
TOKEN_ENCODINGS: dict[str, Encoding] = {
    "int8-token-scale": Encoding(
        "int8-token-scale",
        "int8",
        True,
        "|err| <= scale/254 (scale = per-token absmax rounded up to fp16)",
    ),
    "fp16": Encoding("fp16", "float16", False, "|err| <= 2^-11 |x| (fp16 rounding)"),
}
DEFAULT_HEATMAP_ENCODING = "u8-thresh"
DEFAULT_TOKEN_ENCODING = "int8-token-scale"


@dataclass(frozen=True)
class CacheSpec:
    """Shapes and encodings of a cache. Sizes come from the teacher's ModelConfig."""

    num_joints: int
    heatmap_size: tuple[int, int]  # (H, W)
    dim: int
    num_patches: int
    heatmap_encoding: str = DEFAULT_HEATMAP_ENCODING
    token_encoding: str = DEFAULT_TOKEN_ENCODING
    store_crops: bool = False

    def __post_init__(self) -> None:
        # JSON gives lists; keep the dataclass hashable and comparable.
        object.__setattr__(self, "heatmap_size", tuple(int(v) for v in self.heatmap_size))
        sizes = (self.num_joints, *self.heatmap_size, self.dim, self.num_patches)
        if len(self.heatmap_size) != 2 or any(int(v) <= 0 for v in sizes):
            raise ValueError(f"CacheSpec sizes must be positive with heatmap_size=(H, W); got {self}")
        if self.heatmap_encoding not in HEATMAP_ENCODINGS:
            raise ValueError(
                f"unknown heatmap_encoding {self.heatmap_encoding!r}; choose one of {list(HEATMAP_ENCODINGS)}"
            )
        if self.token_encoding not in TOKEN_ENCODINGS:
            raise ValueError(f"unknown token_encoding {self.token_encoding!r}; choose one of {list(TOKEN_ENCODINGS)}")

    @classmethod
    def from_model_config(cls, config: Any, **overrides: Any) -> CacheSpec:
        """Spec for a teacher ``ModelConfig`` (duck-typed: this layer never imports torch)."""
        sizes = {
            "num_joints": config.num_joints,
            "heatmap_size": tuple(config.heatmap_size),
            "dim": config.dim,
            "num_patches": config.num_patches,
        }
        return cls(**{**sizes, **overrides})

    def dims(self) -> dict[str, int]:
        height, width = self.heatmap_size
        return {"K": self.num_joints, "H": height, "W": width, "D": self.dim, "P": self.num_patches}

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["heatmap_size"] = list(self.heatmap_size)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CacheSpec:
        return cls(**d)


@dataclass(frozen=True)
class FieldDef:
    """A logical per-view field as the teacher stage provides it (decoded form)."""

    name: str
    dtype: str  # "bytes" for variable-length crop_jpeg
    dims: tuple[str | int, ...]  # symbolic per-view shape; letters resolved by CacheSpec.dims()
    doc: str

    def shape(self, spec: CacheSpec) -> tuple[int, ...]:
        dims = spec.dims()
        return tuple(dims[d] if isinstance(d, str) else d for d in self.dims)


FIELDS: dict[str, FieldDef] = {
    f.name: f
    for f in (
        FieldDef("instance_id", "int64", (), "COCO annotation id of the person instance"),
        FieldDef("image_id", "int64", (), "COCO image id"),
        FieldDef("view", "int16", (), "augmented view number; 0 = un-augmented"),
        FieldDef("view_params", "float32", (7,), "cx, cy, w, h, rotation, flip, half_body"),
        FieldDef("affine", "float32", (2, 3), "image -> crop affine"),
        FieldDef(HEATMAP_FIELD, "float32", ("K", "H", "W"), "teacher heatmaps"),
        FieldDef("gauss", "float32", ("K", 4), "fitted mu_x, mu_y, sigma_x, sigma_y (heatmap px)"),
        FieldDef("confidence", "float32", ("K",), "teacher joint confidence"),
        FieldDef("kpt_tokens", "float32", ("K", "D"), "teacher keypoint tokens"),
        FieldDef("vis_tokens", "float32", ("P", "D"), "teacher visual tokens"),
        FieldDef("joints", "float32", ("K", 2), "ground-truth joints in crop px (x, y)"),
        FieldDef("joint_weights", "float32", ("K",), "ground-truth joint weight 0/1"),
        FieldDef(CROP_FIELD, "bytes", (), "JPEG of the crop (optional, store_crops)"),
    )
}
SMALL_FIELDS = tuple(n for n in FIELDS if n not in (HEATMAP_FIELD, *TOKEN_FIELDS, CROP_FIELD))


def field_names(spec: CacheSpec) -> tuple[str, ...]:
    """Logical fields a cache with this spec holds."""
    return tuple(n for n in FIELDS if n != CROP_FIELD or spec.store_crops)


@dataclass(frozen=True)
class ArrayDef:
    """One stored array (raw form). A logical field maps to one or two of these."""

    name: str
    field: str
    dtype: str  # "bytes" for the variable-length crop field
    shape: tuple[int, ...]  # per view

    @property
    def fill_value(self) -> Any:
        """What a missing chunk reads as: NaN for floats, an impossible value for ints, so
        a lost object never looks like valid data."""
        kind = np.dtype(self.dtype).kind if self.dtype != "bytes" else "V"
        if kind == "f":
            return float("nan")
        if self.dtype == "int8":
            return -128  # int8-token-scale only produces -127..127
        if kind == "i":
            return -1
        return 0


def stored_arrays(spec: CacheSpec) -> dict[str, ArrayDef]:
    """The raw arrays a cache with this spec stores, in field order."""
    arrays: dict[str, ArrayDef] = {}
    for name in field_names(spec):
        fdef = FIELDS[name]
        shape = fdef.shape(spec)
        if name == HEATMAP_FIELD:
            encoding = HEATMAP_ENCODINGS[spec.heatmap_encoding]
        elif name in TOKEN_FIELDS:
            encoding = TOKEN_ENCODINGS[spec.token_encoding]
        else:
            arrays[name] = ArrayDef(name, name, fdef.dtype, shape)
            continue
        arrays[name] = ArrayDef(name, name, encoding.value_dtype, shape)
        if encoding.has_scale:
            arrays[name + SCALE_SUFFIX] = ArrayDef(
                name + SCALE_SUFFIX, name, "float16", shape[: -2 if name == HEATMAP_FIELD else -1]
            )
    return arrays


def arrays_for_fields(spec: CacheSpec, fields: Iterable[str] | None) -> dict[str, ArrayDef]:
    """Stored arrays needed to decode ``fields`` (all when None)."""
    wanted = resolve_fields(spec, fields)
    return {n: a for n, a in stored_arrays(spec).items() if a.field in wanted}


def resolve_fields(spec: CacheSpec, fields: Iterable[str] | None) -> tuple[str, ...]:
    available = field_names(spec)
    if fields is None:
        return available
    fields = tuple(fields)
    unknown = [f for f in fields if f not in available]
    if unknown:
        raise KeyError(f"unknown or unstored field(s) {unknown}; this cache holds {list(available)}")
    return fields


# ---------------------------------------------------------------------- encodings


def fp16_scale(max_values: np.ndarray) -> np.ndarray:
    """Per-slice scale as float16, rounded *up* so every value stays within [-scale, scale]."""
    if np.any(max_values > FP16_MAX):
        raise ValueError(f"value {float(max_values.max())} exceeds the float16 range of a scale")
    scale = max_values.astype(np.float16)
    too_small = scale.astype(np.float32) < max_values
    scale[too_small] = np.nextafter(scale[too_small], np.float16(np.inf))
    return scale


def _quantize(x: np.ndarray, scale16: np.ndarray, levels: int, lo: int, dtype: str) -> np.ndarray:
    scale = scale16.astype(np.float32)[..., None]
    ratio = np.divide(x, scale, out=np.zeros_like(x), where=scale > 0)
    return np.clip(np.rint(ratio * levels), lo, levels).astype(dtype)


def _to_fp16(x: np.ndarray, what: str) -> np.ndarray:
    if np.any(np.abs(x) > FP16_MAX):
        raise ValueError(f"{what}: value {float(np.abs(x).max())} exceeds the float16 range")
    return x.astype(np.float16)


def encode_heatmaps(x: np.ndarray, encoding: str) -> dict[str, np.ndarray]:
    """(..., K, H, W) float32 -> {"heatmaps": values, ["heatmaps_scale": (..., K)]}."""
    if encoding == "u8-thresh":
        peak = x.max(axis=(-2, -1), keepdims=True)
        return encode_heatmaps(np.where(x < HEATMAP_THRESHOLD * peak, np.float32(0), x), "u8-joint-scale")
    if encoding == "u8-joint-scale":
        flat = x.reshape(*x.shape[:-2], -1)
        scale = fp16_scale(np.maximum(flat.max(axis=-1), 0.0))
        values = _quantize(flat, scale, 255, 0, "uint8").reshape(x.shape)
        return {HEATMAP_FIELD: values, HEATMAP_FIELD + SCALE_SUFFIX: scale}
    if encoding == "fp16":
        return {HEATMAP_FIELD: _to_fp16(x, HEATMAP_FIELD)}
    if encoding == "fp16-thresh":
        peak = x.max(axis=(-2, -1), keepdims=True)
        kept = np.where(x < HEATMAP_THRESHOLD * peak, np.float32(0), x)
        return {HEATMAP_FIELD: _to_fp16(kept, HEATMAP_FIELD)}
    raise ValueError(f"unknown heatmap encoding {encoding!r}")


def decode_heatmaps(values: np.ndarray, scale: np.ndarray | None, encoding: str) -> np.ndarray:
    if encoding in ("u8-joint-scale", "u8-thresh"):
        step = scale.astype(np.float32) / np.float32(255)
        return values.astype(np.float32) * step[..., None, None]
    if encoding in ("fp16", "fp16-thresh"):
        return values.astype(np.float32)
    raise ValueError(f"unknown heatmap encoding {encoding!r}")


def encode_tokens(x: np.ndarray, encoding: str, name: str) -> dict[str, np.ndarray]:
    """(..., T, D) float32 -> {name: values, [name_scale: (..., T)]}."""
    if encoding == "int8-token-scale":
        scale = fp16_scale(np.abs(x).max(axis=-1))
        return {name: _quantize(x, scale, 127, -127, "int8"), name + SCALE_SUFFIX: scale}
    if encoding == "fp16":
        return {name: _to_fp16(x, name)}
    raise ValueError(f"unknown token encoding {encoding!r}")


def decode_tokens(values: np.ndarray, scale: np.ndarray | None, encoding: str) -> np.ndarray:
    if encoding == "int8-token-scale":
        step = scale.astype(np.float32) / np.float32(127)
        return values.astype(np.float32) * step[..., None]
    if encoding == "fp16":
        return values.astype(np.float32)
    raise ValueError(f"unknown token encoding {encoding!r}")


def encode_field(name: str, x: np.ndarray, spec: CacheSpec) -> dict[str, np.ndarray]:
    if name == HEATMAP_FIELD:
        return encode_heatmaps(x, spec.heatmap_encoding)
    return encode_tokens(x, spec.token_encoding, name)


def decode_field(name: str, raw: Mapping[str, np.ndarray], spec: CacheSpec) -> np.ndarray:
    scale = raw.get(name + SCALE_SUFFIX)
    if name == HEATMAP_FIELD:
        return decode_heatmaps(raw[name], scale, spec.heatmap_encoding)
    return decode_tokens(raw[name], scale, spec.token_encoding)


def error_bound(name: str, x: np.ndarray, spec: CacheSpec) -> np.ndarray:
    """Per-element bound on |decode(encode(x)) - x| documented by the field's encoding
    (plus float32 arithmetic slack). Used by tests; states the contract precisely."""
    encoding = spec.heatmap_encoding if name == HEATMAP_FIELD else spec.token_encoding
    fp16_err = np.abs(x) * FP16_REL_ERR + FP16_ABS_ERR
    slack = 4 * np.finfo(np.float32).eps
    if encoding == "fp16":
        return fp16_err
    if encoding == "fp16-thresh":
        peak = x.max(axis=(-2, -1), keepdims=True)
        return np.where(x < HEATMAP_THRESHOLD * peak, np.abs(x), fp16_err)
    if encoding in ("u8-joint-scale", "u8-thresh"):
        raw = encode_heatmaps(x, encoding)
        scale = raw[HEATMAP_FIELD + SCALE_SUFFIX].astype(np.float32)[..., None, None]
        quant = np.where(x < 0, -x, scale / 510 + scale * slack)
        if encoding == "u8-thresh":
            peak = x.max(axis=(-2, -1), keepdims=True)
            return np.where(x < HEATMAP_THRESHOLD * peak, np.maximum(np.abs(x), quant), quant)
        return quant
    if encoding == "int8-token-scale":
        scale = encode_tokens(x, encoding, name)[name + SCALE_SUFFIX].astype(np.float32)[..., None]
        return np.broadcast_to(scale / 254 + scale * slack, x.shape)
    raise ValueError(f"unknown encoding {encoding!r}")


@dataclass(frozen=True)
class EncodingError:
    """How far decoded values are from the fp32 teacher output."""

    field: str
    encoding: str
    max_abs: float
    mean_abs: float
    rmse: float
    max_abs_fp32: float  # largest |x|, to put the errors in proportion

    def __str__(self) -> str:
        return (
            f"{self.field:<10} {self.encoding:<17} max {self.max_abs:.2e}  mean {self.mean_abs:.2e}  "
            f"rmse {self.rmse:.2e}  (max|x| {self.max_abs_fp32:.3g})"
        )


def measure_encoding_error(name: str, x: np.ndarray, encoding: str) -> EncodingError:
    """Round-trip ``x`` (heatmaps (N,K,H,W) or tokens (N,T,D), fp32) through ``encoding``."""
    x = np.asarray(x, dtype=np.float32)
    if name == HEATMAP_FIELD:
        raw = encode_heatmaps(x, encoding)
        decoded = decode_heatmaps(raw[name], raw.get(name + SCALE_SUFFIX), encoding)
    else:
        raw = encode_tokens(x, encoding, name)
        decoded = decode_tokens(raw[name], raw.get(name + SCALE_SUFFIX), encoding)
    err = np.abs(decoded.astype(np.float64) - x)
    return EncodingError(
        field=name,
        encoding=encoding,
        max_abs=float(err.max()),
        mean_abs=float(err.mean()),
        rmse=float(np.sqrt(np.mean(err**2))),
        max_abs_fp32=float(np.abs(x).max()),
    )


# ------------------------------------------------------------------ batches of views


def _num_rows(rows: Mapping[str, Any], spec: CacheSpec) -> int:
    names = field_names(spec)
    missing = [n for n in names if n not in rows]
    unknown = [n for n in rows if n not in FIELDS]
    if missing or unknown:
        raise ValueError(
            f"record batch does not match the cache schema: missing {missing}, unknown {unknown}"
            + ("" if spec.store_crops or CROP_FIELD not in rows else " (crop_jpeg given but store_crops=False)")
        )
    counts = {n: len(rows[n]) for n in names}
    if len(set(counts.values())) != 1:
        raise ValueError(f"record batch fields have different numbers of rows: {counts}")
    return next(iter(counts.values()))


def _checked_array(name: str, value: Any, spec: CacheSpec, n: int) -> np.ndarray:
    fdef = FIELDS[name]
    x = np.asarray(value)
    expected = (n, *fdef.shape(spec))
    if x.shape != expected:
        raise ValueError(f"field {name!r}: expected shape {expected}, got {x.shape}")
    dtype = np.dtype(fdef.dtype)
    if dtype.kind == "f":
        x = x.astype(dtype, copy=False)
        if not np.all(np.isfinite(x)):
            bad = int(np.flatnonzero((~np.isfinite(x.reshape(n, -1))).any(axis=1))[0])
            raise ValueError(f"field {name!r}: non-finite value in row {bad}")
        return x
    if x.size and (x.min() < np.iinfo(dtype).min or x.max() > np.iinfo(dtype).max):
        raise ValueError(f"field {name!r}: values outside the {dtype} range")
    return x.astype(dtype, copy=False)


def bytes_array(items: Sequence[bytes]) -> np.ndarray:
    """In-memory form of a variable-length bytes field: 1-D object array of ``bytes``."""
    out = np.empty(len(items), dtype=object)
    for i, item in enumerate(items):
        if not isinstance(item, bytes | bytearray | memoryview):
            raise ValueError(f"field {CROP_FIELD!r}: row {i} is {type(item).__name__}, expected bytes")
        out[i] = bytes(item)
    return out


def is_encoded(rows: Mapping[str, Any], spec: CacheSpec) -> bool:
    """True if ``rows`` is already the raw form of ``spec`` (encode_views output).

    Only encodings with scale arrays make the two forms differ in their keys; for the
    others (fp16 heatmaps and fp16 tokens) the fp32 path is taken, and encoding an
    already-fp16 batch again changes nothing."""
    scales = [name for name in stored_arrays(spec) if name.endswith(SCALE_SUFFIX)]
    return bool(scales) and all(name in rows for name in scales)


def encode_views(rows: Mapping[str, Any], spec: CacheSpec) -> dict[str, np.ndarray]:
    """fp32 record batch (one row per view) -> raw arrays as stored (see module doc)."""
    n = _num_rows(rows, spec)
    raw: dict[str, np.ndarray] = {}
    for name in field_names(spec):
        if name == CROP_FIELD:
            raw[name] = bytes_array(rows[name])
            continue
        x = _checked_array(name, rows[name], spec, n)
        if name == HEATMAP_FIELD or name in TOKEN_FIELDS:
            raw.update(encode_field(name, x, spec))
        else:
            raw[name] = np.ascontiguousarray(x)
    return raw


def decode_fields(
    raw: Mapping[str, np.ndarray], spec: CacheSpec, fields: Iterable[str] | None = None
) -> dict[str, np.ndarray]:
    """Raw arrays -> decoded fields (float32 for float fields; ids stay integers; crop_jpeg
    an object array of bytes). ``fields=None`` decodes every field present in ``raw``."""
    if fields is None:
        fields = [n for n in field_names(spec) if n in raw]
    out: dict[str, np.ndarray] = {}
    for name in resolve_fields(spec, fields):
        if name == HEATMAP_FIELD or name in TOKEN_FIELDS:
            out[name] = decode_field(name, raw, spec)
        else:
            out[name] = raw[name]
    return out


def concat_raw(parts: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    if not parts:
        return {}
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}


def take_raw(raw: Mapping[str, np.ndarray], rows: np.ndarray) -> dict[str, np.ndarray]:
    return {name: a[rows] for name, a in raw.items()}


# ----------------------------------------------------------------------- manifest


@dataclass(frozen=True)
class ShardInfo:
    """A written shard, as recorded in its commit record and in the manifest."""

    index: int
    name: str
    rows: int
    sha256: str
    # Stored bytes attributed to each logical field; "overhead" holds container
    # metadata (zarr.json, tar end blocks), so the values sum to the shard's size.
    bytes_per_field: dict[str, int]
    # Producer's notes on the shard, e.g. {"skipped": {"no_visible_joints": 3}}.
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes_per_field.values())

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ShardInfo:
        return cls(
            index=int(d["index"]),
            name=str(d["name"]),
            rows=int(d["rows"]),
            sha256=str(d["sha256"]),
            bytes_per_field={k: int(v) for k, v in d["bytes_per_field"].items()},
            extra=dict(d.get("extra", {})),
        )


@dataclass(frozen=True)
class TeacherInfo:
    preset: str
    checkpoint_sha256: str
    config: dict[str, Any] = field(default_factory=dict)
    # Where the checkpoint was read from (absolute path or s3:// URI; "" without one): the
    # DistilPose-L recipe starts the student backbone from it (pipeline.backbone_init).
    checkpoint: str = ""


@dataclass(frozen=True)
class DataInfo:
    ann_file_sha256: str
    num_images: int
    split: str
    # Where the data came from, so a student can rebuild its views from the images
    # (URIs only; never credentials or presigned URLs).
    ann_file: str = ""
    image_root: str = ""


# Keys written to manifest.json for humans and other tools, recomputed on load.
DERIVED_KEYS = ("encodings", "arrays")


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

    def first_rows(self) -> list[int]:
        """Global row number of each shard's first row (shards in index order)."""
        starts, total = [], 0
        for shard in self.shards:
            starts.append(total)
            total += shard.rows
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
            d["encodings"] = {
                "heatmaps": dataclasses.asdict(HEATMAP_ENCODINGS[self.spec.heatmap_encoding]),
                "tokens": dataclasses.asdict(TOKEN_ENCODINGS[self.spec.token_encoding]),
            }
            d["arrays"] = {
                a.name: {"field": a.field, "dtype": a.dtype, "shape": list(a.shape)}
                for a in stored_arrays(self.spec).values()
            }
        d["shards"] = [{**s.to_dict(), "first_row": start} for s, start in zip(self.shards, self.first_rows())]
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Manifest:
        shards = tuple(ShardInfo.from_dict(s) for s in d.get("shards", []))
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
        recorded = [s.get("first_row") for s in d.get("shards", [])]
        if any(r is not None for r in recorded) and recorded != manifest.first_rows():
            raise ValueError("manifest shards: first_row values do not match the shard row counts")
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
    "data.ann_file_sha256": "data fingerprint (annotation file sha256)",
    "data.num_images": "data fingerprint (number of images)",
    "data.split": "data split",
    "views": "views per instance",
    "seed": "view seed",
    "spec.heatmap_encoding": "heatmap encoding",
    "spec.token_encoding": "token encoding",
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


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 70 else text[:67] + "..."


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
    differences = []
    for key, value in want.items():
        label = KEY_LABELS.get(key, key)
        if key not in have:
            differences.append(f"{label} ({key}): not recorded in the cache, expected {_short(value)}")
        elif have[key] != value:
            differences.append(f"{label} ({key}): cache has {_short(have[key])}, expected {_short(value)}")
    if differences:
        where = f" at {uri}" if uri else ""
        raise CacheMismatchError(
            f"teacher cache{where} does not match this run ({len(differences)} difference(s)):\n  - "
            + "\n  - ".join(differences)
            + "\nRebuild the cache for this configuration or point the run at a matching cache."
        )
