"""Foreground masks as bytes: one storage format, and the rules for masks a source gives us.

Stored format (`mask_png`): an 8-bit single-channel (mode L) PNG of the same size as the decoded
image, 0 = background, 255 = foreground. Values in between are kept: a soft mask (a matte, or a
mask upsampled from a smaller one) weighs pixels by how sure it is, and 8 bits is plenty for that.
In memory a mask is a float32 HxW array in [0, 1].

Precomputed masks (`mask_bytes`, given by a source) may come in any format PIL reads. The rule:
  * if the file has an alpha channel that carries information (transparency, not all one value),
    the alpha is the mask: that is how cut-outs ("foreground on transparent") are saved;
  * otherwise the luminance is the mask (L, 1-bit, RGB, palette, and 16-bit/float grayscale, each
    scaled to [0, 1] by its own range);
  * values are kept soft, never thresholded;
  * the mask's size (after its own EXIF orientation) must equal the image's, else ValueError naming
    both sizes. Masks are never resized to fit: a size mismatch usually means the wrong file.
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps

_EXIF_ORIENTATION = 0x0112
_SWAPS_AXES = {5, 6, 7, 8}  # EXIF orientations that rotate by 90 degrees


def _as_unit_mask(mask: np.ndarray) -> np.ndarray:
    """Validate a mask array and return it as float32 in [0, 1] (bool allowed)."""
    arr = np.asarray(mask)
    if arr.ndim != 2:
        raise ValueError(f"a mask must be a 2-D HxW array, got shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"a mask must not be empty, got shape {arr.shape}")
    if arr.dtype == np.bool_:
        return arr.astype(np.float32)
    if not np.issubdtype(arr.dtype, np.floating):
        # uint8 masks are ambiguous (0/1 or 0/255): make the caller say which.
        raise TypeError(f"a mask must be float in [0, 1] or bool, got dtype {arr.dtype}")
    arr = arr.astype(np.float32, copy=False)
    if not np.all(np.isfinite(arr)):
        raise ValueError("a mask must not contain NaN or infinite values")
    lo, hi = float(arr.min()), float(arr.max())
    if lo < 0.0 or hi > 1.0:
        raise ValueError(f"mask values must lie in [0, 1], got range [{lo:g}, {hi:g}]")
    return arr


def encode_mask_png(mask: np.ndarray) -> bytes:
    """float [0,1] (or bool) HxW -> 8-bit L PNG bytes (255 = foreground)."""
    arr = _as_unit_mask(mask)
    img = Image.fromarray(np.rint(arr * 255.0).astype(np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def decode_mask_png(data: bytes) -> np.ndarray:
    """Stored mask PNG -> float32 HxW in [0, 1]. Only our own format (mode L) is accepted."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.format != "PNG" or img.mode != "L":
                raise ValueError(
                    f"a stored mask must be an 8-bit grayscale PNG, got {img.format} mode {img.mode}"
                )
            arr = np.asarray(img, dtype=np.uint8)
    except (OSError, Image.DecompressionBombError) as exc:
        raise ValueError(f"stored mask is not a readable PNG: {exc}") from exc
    return arr.astype(np.float32) / 255.0


def _has_informative_alpha(img: Image.Image) -> bool:
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in img.info:
        alpha = np.asarray(img.convert("RGBA").getchannel("A"))
        return alpha.size > 0 and int(alpha.min()) != int(alpha.max())
    return False


def _luminance(img: Image.Image) -> np.ndarray:
    """Grayscale in [0, 1], scaled by the pixel format's range (not by the data's)."""
    if img.mode.startswith("I;16"):
        return np.asarray(img, dtype=np.float32) / 65535.0
    if img.mode == "I":
        arr = np.asarray(img, dtype=np.float32)
        # PIL opens 16-bit grayscale PNGs as mode I; 8-bit data stored in I stays in 0..255.
        scale = 65535.0 if arr.size and float(arr.max()) > 255.0 else 255.0
        return np.clip(arr / scale, 0.0, 1.0)
    if img.mode == "F":
        return np.clip(np.asarray(img, dtype=np.float32), 0.0, 1.0)
    return np.asarray(img.convert("L"), dtype=np.float32) / 255.0


def mask_from_file_bytes(data: bytes, size: tuple[int, int]) -> np.ndarray:
    """A source's mask file -> float32 HxW in [0, 1] for an image of `size` = (width, height).

    Alpha if informative, else luminance; soft values kept; sizes must match (module docstring).
    """
    want_w, want_h = int(size[0]), int(size[1])
    try:
        with Image.open(io.BytesIO(data)) as img:
            w, h = img.size
            if img.getexif().get(_EXIF_ORIENTATION, 1) in _SWAPS_AXES:
                w, h = h, w
            # Checked before decoding pixels: a wrong (or huge) file costs nothing.
            if (w, h) != (want_w, want_h):
                raise ValueError(
                    f"precomputed mask is {w}x{h} but the image is {want_w}x{want_h} (width x height)"
                )
            img = ImageOps.exif_transpose(img)
            if _has_informative_alpha(img):
                arr = np.asarray(img.convert("RGBA").getchannel("A"), dtype=np.float32) / 255.0
            else:
                arr = _luminance(img)
    except (OSError, Image.DecompressionBombError, SyntaxError) as exc:
        raise ValueError(f"precomputed mask is not a readable image: {exc}") from exc
    return np.ascontiguousarray(arr, dtype=np.float32)


def fg_fraction(mask: np.ndarray) -> float:
    """Share of the frame that is foreground; soft pixels count by their weight."""
    return float(_as_unit_mask(mask).mean(dtype=np.float64))


def border_coverage(segmentation: np.ndarray) -> float:
    """Fraction of the image's border pixels (the one-pixel frame) that the mask covers."""
    seg = np.asarray(segmentation, dtype=bool)
    h, w = seg.shape
    if h <= 2 or w <= 2:
        return float(seg.mean())  # every pixel is on the border
    ring_sum = int(seg[0, :].sum() + seg[-1, :].sum() + seg[1:-1, 0].sum() + seg[1:-1, -1].sum())
    return ring_sum / (2 * (h + w) - 4)
