"""Writes the awkward inputs that ingestion must survive, into a directory of the caller's choice.

Two kinds, kept apart on purpose:
- ERRORS: inputs that must become one error row each (truncated, empty, text-as-jpg, 1x1, over the
  pixel limit, over PIL's own hard limit, a missing path). `EXPECTED_ERRORS` maps each to a substring
  of its error message.
- MUST_DECODE: legitimate images in unusual encodings (CMYK JPEG, 16-bit grey PNG, palette PNG with a
  transparent index) that must decode to sensible RGB — rejecting them would silently drop data.

The over-limit images cost almost nothing: they are 1-bit PNGs of an all-black picture written with
streaming zlib, so a 12000x12000 header (144 M pixels > PIL's and our default 89.5 M) takes ~20 KB on
disk and is never decoded.
"""
from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

# name -> substring of the error message that validation must give
EXPECTED_ERRORS: dict[str, str] = {
    "truncated": "truncated or corrupt image",
    "empty": "empty file",
    "text": "not an image (unrecognised format)",
    "tiny": "image too small: 1x1 < min side",
    "huge": "image too large: 12000x12000 = 144000000 pixels > max_pixels",
    "bomb": "image too large: 20000x20000 = 400000000 pixels > max_pixels",
    "missing": "file not found",
}
MUST_DECODE: tuple[str, ...] = ("cmyk", "gray16", "palette_alpha")

# sizes of the valid oddities (width, height)
ODDITY_SIZE = (64, 48)
# palette image: the left half uses the transparent index, the right half opaque red
PALETTE_TRANSPARENT_INDEX = 0


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def write_black_bilevel_png(path: Path, width: int, height: int) -> Path:
    """A valid 1-bit all-black PNG of any size, streamed so a huge header costs kilobytes."""
    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte 0 + packed zero bits
    comp = zlib.compressobj(9)
    idat = bytearray()
    for _ in range(height):
        idat += comp.compress(row)
    idat += comp.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", bytes(idat)) + _png_chunk(b"IEND", b"")
    )
    return path


def _structured_rgb(rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    """A gradient background with a few random rectangles: distinct, compressible, not noise."""
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    base = rng.integers(0, 256, size=3)
    img = np.stack(
        [(base[c] + (xx if c == 0 else yy if c == 1 else xx + yy) * rng.integers(1, 4)) % 256 for c in range(3)],
        axis=-1,
    ).astype(np.uint8)
    for _ in range(3):
        x0, y0 = rng.integers(0, w - 8), rng.integers(0, h - 8)
        x1, y1 = x0 + rng.integers(6, w // 2), y0 + rng.integers(6, h // 2)
        img[y0:y1, x0:x1] = rng.integers(0, 256, size=3)
    return img


def write_bad_inputs(directory: str | Path) -> dict[str, Path]:
    """Write every awkward input into `directory`; returns name -> path ('missing' is not created)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    rng = np.random.default_rng(1234)

    # errors -------------------------------------------------------------------------------------
    buf = io.BytesIO()
    Image.fromarray(_structured_rgb(rng, (96, 96))).save(buf, "JPEG", quality=90)
    full = buf.getvalue()
    paths["truncated"] = d / "truncated.jpg"
    paths["truncated"].write_bytes(full[: len(full) // 2])  # header intact, scan data cut

    paths["empty"] = d / "empty.jpg"
    paths["empty"].write_bytes(b"")

    paths["text"] = d / "text.jpg"
    paths["text"].write_text("this is a caption, not a JPEG\n" * 4)

    paths["tiny"] = d / "tiny.png"
    Image.new("RGB", (1, 1), (200, 10, 10)).save(paths["tiny"])

    # over our default max_pixels (89,478,485) but inside PIL's hard limit (2x): PIL only warns
    paths["huge"] = write_black_bilevel_png(d / "huge.png", 12000, 12000)
    # over PIL's own hard limit: PIL raises DecompressionBombError at open
    paths["bomb"] = write_black_bilevel_png(d / "bomb.png", 20000, 20000)

    paths["missing"] = d / "missing.jpg"  # never written

    # must decode --------------------------------------------------------------------------------
    w, h = ODDITY_SIZE
    cmyk = np.zeros((h, w, 4), dtype=np.uint8)
    cmyk[:, : w // 2, 0] = 255  # left half pure cyan, right half white (no ink)
    paths["cmyk"] = d / "cmyk.jpg"
    Image.fromarray(cmyk, mode="CMYK").save(paths["cmyk"], "JPEG", quality=95)

    gradient = np.tile(np.linspace(0, 65535, w).round().astype(np.uint16), (h, 1))
    paths["gray16"] = d / "gray16.png"
    Image.fromarray(gradient).save(paths["gray16"], "PNG")

    pal = np.full((h, w), 1, dtype=np.uint8)
    pal[:, : w // 2] = PALETTE_TRANSPARENT_INDEX
    p_img = Image.fromarray(pal, mode="P")
    p_img.putpalette([0, 0, 0, 255, 0, 0] + [0, 0, 0] * 254)  # index 0 black (transparent), 1 red
    paths["palette_alpha"] = d / "palette_alpha.png"
    p_img.save(paths["palette_alpha"], "PNG", transparency=PALETTE_TRANSPARENT_INDEX)
    return paths


def write_good_images(directory: str | Path, n: int, seed: int) -> list[Path]:
    """n distinct 64x64 structured RGB images (PNG and JPEG alternately).

    Even indices get a `NAME.txt` caption, every third a `NAME.mask.png` foreground mask (L, 255 on a
    centred square) — the sidecars a folder source must attach, not list as images.
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    out: list[Path] = []
    for i in range(n):
        arr = _structured_rgb(rng, (64, 64))
        ext = "png" if i % 2 == 0 else "jpg"
        path = d / f"good_{seed}_{i:03d}.{ext}"
        Image.fromarray(arr).save(path, quality=95) if ext == "jpg" else Image.fromarray(arr).save(path)
        stem = path.with_suffix("")
        if i % 2 == 0:
            Path(f"{stem}.txt").write_text(f"caption {seed} {i}\n")
        if i % 3 == 0:
            mask = np.zeros((64, 64), dtype=np.uint8)
            mask[16:48, 16:48] = 255
            Image.fromarray(mask, mode="L").save(f"{stem}.mask.png")
        out.append(path)
    return out
