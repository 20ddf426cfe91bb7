"""JPEG decoding and the crop warp at loader speed: libjpeg-turbo through simplejpeg and
OpenCV's `warpAffine` (measured by `bench/bench_loader_cost.py`).

Both are used by every crop producer (the teacher stage, the student loaders, the
evaluation dataset, the cache's spot check): the teacher and the student see one image.

- `decode_jpeg`: the same libjpeg-turbo decode Pillow runs (accurate integer IDCT, fancy
  upsampling), so the pixels are bitwise Pillow's (tests/test_fast_crop.py checks it), at
  2-4x less CPU: no Python marker parsing, no intermediate copies. Anything simplejpeg does
  not take exactly (not a JPEG, CMYK, a recoverable corruption) returns None and the caller decodes
  with Pillow, which also gives the error message a bad file deserves.
- `warp_affine`: bilinear in fixed point (1/32 px positions, as mmpose's cv2 pipeline), ~10x
  less CPU than Pillow's generic per-pixel transform; it differs from Pillow's bilinear by at
  most one grey level.
"""

from __future__ import annotations

import cv2
import numpy as np
import simplejpeg

# A loader warps one small crop at a time: OpenCV's thread pool would only add wake-ups
# (the loader scales by processes, see pipeline.cache_loader). Process-wide, and only this
# module uses OpenCV.
cv2.setNumThreads(1)

JPEG_MAGIC = b"\xff\xd8"
# JPEG colour spaces whose RGB decode is bitwise Pillow's; CMYK/YCCK convert differently.
EXACT_COLORSPACES = ("YCbCr", "Gray")


def decode_jpeg(data: bytes) -> np.ndarray | None:
    """JPEG bytes -> RGB uint8 (H, W, 3), or None if simplejpeg cannot decode them exactly
    as Pillow would (then decode with Pillow)."""
    if bytes(data[:2]) != JPEG_MAGIC:
        return None
    try:
        if simplejpeg.decode_jpeg_header(data)[2] not in EXACT_COLORSPACES:
            return None
        return simplejpeg.decode_jpeg(data, colorspace="RGB", strict=True)
    except ValueError:  # a header or data libjpeg-turbo warns about (truncated, corrupt): Pillow decides
        return None


def warp_affine(image: np.ndarray, crop_to_image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear crop (H, W, C) uint8 of `image` sampled at `crop_to_image` (2, 3) applied to
    integer crop pixel centres; outside the image is black."""
    out_h, out_w = size
    return cv2.warpAffine(
        np.ascontiguousarray(image),
        np.asarray(crop_to_image, dtype=np.float64),
        (out_w, out_h),
        flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=(0, 0, 0, 0),
    )


# ----------------------------------------------------------------------------- references
# What the loaders ran before (Pillow alone): tests check the fast paths against them and
# `bench/bench_loader_cost.py` measures them side by side.


def pillow_decode(data: bytes) -> np.ndarray:
    """JPEG bytes -> RGB uint8 (H, W, 3) with Pillow."""
    import io

    from PIL import Image

    with Image.open(io.BytesIO(bytes(data))) as im:
        return np.array(im.convert("RGB"), dtype=np.uint8)


def pillow_warp(image: np.ndarray, crop_to_image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """`warp_affine` with Pillow's float bilinear transform. Pillow samples output pixel (x, y)
    at A @ (x + .5, y + .5) in pixel-corner coordinates: the map is shifted so it samples at
    integer pixel centres, where cv2.warpAffine does."""
    from PIL import Image

    a = np.asarray(crop_to_image, dtype=np.float64)
    tx = a[0, 2] + 0.5 - 0.5 * (a[0, 0] + a[0, 1])
    ty = a[1, 2] + 0.5 - 0.5 * (a[1, 0] + a[1, 1])
    coeffs = (a[0, 0], a[0, 1], tx, a[1, 0], a[1, 1], ty)
    out_h, out_w = size
    crop = Image.fromarray(np.ascontiguousarray(image)).transform(
        (out_w, out_h), Image.Transform.AFFINE, coeffs, resample=Image.Resampling.BILINEAR
    )
    return np.array(crop)
