"""What one cached view is: its fields, the encodings a cache may store them in, the
stored arrays (dtypes and per-view shapes) and the cache's sizes (``CacheSpec``).

How values are converted to and from the stored form is in ``encodings``; what a finished
cache records about itself is in ``manifest``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

# 2: view-major layout, one stored unit per (shard, view); 1 stored all views of a shard together.
SCHEMA_VERSION = 2
FORMATS = ("zarr", "wds")

HEATMAP_FIELD = "heatmaps"
TOKEN_FIELDS = ("kpt_tokens", "vis_tokens")
CROP_FIELD = "crop_jpeg"
SCALE_SUFFIX = "_scale"

# The *-thresh heatmap encodings zero values below this fraction of the (view, joint) peak
# (i8-thresh: |value| below this fraction of the (view, joint) max |value|).
HEATMAP_THRESHOLD = 0.01


class CacheMismatchError(ValueError):
    """A cache's manifest does not match what a run asks for."""


def old_schema_error(uri: str, version: object) -> CacheMismatchError:
    """The one line that refuses a cache written in another layout."""
    return CacheMismatchError(
        f"{uri} was written with cache schema version {version}; this code reads and writes version "
        f"{SCHEMA_VERSION} (one stored object per shard and view). Rebuild the cache with jobs/cache_teacher.py "
        "into a new --out (or delete the old one)."
    )


@dataclass(frozen=True)
class Encoding:
    """One way of storing a float tensor, with the error bound it promises.

    The numbers state the bound for tools reading manifest.json: values kept are within
    ``step`` x scale (scale = the slice's stored scale) or ``relative`` x |value| (fp16);
    values under ``threshold`` x the slice's peak are stored as 0; ``signed`` False means
    negative values are stored as 0."""

    name: str
    value_dtype: str
    has_scale: bool
    error_bound: str
    signed: bool = True
    threshold: float = 0.0
    step: float = 0.0
    relative: float = 0.0


HEATMAP_ENCODINGS: dict[str, Encoding] = {
    "i8-thresh": Encoding(
        "i8-thresh",
        "int8",
        True,
        f"|x| < {HEATMAP_THRESHOLD} * scale stored as 0 (scale = per-(view,joint) max |x| rounded up to fp16; "
        "removes the low-amplitude floor, which otherwise dominates the compressed size); others "
        f"|err| <= scale/254; sign kept, so |err| <= {HEATMAP_THRESHOLD} * scale everywhere",
        signed=True,
        threshold=HEATMAP_THRESHOLD,
        step=1 / 254,
    ),
    "u8-joint-scale": Encoding(
        "u8-joint-scale",
        "uint8",
        True,
        "|err| <= scale/510 (scale = per-(view,joint) max rounded up to fp16); negative values stored as 0",
        signed=False,
        step=1 / 510,
    ),
    "u8-thresh": Encoding(
        "u8-thresh",
        "uint8",
        True,
        f"x < {HEATMAP_THRESHOLD} * per-(view,joint) max stored as 0 (negative values included); "
        "others |err| <= scale/510",
        signed=False,
        threshold=HEATMAP_THRESHOLD,
        step=1 / 510,
    ),
    "fp16": Encoding("fp16", "float16", False, "|err| <= 2^-11 |x| (fp16 rounding)", relative=2.0**-11),
    "fp16-thresh": Encoding(
        "fp16-thresh",
        "float16",
        False,
        f"x < {HEATMAP_THRESHOLD} * per-(view,joint) max stored as 0 (negative values included); "
        "others |err| <= 2^-11 |x|",
        signed=False,
        threshold=HEATMAP_THRESHOLD,
        relative=2.0**-11,
    ),
}
TOKEN_ENCODINGS: dict[str, Encoding] = {
    "int8-token-scale": Encoding(
        "int8-token-scale",
        "int8",
        True,
        "|err| <= scale/254 (scale = per-token absmax rounded up to fp16)",
        step=1 / 254,
    ),
    "fp16": Encoding("fp16", "float16", False, "|err| <= 2^-11 |x| (fp16 rounding)", relative=2.0**-11),
}
DEFAULT_HEATMAP_ENCODING = "i8-thresh"
DEFAULT_TOKEN_ENCODING = "int8-token-scale"


@dataclass(frozen=True)
class Precision:
    """A precision the teacher may run in while caching, and how far its outputs may then
    be from a float32 forward on the CPU (what ``spot_check`` reruns), as a fraction of the
    field's max |x| over the checked views, on top of the encoding's own bound."""

    name: str
    doc: str
    heatmap_tolerance: float
    token_tolerance: float


# bf16 autocast against float32, measured on the CPU on trained tokenpose-tiny teachers: up to
# 2-4% of a joint's heatmap peak, 1-2% of a token's absmax; fp16 about 6x less. The fp32
# tolerance covers TF32 matmuls on a GPU (10 mantissa bits for the matmul inputs, as fp16).
TEACHER_PRECISIONS: dict[str, Precision] = {
    "fp32": Precision("fp32", "float32 (TF32 matmuls on a GPU)", 0.01, 0.01),
    "bf16": Precision("bf16", "bfloat16 autocast", 0.08, 0.04),
    "fp16": Precision("fp16", "float16 autocast", 0.01, 0.01),
}
DEFAULT_TEACHER_PRECISION = "fp32"
# Caches from before the precision was recorded ran bf16 autocast on a GPU, fp32 on the CPU.
UNRECORDED_TEACHER_PRECISION = "bf16"


@dataclass(frozen=True)
class CacheSpec:
    """Shapes and encodings of a cache. Sizes come from the teacher's ModelConfig.

    ``tokens`` False: the teacher has no tokens (a heatmap teacher such as SimpleBaseline):
    the cache holds heatmaps, Gaussians and confidences only, ``dim`` and ``num_patches`` are 0
    and there are no token arrays at all (not empty ones). Manifests written before this field
    existed were all TokenPose caches: the default is True.

    ``token_views`` Vt: the token fields are stored for views 0..Vt-1 only; the units of views
    >= Vt hold no token arrays at all (as a teacher without tokens). None (the default, not
    written to JSON, so older caches and default builds are unchanged): every view has them.
    ``unit_spec(view)`` is the spec one stored unit follows."""

    num_joints: int
    heatmap_size: tuple[int, int]  # (H, W)
    dim: int
    num_patches: int
    heatmap_encoding: str = DEFAULT_HEATMAP_ENCODING
    token_encoding: str = DEFAULT_TOKEN_ENCODING
    store_crops: bool = False
    tokens: bool = True
    token_views: int | None = None

    def __post_init__(self) -> None:
        # JSON gives lists; keep the dataclass hashable and comparable.
        object.__setattr__(self, "heatmap_size", tuple(int(v) for v in self.heatmap_size))
        sizes = (self.num_joints, *self.heatmap_size, *((self.dim, self.num_patches) if self.tokens else ()))
        if len(self.heatmap_size) != 2 or any(int(v) <= 0 for v in sizes):
            raise ValueError(f"CacheSpec sizes must be positive with heatmap_size=(H, W); got {self}")
        if not self.tokens and (self.dim or self.num_patches):
            raise ValueError(f"a CacheSpec without tokens has dim = num_patches = 0; got {self}")
        if self.heatmap_encoding not in HEATMAP_ENCODINGS:
            raise ValueError(
                f"unknown heatmap_encoding {self.heatmap_encoding!r}; choose one of {list(HEATMAP_ENCODINGS)}"
            )
        if self.token_encoding not in TOKEN_ENCODINGS:
            raise ValueError(f"unknown token_encoding {self.token_encoding!r}; choose one of {list(TOKEN_ENCODINGS)}")
        if self.token_views is not None:
            if isinstance(self.token_views, bool) or not isinstance(self.token_views, int) or self.token_views < 1:
                raise ValueError(f"token_views must be an integer >= 1 (or None: all views), got {self.token_views!r}")
            if not self.tokens:
                raise ValueError("token_views is set but the teacher has no tokens (tokens=False)")

    def has_tokens(self, view: int) -> bool:
        """Whether the unit of view ``view`` stores the token fields."""
        return self.tokens and (self.token_views is None or view < self.token_views)

    def unit_spec(self, view: int) -> CacheSpec:
        """The spec the stored unit of view ``view`` follows: the cache's without
        ``token_views`` (so a unit's bytes are those of a cache storing tokens on every view),
        and without tokens at all from view ``token_views`` on."""
        if self.token_views is None:
            return self
        if view < self.token_views:
            return dataclasses.replace(self, token_views=None)
        return dataclasses.replace(self, tokens=False, dim=0, num_patches=0, token_views=None)

    @classmethod
    def from_model_config(cls, config: Any, **overrides: Any) -> CacheSpec:
        """Spec for a teacher ``ModelConfig`` (duck-typed: this layer never imports torch)."""
        sizes = {
            "num_joints": config.num_joints,
            "heatmap_size": tuple(config.heatmap_size),
            "dim": config.token_dim,
            "num_patches": config.num_patches,
            "tokens": config.has_tokens,
        }
        return cls(**{**sizes, **overrides})

    def dims(self) -> dict[str, int]:
        height, width = self.heatmap_size
        return {"K": self.num_joints, "H": height, "W": width, "D": self.dim, "P": self.num_patches}

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["heatmap_size"] = list(self.heatmap_size)
        if self.token_views is None:  # every view has tokens: the form caches had before the field
            del d["token_views"]
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
    """Logical fields a cache with this spec holds (no token fields for a teacher without tokens)."""
    return tuple(n for n in FIELDS if (n != CROP_FIELD or spec.store_crops) and (n not in TOKEN_FIELDS or spec.tokens))


# Teacher outputs the distillation losses can read: what a cache of a token teacher holds, and
# what one of a heatmap teacher (no tokens) holds.
TEACHER_OUTPUT_FIELDS = (HEATMAP_FIELD, "gauss", "confidence", *TOKEN_FIELDS)


def teacher_fields(spec: CacheSpec) -> tuple[str, ...]:
    """The teacher outputs a cache with this spec holds."""
    stored = field_names(spec)
    return tuple(n for n in TEACHER_OUTPUT_FIELDS if n in stored)


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
            return -128  # the int8 encodings only produce -127..127
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
