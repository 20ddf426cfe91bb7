"""The loader's fast decode and warp against Pillow, the reference they replaced: the JPEG
decode is bitwise Pillow's, the warp within one grey level of Pillow's bilinear transform."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from distilpose.data.coco import ImageError, read_image
from distilpose.data.fast_crop import decode_jpeg, pillow_decode, pillow_warp, warp_affine
from distilpose.data.transforms import ViewParams, _unflipped_affine, invert_affine, warp_image


def natural_image(h: int = 120, w: int = 160, seed: int = 0) -> np.ndarray:
    """Smooth shapes plus noise: JPEG-like content with edges and texture."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    image = np.stack([xs * 255 / w, ys * 255 / h, 128 + 100 * np.sin(xs / 7 + ys / 11)], axis=-1)
    image += rng.normal(0, 20, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def jpeg(image: np.ndarray, **options) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", **options)
    return buf.getvalue()


@pytest.mark.parametrize(
    "options",
    [
        dict(quality=90),  # 4:2:0, the synthetic data's and COCO's usual
        dict(quality=95, subsampling=0),  # 4:4:4
        dict(quality=95, subsampling=1),  # 4:2:2
        dict(quality=85, progressive=True),
    ],
)
def test_decode_is_bitwise_pillow(options) -> None:
    data = jpeg(natural_image(), **options)
    np.testing.assert_array_equal(decode_jpeg(data), pillow_decode(data))


def test_grey_jpeg_decodes_to_rgb_as_pillow() -> None:
    data = jpeg(natural_image()[..., 0])
    got = decode_jpeg(data)
    assert got.shape == (120, 160, 3)
    np.testing.assert_array_equal(got, pillow_decode(data))


def test_what_simplejpeg_would_decode_differently_is_left_to_pillow(tmp_path) -> None:
    image = natural_image()
    cmyk = io.BytesIO()
    Image.fromarray(image).convert("CMYK").save(cmyk, format="JPEG")
    png = io.BytesIO()
    Image.fromarray(image).save(png, format="PNG")
    truncated = jpeg(image)[:2000]
    assert decode_jpeg(cmyk.getvalue()) is None  # its CMYK -> RGB differs from Pillow's by 1
    assert decode_jpeg(png.getvalue()) is None
    assert decode_jpeg(truncated) is None
    (tmp_path / "cut.jpg").write_bytes(truncated)
    with pytest.raises(ImageError, match="cut.jpg"):  # Pillow names the bad file, as before
        read_image(str(tmp_path), "cut.jpg")
    (tmp_path / "cmyk.jpg").write_bytes(cmyk.getvalue())
    np.testing.assert_array_equal(read_image(str(tmp_path), "cmyk.jpg"), pillow_decode(cmyk.getvalue()))


@pytest.mark.parametrize(
    "view",
    [
        ViewParams(center=(80.0, 60.0), scale=(60.0, 80.0)),  # upsampled 3.2x
        ViewParams(center=(70.3, 50.8), scale=(150.0, 200.0), rotation=31.0),  # downsampled, rotated
        ViewParams(center=(10.0, 100.0), scale=(90.0, 120.0), rotation=-80.0),  # mostly outside: black fill
    ],
)
def test_warp_is_within_one_grey_level_of_pillow(view) -> None:
    image = natural_image()
    size = (64, 48)
    got = warp_image(image, view, size)
    want = pillow_warp(image, invert_affine(_unflipped_affine(view, size)), size)
    diff = np.abs(got.astype(int) - want.astype(int))
    # Interior pixels: bilinear in fixed point (OpenCV) vs float (Pillow), one level of
    # rounding. At the image border the two treat the half-pixel rim differently: skip it.
    to_image = invert_affine(_unflipped_affine(view, size))
    inside = np.full(image.shape[:2], 255, np.uint8)
    covered = warp_affine(inside, to_image, size)
    interior = (covered == 255) & (warp_affine(np.pad(inside[1:-1, 1:-1], 1), to_image, size) == 255)
    assert interior.sum() > 100
    assert diff[interior].max() <= 1
    assert (got[covered == 0] == 0).all()  # black outside the image
