"""Reading, decoding and validating one image: the gate every corpus and generated image passes.

Pure functions (no Ray): `decode_image` turns encoded bytes into an 8-bit RGB `PIL.Image` or raises
`ImageError` naming the problem; `validate_record` / `validate_batch` turn that into row columns
(`image_id`, `width`, `height`, `error`) so one bad file becomes one error row and never stops a job.
A batch's URIs are read concurrently and bounded in time and bytes by `pipelines/fetch.py`.

What one image can cost is bounded before any pixel is decoded: the header's size is checked
against `max_pixels`, `min_side`, `max_aspect_ratio` and `max_side` (PIL opens lazily). An image
with more than `decode_max_pixels` pixels is decoded reduced: JPEG at the DCT level (`draft`, 1/2 to
1/8, so the full-size pixels never exist), other formats reduced right after the native decode and
before any mode conversion (which for alpha, palette or 16-bit images costs several times the
native buffer). So validation's peak per image is about the file's bytes (<= `fetch_max_bytes`) +
the native buffer (<= 4 bytes x `max_pixels`: PIL keeps RGB, RGBA, CMYK and 32-bit as 4 bytes a
pixel) + a few bytes x `decode_max_pixels`; `bench/decode.py` measures it.
"""
from __future__ import annotations

import io
import math
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image, UnidentifiedImageError

from fbmem.jobs.config import IngestConfig
from fbmem.pipelines.fetch import (
    FetchError,
    FetchPool,
    FetchSettings,
    fetch,
)
from fbmem.storage.keys import content_hash

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
# Modes whose samples are not intensities (palette indices, bits) or that Image.reduce refuses:
# these are downscaled by nearest neighbour, as PIL's own resize does for "P" and "1".
_NEAREST_MODES = {"P", "PA", "1", "I;16", "I;16B", "I;16L", "I;16N"}
# The formats a training corpus holds. Others PIL knows (EPS runs Ghostscript, PSD, FITS, SPIDER,
# ...) are refused as "not an image": they are rare in corpora and each decoder is attack surface.
DECODE_FORMATS = (
    "JPEG", "PNG", "WEBP", "GIF", "BMP", "DIB", "TIFF", "AVIF", "JPEG2000", "ICO", "PPM", "TGA", "QOI",
)  # (MPO, the multi-picture JPEG of cameras, opens through JPEG)
_ORIENTATION_TAG = 0x0112
# EXIF orientation -> the transpose that displays it upright (as ImageOps.exif_transpose); 5..8 swap w, h
_EXIF_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


class ImageError(ValueError):
    """An input that is not a usable image; the message names the problem (it becomes the row's error)."""


def sha256_hex(data: bytes) -> str:
    return content_hash(data)


# --------------------------------------------------------------------------------------------- reading


def fetch_settings(ingest: IngestConfig) -> FetchSettings:
    """The fetch bounds configured in `IngestConfig`."""
    return FetchSettings(
        threads=ingest.fetch_threads,
        connect_timeout_s=ingest.fetch_connect_timeout_s,
        read_timeout_s=ingest.http_timeout_s,
        deadline_s=ingest.fetch_deadline_s,
        max_bytes=ingest.fetch_max_bytes,
        retries=ingest.fetch_retries,
        backoff_s=ingest.fetch_backoff_s,
    )


def read_uri(uri: str, *, timeout_s: float, settings: FetchSettings | None = None) -> bytes:
    """Bytes of a local path, file:// URL, http(s) URL, or (via pyarrow.fs) an object-store URI.

    Without `settings`, an http(s) read (retries included) ends within `timeout_s` and every read
    has the default byte cap (`FetchSettings`). Every failure becomes an `ImageError` naming the
    uri, so a caller can turn it into an error row.
    """
    if settings is None:
        base = FetchSettings()
        settings = FetchSettings(
            connect_timeout_s=min(base.connect_timeout_s, timeout_s), read_timeout_s=timeout_s, deadline_s=timeout_s
        )
    try:
        return fetch(uri, settings)
    except FetchError as exc:
        raise ImageError(str(exc)) from None


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
        # (catch_warnings is process-global: fine for Ray map tasks, which run one at a time per worker,
        # and validation decodes in the task's own thread; only fetching uses threads.)
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            return Image.open(io.BytesIO(data), formats=DECODE_FORMATS)
        except Image.DecompressionBombError:
            with _pil_limit_lifted():
                return Image.open(io.BytesIO(data), formats=DECODE_FORMATS)


def _check_header(
    width: int, height: int, *, max_pixels: int, min_side: int, max_side: int | None, max_aspect_ratio: float | None
) -> None:
    pixels = width * height
    if pixels > max_pixels:
        raise ImageError(
            f"image too large: {width}x{height} = {pixels} pixels > max_pixels {max_pixels}"
        )
    if min(width, height) < min_side or min(width, height) < 1:
        raise ImageError(f"image too small: {width}x{height} < min side {min_side}")
    if max_aspect_ratio is not None and max(width, height) > max_aspect_ratio * min(width, height):
        ratio = max(width, height) / min(width, height)
        raise ImageError(
            f"image too elongated: {width}x{height} has aspect ratio {ratio:.4g}:1 > max_aspect_ratio {max_aspect_ratio:g}"
        )
    if max_side is not None and max(width, height) > max_side:
        raise ImageError(f"image too large: {width}x{height} has a side over max_side {max_side}")


def _reduction(width: int, height: int, budget: int) -> int:
    """The smallest integer factor k with ceil(w/k) * ceil(h/k) <= budget (1: no reduction)."""
    k = max(1, math.ceil(math.sqrt(width * height / budget)))
    while math.ceil(width / k) * math.ceil(height / k) > budget:
        k += 1
    return k


def _reduce(img: Image.Image, k: int) -> Image.Image:
    """`img` (loaded) reduced k times in memory of O(result): box-averaged in bands of rows (so a
    mode that reduce converts first, RGBA -> RGBa, is converted a band at a time), or by nearest
    neighbour for palette, bilevel and 16-bit modes."""
    width, height = img.size
    size = (math.ceil(width / k), math.ceil(height / k))
    if img.mode in _NEAREST_MODES:
        return img.resize(size, Image.Resampling.NEAREST)
    out = Image.new(img.mode, size)
    out.info = dict(img.info)  # transparency, exif ...
    band = k * max(1, (1 << 20) // (width * k))  # about a million input pixels (at least k rows) per band
    for top in range(0, height, band):
        bottom = min(height, top + band)
        out.paste(img.crop((0, top, width, bottom)).reduce(k), (0, top // k))
    return out


def _high_bit_to_l(img: Image.Image) -> Image.Image:
    """16/32-bit integer or float grey -> 8-bit L by scaling, not clipping.

    Values that fit 0..65535 are 16-bit samples (PNG/TIFF) and map by v/257, which keeps absolute
    levels (black stays black, 65535 -> 255); other ranges (signed 32-bit, floats) are stretched from
    their min..max, floats already in 0..1 map by v*255. One 4-byte working copy, updated in place.
    """
    arr = np.asarray(img)
    if arr.dtype.kind in "ui" and arr.size and arr.min() >= 0 and arr.max() <= 65535:
        out = arr.astype(np.uint32)
        out *= 255
        out += 32767
        out //= 65535
    else:
        out = np.nan_to_num(arr.astype(np.float32), copy=False)
        lo, hi = (float(out.min()), float(out.max())) if out.size else (0.0, 1.0)
        if arr.dtype.kind == "f" and lo >= 0.0 and hi <= 1.0 and img.mode == "F":
            out *= 255.0
        elif hi > lo:
            out -= lo
            out *= 255.0 / (hi - lo)
        else:
            out[...] = 0.0
        np.rint(out, out=out)
        np.clip(out, 0.0, 255.0, out=out)
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
        out = Image.new("RGB", rgba.size, (255, 255, 255))
        out.paste(rgba, (0, 0), rgba)  # = alpha_composite over opaque white, without two more RGBA copies
        return out
    if img.mode == "RGB":
        return img
    return img.convert("RGB")  # CMYK, YCbCr, L, 1, P, RGBX, ...


def decode_image_sized(
    data: bytes,
    *,
    max_pixels: int,
    min_side: int,
    max_side: int | None = None,
    max_aspect_ratio: float | None = None,
    decode_max_pixels: int | None = None,
) -> tuple[Image.Image, tuple[int, int]]:
    """`decode_image`, and the image's full displayed size (EXIF orientation applied).

    With `decode_max_pixels`, an image with more pixels comes back reduced by an integer factor to
    at most that many (see the module docstring); its full size is the second value.
    """
    if not data:
        raise ImageError("empty file")
    with warnings.catch_warnings():
        # PIL warns about what it skips in a damaged file (corrupt EXIF, odd tags); the row's error
        # or success says what counts, and a corpus would flood the worker logs.
        warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")
        return _decode_sized(data, max_pixels, min_side, max_side, max_aspect_ratio, decode_max_pixels)


def _decode_sized(
    data: bytes,
    max_pixels: int,
    min_side: int,
    max_side: int | None,
    max_aspect_ratio: float | None,
    decode_max_pixels: int | None,
) -> tuple[Image.Image, tuple[int, int]]:
    try:
        img = _open_header(data)
    except UnidentifiedImageError:
        raise ImageError("not an image (unrecognised format)") from None
    except Exception as exc:  # PIL raises many types on broken headers
        raise ImageError(f"truncated or corrupt image: {type(exc).__name__}: {exc}") from None
    width, height = img.size
    _check_header(
        width, height, max_pixels=max_pixels, min_side=min_side, max_side=max_side, max_aspect_ratio=max_aspect_ratio
    )
    k = _reduction(width, height, decode_max_pixels) if decode_max_pixels else 1
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            if k > 1:
                # JPEG: decode at 1/2, 1/4 or 1/8 scale (the largest not below w/k x h/k); a no-op elsewhere.
                img.draft(img.mode, (math.ceil(width / k), math.ceil(height / k)))
            img.load()
    except Exception as exc:
        raise ImageError(f"truncated or corrupt image: {type(exc).__name__}: {exc}") from None
    orientation = 1
    try:
        orientation = int(img.getexif().get(_ORIENTATION_TAG, 1))
    except Exception:
        pass  # a malformed EXIF block does not make the pixels bad; keep them unrotated
    if decode_max_pixels and img.size[0] * img.size[1] > decode_max_pixels:
        try:
            img = _reduce(img, _reduction(*img.size, decode_max_pixels))
        except Exception as exc:
            raise ImageError(f"unsupported image mode {img.mode}: {exc}") from None
    swapped = False
    if orientation in _EXIF_TRANSPOSE:
        try:
            img = img.transpose(_EXIF_TRANSPOSE[orientation])
            swapped = orientation >= 5
        except Exception:
            pass  # keep them unrotated
    try:
        rgb = _to_rgb(img)
    except Exception as exc:
        raise ImageError(f"unsupported image mode {img.mode}: {exc}") from None
    return rgb, ((height, width) if swapped else (width, height))


def decode_image(
    data: bytes,
    *,
    max_pixels: int,
    min_side: int,
    max_side: int | None = None,
    max_aspect_ratio: float | None = None,
    decode_max_pixels: int | None = None,
) -> Image.Image:
    """Decode and validate encoded image bytes into an RGB image with EXIF orientation applied.

    Size limits (`max_pixels`, `min_side`, and when given `max_aspect_ratio`, `max_side`) are
    checked from the header BEFORE pixels are decoded (a small file can declare a huge image), and
    the whole file is decoded so a truncated one fails here, not in a model actor. With
    `decode_max_pixels` a larger image comes back reduced (a model that resizes to 224 px anyway
    can pass it to decode a 40 MP JPEG at 1/8 scale); without it, at full size.
    """
    return decode_image_sized(
        data,
        max_pixels=max_pixels,
        min_side=min_side,
        max_side=max_side,
        max_aspect_ratio=max_aspect_ratio,
        decode_max_pixels=decode_max_pixels,
    )[0]


# ------------------------------------------------------------------------------------------ validation


def _settings(
    ingest: IngestConfig | None, max_pixels: int | None, min_side: int | None, timeout_s: float | None
) -> IngestConfig:
    """The ingest settings in force: `ingest` (or the defaults), with the explicit limits given."""
    base = ingest if ingest is not None else IngestConfig()
    updates = {
        name: value
        for name, value in (("max_pixels", max_pixels), ("min_side", min_side), ("http_timeout_s", timeout_s))
        if value is not None
    }
    return IngestConfig.model_validate({**base.model_dump(), **updates}) if updates else base


def _start(row: dict[str, Any]) -> dict[str, Any]:
    out = dict(row)
    out.setdefault("mask_bytes", None)
    out.update(image_id=None, width=None, height=None)
    if out.get("error"):
        out["image_bytes"] = None
    else:
        out["error"] = None
    return out


def _finish(out: dict[str, Any], got: dict[str, bytes | FetchError], s: IngestConfig) -> None:
    """Decode one row whose bytes are all here (given, or in `got` by "image"/"mask"); never raises."""
    try:
        data = got.get("image", out.get("image_bytes"))
        if isinstance(data, FetchError):
            raise ImageError(str(data))
        out["image_id"] = sha256_hex(data)
        _, (out["width"], out["height"]) = decode_image_sized(
            data,
            max_pixels=s.max_pixels,
            min_side=s.min_side,
            max_side=s.max_side,
            max_aspect_ratio=s.max_aspect_ratio,
            decode_max_pixels=s.decode_max_pixels,
        )
        out["image_bytes"] = data
        if "mask" in got:
            if isinstance(got["mask"], FetchError):
                raise ImageError(f"mask: {got['mask']}")
            out["mask_bytes"] = got["mask"]
    except ImageError as exc:
        out.update(image_bytes=None, width=None, height=None, error=str(exc))
    except Exception as exc:  # never let one row kill a batch
        out.update(
            image_bytes=None, width=None, height=None, error=f"unexpected error: {type(exc).__name__}: {exc}"
        )


def validate_rows(rows: list[dict[str, Any]], s: IngestConfig) -> list[dict[str, Any]]:
    """Source rows -> the same rows plus image_bytes, image_id, width, height, error (never raises).

    URIs (images and masks) are fetched by a pool of `fetch_threads` threads; rows are decoded here,
    one at a time, as their bytes arrive (those that came with bytes first, while the pool reads).
    A row arriving with `error` already set (e.g. a corrupt webdataset shard) keeps it untouched.
    Error rows drop `image_bytes` (garbage or a huge file is not worth shipping on) but keep
    `image_id` when bytes were read, so the same bad content is recognisable across sources.
    """
    outs = [_start(r) for r in rows]
    uris: list[str] = []
    owners: list[tuple[int, str]] = []
    waiting: dict[int, int] = {}
    for i, out in enumerate(outs):
        if out["error"]:
            continue
        if out.get("image_bytes") is None:
            uris.append(str(out.get("source_uri") or ""))
            owners.append((i, "image"))
        if out.get("mask_uri") and out.get("mask_bytes") is None:
            uris.append(str(out["mask_uri"]))
            owners.append((i, "mask"))
    for i, _ in owners:
        waiting[i] = waiting.get(i, 0) + 1
    got: dict[int, dict[str, bytes | FetchError]] = {i: {} for i in waiting}
    with FetchPool(uris, fetch_settings(s)) as pool:
        for i, out in enumerate(outs):
            if not out["error"] and i not in waiting:
                _finish(out, {}, s)
        for j, result in pool:
            i, kind = owners[j]
            got[i][kind] = result
            waiting[i] -= 1
            if not waiting[i]:
                _finish(outs[i], got.pop(i), s)
    return outs


def validate_record(
    row: dict[str, Any],
    *,
    ingest: IngestConfig | None = None,
    max_pixels: int | None = None,
    min_side: int | None = None,
    timeout_s: float | None = None,
) -> dict[str, Any]:
    """One source row -> the same row plus image_bytes, image_id, width, height, error (never raises).

    Settings come from `ingest` (default: `IngestConfig()`); `max_pixels`, `min_side` and
    `timeout_s` (the http read timeout), when given, override it.
    """
    return validate_rows([row], _settings(ingest, max_pixels, min_side, timeout_s))[0]


def validate_batch(
    batch: pa.Table,
    *,
    ingest: IngestConfig | None = None,
    max_pixels: int | None = None,
    min_side: int | None = None,
    timeout_s: float | None = None,
) -> pa.Table:
    """`validate_rows` over an Arrow batch, for `map_batches(batch_format="pyarrow")`.

    Pass the whole `IngestConfig` as `ingest` (fetch and decode settings); `max_pixels`, `min_side`,
    `timeout_s`, when given, override it. Every input row comes out, in order; other columns keep
    their types.
    """
    rows = validate_rows(batch.to_pylist(), _settings(ingest, max_pixels, min_side, timeout_s))
    fields = [f for f in batch.schema if f.name not in VALIDATED_FIELDS]
    fields += [pa.field(name, typ) for name, typ in VALIDATED_FIELDS.items()]
    columns = [pa.array([r.get(f.name) for r in rows], type=f.type) for f in fields]
    return pa.Table.from_arrays(columns, schema=pa.schema(fields))
