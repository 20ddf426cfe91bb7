"""How a cached view's values are stored: the heatmap and token encodings, and whole
record batches of views converted to the stored ("raw") arrays and back.

The teacher stage hands over fp32 numpy batches (one row per augmented view); the stores
keep them in the compact raw form produced by ``encode_views`` and give them back through
``decode_fields``. Encodings were chosen by measurement (see tests/test_cache_store.py and
bench/bench_cache_bytes.py): the teacher's heatmaps carry a low noise floor that makes
fp16 incompressible, and random-like tokens barely compress, so precision, not the codec,
decides the size. Heatmaps keep their sign by default (i8-thresh): a trained teacher's raw
maps are about a third negative, and the online teacher's losses see those values.

Stored ("raw") arrays per view, for a spec with K joints, Hh x Wh heatmaps, D-dim tokens,
P visual tokens:

    small fields        exactly as given (int64 ids, int16 view, float32 geometry)
    heatmaps            i8-thresh (default): int8 (K,Hh,Wh) + heatmaps_scale float16 (K,)
                        u8-thresh / u8-joint-scale: uint8 (K,Hh,Wh) + heatmaps_scale float16 (K,)
                        fp16 / fp16-thresh: float16 (K,Hh,Wh)
    kpt_tokens          int8-token-scale: int8 (K,D) + kpt_tokens_scale float16 (K,)
                        fp16: float16 (K,D)
    vis_tokens          as kpt_tokens with P tokens: int8 (P,D) + vis_tokens_scale (P,), or fp16
    crop_jpeg           variable-length bytes (in memory: object array of ``bytes``)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.cache.schema import (
    CROP_FIELD,
    FIELDS,
    HEATMAP_FIELD,
    HEATMAP_THRESHOLD,
    SCALE_SUFFIX,
    TOKEN_FIELDS,
    CacheSpec,
    field_names,
    resolve_fields,
    stored_arrays,
)

FP16_MAX = float(np.finfo(np.float16).max)
# Relative rounding error of fp16 (half an ulp, 10 mantissa bits) and its absolute floor
# for subnormals (half the smallest subnormal step).
FP16_REL_ERR = 2.0**-11
FP16_ABS_ERR = 2.0**-25


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
    if encoding == "i8-thresh":
        flat = x.reshape(*x.shape[:-2], -1)
        scale = fp16_scale(np.abs(flat).max(axis=-1))
        kept = np.where(np.abs(flat) < HEATMAP_THRESHOLD * scale.astype(np.float32)[..., None], np.float32(0), flat)
        values = _quantize(kept, scale, 127, -127, "int8").reshape(x.shape)
        return {HEATMAP_FIELD: values, HEATMAP_FIELD + SCALE_SUFFIX: scale}
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
    if encoding == "i8-thresh":
        step = scale.astype(np.float32) / np.float32(127)
        return values.astype(np.float32) * step[..., None, None]
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
    if encoding == "i8-thresh":
        scale = encode_heatmaps(x, encoding)[HEATMAP_FIELD + SCALE_SUFFIX].astype(np.float32)[..., None, None]
        quant = scale / 254 + scale * slack
        return np.where(np.abs(x) < HEATMAP_THRESHOLD * scale, np.maximum(np.abs(x), quant), quant)
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


def encode_crop_jpeg(crop: np.ndarray) -> bytes:
    """uint8 (H, W, 3) crop -> JPEG bytes (quality 95)."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(crop).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def decode_crop_jpeg(data: bytes) -> np.ndarray:
    """JPEG bytes -> uint8 (H, W, 3). The teacher stage runs the teacher on this decode of
    the stored crop and the loader gives the student the same decode: both see one image
    (libjpeg-turbo's, through simplejpeg; Pillow's decode for what simplejpeg refuses)."""
    import io

    from PIL import Image

    from distilpose.data.fast_crop import decode_jpeg

    data = bytes(data)
    fast = decode_jpeg(data)
    return fast if fast is not None else np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


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
