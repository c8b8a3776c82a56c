"""Reading, decoding and validating one image: the gate every corpus and generated image passes.

Pure functions (no Ray): `decode_image` turns encoded bytes into an 8-bit RGB `PIL.Image` or raises
`ImageError` naming the problem; `validate_record` / `validate_batch` turn that into row columns
(`image_id`, `width`, `height`, `error`) so one bad file becomes one error row and never stops a job.
"""
from __future__ import annotations

import io
import threading
import urllib.error
import urllib.parse
import urllib.request
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image, ImageOps, UnidentifiedImageError

from fbmem.storage.keys import content_hash

USER_AGENT = "fbmem/0.1 (+image audit)"

# Output columns added (or replaced) by validation, with their Arrow types.
VALIDATED_FIELDS: dict[str, pa.DataType] = {
    "image_bytes": pa.binary(),
    "mask_bytes": pa.binary(),
    "image_id": pa.string(),
    "width": pa.int32(),
    "height": pa.int32(),
    "error": pa.string(),
}

_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}
_HIGH_BIT_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N", "F"}


class ImageError(ValueError):
    """An input that is not a usable image; the message names the problem (it becomes the row's error)."""


def sha256_hex(data: bytes) -> str:
    return content_hash(data)


# --------------------------------------------------------------------------------------------- reading


def read_uri(uri: str, *, timeout_s: float) -> bytes:
    """Bytes of a local path, file:// URL, http(s) URL, or (via pyarrow.fs) an object-store URI.

    Every failure becomes an `ImageError` naming the uri, so a caller can turn it into an error row.
    """
    if not uri:
        raise ImageError("cannot read '': empty uri")
    scheme = urllib.parse.urlsplit(uri).scheme.lower() if "://" in uri else ""
    if scheme in ("", "file"):
        path = urllib.request.url2pathname(urllib.parse.urlsplit(uri).path) if scheme == "file" else uri
        try:
            with open(path, "rb") as f:
                return f.read()
        except FileNotFoundError:
            raise ImageError(f"cannot read {uri}: file not found") from None
        except IsADirectoryError:
            raise ImageError(f"cannot read {uri}: is a directory") from None
        except OSError as exc:
            raise ImageError(f"cannot read {uri}: {exc.strerror or exc}") from None
    if scheme in ("http", "https"):
        request = urllib.request.Request(uri, headers={"User-Agent": USER_AGENT})
        try:
            with urllib.request.urlopen(request, timeout=timeout_s) as response:
                return response.read()
        except urllib.error.HTTPError as exc:
            raise ImageError(f"cannot read {uri}: HTTP {exc.code} {exc.reason}") from None
        except urllib.error.URLError as exc:
            raise ImageError(f"cannot read {uri}: {exc.reason}") from None
        except TimeoutError:
            raise ImageError(f"cannot read {uri}: timed out after {timeout_s:g} s") from None
        except OSError as exc:
            raise ImageError(f"cannot read {uri}: {exc}") from None
    # s3://, gs://, hdfs:// ...: corpora at scale live in object stores; pyarrow.fs knows them.
    try:
        import pyarrow.fs as pafs

        fs, path = pafs.FileSystem.from_uri(uri)
        with fs.open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError:
        raise ImageError(f"cannot read {uri}: file not found") from None
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise ImageError(f"cannot read {uri}: {exc}") from None


# -------------------------------------------------------------------------------------------- decoding

_PIL_LIMIT_LOCK = threading.Lock()


@contextmanager
def _pil_limit_lifted() -> Iterator[None]:
    """Lift PIL's global decompression-bomb limit for one header parse, then restore it.

    Only used when PIL refuses an image our own `max_pixels` would judge (PIL raises above twice its
    limit before we can even read the size). The window is a header parse, guarded by a lock so two
    of our own calls never restore the wrong value; the previous value is always put back.
    """
    with _PIL_LIMIT_LOCK:
        previous = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = previous


def _open_header(data: bytes) -> Image.Image:
    """Parse only the header (PIL opens lazily); our own pixel limit is checked by the caller."""
    with warnings.catch_warnings():
        # The warning band of PIL's check is redundant: we compare the header size with max_pixels.
        # (catch_warnings is process-global: fine for Ray map tasks, which run one at a time per worker.)
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            return Image.open(io.BytesIO(data))
        except Image.DecompressionBombError:
            with _pil_limit_lifted():
                return Image.open(io.BytesIO(data))


def _high_bit_to_l(img: Image.Image) -> Image.Image:
    """16/32-bit integer or float grey -> 8-bit L by scaling, not clipping.

    Values that fit 0..65535 are 16-bit samples (PNG/TIFF) and map by v/257, which keeps absolute
    levels (black stays black, 65535 -> 255); other ranges (signed 32-bit, floats) are stretched from
    their min..max, floats already in 0..1 map by v*255.
    """
    arr = np.asarray(img)
    if arr.dtype.kind in "ui" and arr.size and arr.min() >= 0 and arr.max() <= 65535:
        out = (arr.astype(np.uint32) * 255 + 32767) // 65535
    else:
        arr = np.nan_to_num(arr.astype(np.float64))
        lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 1.0)
        if arr.dtype.kind == "f" and lo >= 0.0 and hi <= 1.0 and img.mode == "F":
            out = np.rint(arr * 255.0)
        elif hi > lo:
            out = np.rint((arr - lo) * (255.0 / (hi - lo)))
        else:
            out = np.zeros_like(arr)
    return Image.fromarray(out.astype(np.uint8), mode="L")


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB.

    Transparency is composited on WHITE: a transparent background carries no content, and white is
    what a viewer (and most training pipelines) shows behind it; black would invent a dark background
    that the FB-Mem background score would then compare as if it were real.
    """
    if img.mode in _HIGH_BIT_MODES:
        img = _high_bit_to_l(img)
    if img.mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if img.mode == "RGB":
        return img
    return img.convert("RGB")  # CMYK, YCbCr, L, 1, P, RGBX, ...


def decode_image(data: bytes, *, max_pixels: int, min_side: int) -> Image.Image:
    """Decode and validate encoded image bytes into an RGB image with EXIF orientation applied.

    Size limits are checked from the header BEFORE pixels are decoded (a small file can declare a
    huge image), and the full decode is forced so a truncated file fails here, not in a model actor.
    """
    if not data:
        raise ImageError("empty file")
    try:
        img = _open_header(data)
    except UnidentifiedImageError:
        raise ImageError("not an image (unrecognised format)") from None
    except Exception as exc:  # PIL raises many types on broken headers
        raise ImageError(f"truncated or corrupt image: {type(exc).__name__}: {exc}") from None
    width, height = img.size
    pixels = width * height
    if pixels > max_pixels:
        raise ImageError(
            f"image too large: {width}x{height} = {pixels} pixels > max_pixels {max_pixels}"
        )
    if min(width, height) < min_side:
        raise ImageError(f"image too small: {width}x{height} < min side {min_side}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img.load()
    except Exception as exc:
        raise ImageError(f"truncated or corrupt image: {type(exc).__name__}: {exc}") from None
    try:
        img = ImageOps.exif_transpose(img) or img
    except Exception:
        pass  # a malformed EXIF block does not make the pixels bad; keep them unrotated
    try:
        return _to_rgb(img)
    except Exception as exc:
        raise ImageError(f"unsupported image mode {img.mode}: {exc}") from None


# ------------------------------------------------------------------------------------------ validation


def validate_record(
    row: dict[str, Any], *, max_pixels: int, min_side: int, timeout_s: float
) -> dict[str, Any]:
    """One source row -> the same row plus image_bytes, image_id, width, height, error (never raises).

    A row arriving with `error` already set (e.g. a corrupt webdataset shard) keeps it untouched.
    Error rows drop `image_bytes` (garbage or a huge file is not worth shipping on) but keep
    `image_id` when bytes were read, so the same bad content is recognisable across sources.
    """
    out = dict(row)
    out.setdefault("mask_bytes", None)
    out.update(image_id=None, width=None, height=None)
    if out.get("error"):
        out["image_bytes"] = None
        return out
    out["error"] = None
    data = out.get("image_bytes")
    try:
        if data is None:
            data = read_uri(str(out.get("source_uri") or ""), timeout_s=timeout_s)
        out["image_id"] = sha256_hex(data)
        img = decode_image(data, max_pixels=max_pixels, min_side=min_side)
        out["image_bytes"] = data
        out["width"], out["height"] = img.size
        mask_uri = out.get("mask_uri")
        if mask_uri and out.get("mask_bytes") is None:
            try:
                out["mask_bytes"] = read_uri(str(mask_uri), timeout_s=timeout_s)
            except ImageError as exc:
                raise ImageError(f"mask: {exc}") from None
    except ImageError as exc:
        out.update(image_bytes=None, width=None, height=None, error=str(exc))
    except Exception as exc:  # never let one row kill a batch
        out.update(
            image_bytes=None, width=None, height=None, error=f"unexpected error: {type(exc).__name__}: {exc}"
        )
    return out


def validate_batch(
    batch: pa.Table, *, max_pixels: int, min_side: int, timeout_s: float
) -> pa.Table:
    """`validate_record` over an Arrow batch, for `map_batches(batch_format="pyarrow")`.

    Every input row comes out, in order; other columns keep their types.
    """
    rows = [
        validate_record(r, max_pixels=max_pixels, min_side=min_side, timeout_s=timeout_s)
        for r in batch.to_pylist()
    ]
    fields = [f for f in batch.schema if f.name not in VALIDATED_FIELDS]
    fields += [pa.field(name, typ) for name, typ in VALIDATED_FIELDS.items()]
    columns = [pa.array([r.get(f.name) for r in rows], type=f.type) for f in fields]
    return pa.Table.from_arrays(columns, schema=pa.schema(fields))

