"""Mask bytes: the stored PNG format, and how a source's precomputed mask files are read."""
from __future__ import annotations

import io
import re

import numpy as np
import pytest
from PIL import Image

from fbmem.pipelines.masks import (
    decode_mask_png,
    encode_mask_png,
    fg_fraction,
    mask_from_file_bytes,
)


def _png(img: Image.Image, **save_kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", **save_kwargs)
    return buf.getvalue()


def test_png_round_trip_keeps_soft_values_within_one_level():
    mask = np.random.default_rng(0).random((17, 23)).astype(np.float32)
    data = encode_mask_png(mask)
    with Image.open(io.BytesIO(data)) as img:
        assert (img.format, img.mode, img.size) == ("PNG", "L", (23, 17))
    back = decode_mask_png(data)
    assert back.dtype == np.float32 and back.shape == (17, 23)
    assert np.max(np.abs(back - mask)) <= 0.5 / 255 + 1e-6


def test_png_round_trip_of_binary_mask_is_exact():
    mask = np.zeros((10, 12), dtype=bool)
    mask[2:7, 3:9] = True
    back = decode_mask_png(encode_mask_png(mask))
    np.testing.assert_array_equal(back, mask.astype(np.float32))


@pytest.mark.parametrize(
    "bad, exc, words",
    [
        (np.full((4, 4), 1.5, np.float32), ValueError, "[0, 1]"),
        (np.full((4, 4), np.nan, np.float32), ValueError, "NaN"),
        (np.zeros((4, 4, 3), np.float32), ValueError, "2-D"),
        (np.zeros((4, 4), np.uint8), TypeError, "uint8"),
        (np.zeros((0, 4), np.float32), ValueError, "empty"),
    ],
)
def test_encode_rejects_bad_masks_with_a_reason(bad, exc, words):
    with pytest.raises(exc, match=re.escape(words)):
        encode_mask_png(bad)


def test_decode_rejects_anything_but_our_format():
    with pytest.raises(ValueError, match="8-bit grayscale PNG"):
        decode_mask_png(_png(Image.new("RGB", (4, 4))))
    with pytest.raises(ValueError, match="not a readable PNG"):
        decode_mask_png(b"not a png")


def test_given_grayscale_mask_is_kept_soft():
    arr = np.array([[0, 128, 255], [64, 192, 10]], dtype=np.uint8)
    out = mask_from_file_bytes(_png(Image.fromarray(arr)), size=(3, 2))
    np.testing.assert_allclose(out, arr / 255.0, atol=1e-6)


def test_given_one_bit_mask():
    arr = np.zeros((6, 5), dtype=bool)
    arr[1:4, 2:4] = True
    out = mask_from_file_bytes(_png(Image.fromarray(arr).convert("1")), size=(5, 6))
    np.testing.assert_array_equal(out, arr.astype(np.float32))


def test_given_rgb_mask_uses_luminance():
    rgb = np.zeros((4, 4, 3), dtype=np.uint8)
    rgb[:2] = 255  # white top half
    out = mask_from_file_bytes(_png(Image.fromarray(rgb)), size=(4, 4))
    np.testing.assert_allclose(out[:2], 1.0)
    np.testing.assert_allclose(out[2:], 0.0)


def test_given_cutout_uses_alpha_not_colour():
    rgba = np.full((4, 6, 4), 255, dtype=np.uint8)  # white everywhere: luminance would say "all fg"
    rgba[..., 3] = 0
    rgba[1:3, 2:5, 3] = 255
    out = mask_from_file_bytes(_png(Image.fromarray(rgba)), size=(6, 4))
    np.testing.assert_allclose(out, rgba[..., 3] / 255.0)


def test_given_opaque_rgba_falls_back_to_luminance():
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., 3] = 255  # alpha carries no information
    rgba[:, :2, :3] = 255
    out = mask_from_file_bytes(_png(Image.fromarray(rgba)), size=(4, 4))
    np.testing.assert_allclose(out[:, :2], 1.0)
    np.testing.assert_allclose(out[:, 2:], 0.0)


def test_given_16_bit_mask_is_scaled_by_its_own_range():
    arr = np.array([[0, 32768, 65535]], dtype=np.uint16)
    out = mask_from_file_bytes(_png(Image.fromarray(arr)), size=(3, 1))
    np.testing.assert_allclose(out, arr / 65535.0, atol=1e-4)


def test_given_mask_of_wrong_size_names_both_sizes():
    data = _png(Image.new("L", (10, 8)))
    with pytest.raises(ValueError, match=r"mask is 10x8 but the image is 12x8"):
        mask_from_file_bytes(data, size=(12, 8))


def test_given_mask_with_exif_rotation_is_compared_and_returned_upright():
    arr = np.zeros((10, 20), dtype=np.uint8)  # stored 20 wide, 10 high
    arr[:, :5] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display: shown 10 wide, 20 high
    out = mask_from_file_bytes(_png(Image.fromarray(arr), exif=exif), size=(10, 20))
    assert out.shape == (20, 10)
    assert out.sum() == pytest.approx(arr.astype(bool).sum())


def test_unreadable_given_mask_is_a_value_error():
    with pytest.raises(ValueError, match="not a readable image"):
        mask_from_file_bytes(b"\x89PNG garbage", size=(4, 4))


def test_fg_fraction_weighs_soft_pixels():
    mask = np.zeros((4, 4), dtype=np.float32)
    mask[0, :] = 1.0
    mask[1, :] = 0.5
    assert fg_fraction(mask) == pytest.approx(6 / 16)
    assert fg_fraction(mask > 0.75) == pytest.approx(4 / 16)
