"""Property-based fuzzing of validation's decoder (hypothesis): random bytes and mutated real images.

The property, for every input: `validate_batch` returns exactly one row, which is either a good row
(width and height within the limits, the bytes and their id kept) or an error row with a reason
that `decode_image_sized` named (an `ImageError`, never "unexpected error: ..." from an exception
that escaped it); never an exception, never a hang (hypothesis' per-input deadline, and a timeout
on the whole test). The seeds cover the formats and modes of a corpus, small so each input decodes
in milliseconds; mutations are bit flips, byte overwrites, truncations, insertions, deletions,
size-field edits near the header and repeated spans. Each test prints how many inputs it tried.
"""
from __future__ import annotations

import io
import sys
import time

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from fbmem.jobs.config import IngestConfig
from fbmem.pipelines.images import sha256_hex, validate_batch

# Small limits so that header edits that declare a big image are judged, not decoded for long; a
# tiny decode budget in half the inputs so the reduced paths (JPEG draft, band reduce) are fuzzed too.
CONFIGS = [
    IngestConfig(max_pixels=1 << 22, min_side=1, max_side=4096, max_aspect_ratio=64, decode_max_pixels=budget)
    for budget in (1 << 20, 300)
]
FUZZ_SETTINGS = settings(
    max_examples=4000,
    deadline=5000,  # ms per input: a hang or a pathological decode fails the test
    database=None,  # nothing written into the source tree
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _structured(w: int, h: int, channels: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    arr = np.stack([(xx * (c + 3) + yy * (7 - c)) % 256 for c in range(channels)], axis=-1).astype(np.uint8)
    arr[h // 4 : h // 2, w // 3 : w // 2] = rng.integers(0, 256, channels, dtype=np.uint8)
    return arr


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _seeds() -> dict[str, bytes]:
    w, h = 40, 36
    rgb = Image.fromarray(_structured(w, h, 3, 0))
    rgba = Image.fromarray(_structured(w, h, 4, 1), mode="RGBA")
    grey16 = Image.fromarray((_structured(w, h, 1, 2)[..., 0].astype(np.uint16) * 257))
    pal = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    exif = rgb.getexif()
    exif[0x0112] = 6
    cmyk = Image.fromarray(_structured(w, h, 4, 3), mode="CMYK")
    frames = [rgb.convert("P"), Image.fromarray(_structured(w, h, 3, 4)).convert("P")]
    floats = Image.fromarray(_structured(w, h, 1, 5)[..., 0].astype(np.float32) / 7.0)
    gif = io.BytesIO()
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    return {
        "png_rgb": _save(rgb, "PNG"),
        "png_rgba": _save(rgba, "PNG"),
        "png_palette_trns": _save(pal, "PNG", transparency=3),
        "png_grey16": _save(grey16, "PNG"),
        "png_interlaced": _save(rgb, "PNG", interlace=1),
        "jpeg": _save(rgb, "JPEG", quality=85),
        "jpeg_progressive_exif": _save(rgb, "JPEG", quality=85, progressive=True, exif=exif.tobytes()),
        "jpeg_cmyk": _save(cmyk, "JPEG", quality=85),
        "webp_lossy": _save(rgb, "WEBP", quality=80),
        "webp_lossless_alpha": _save(rgba, "WEBP", lossless=True),
        "gif_animated": gif.getvalue(),
        "tiff_raw": _save(rgb, "TIFF"),
        "tiff_lzw": _save(rgba, "TIFF", compression="tiff_lzw"),
        "tiff_float": _save(floats, "TIFF"),
        "bmp": _save(rgb, "BMP"),
    }


SEEDS = _seeds()
MAGICS = [b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0", b"RIFF\x00\x10\x00\x00WEBPVP8 ", b"GIF89a", b"II*\x00", b"MM\x00*",
          b"BM", b"\x00\x00\x01\x00"]
SIZE_FIELDS = [b"\xff\xff\xff\xff", b"\x00\x00\x00\x00", b"\x7f\xff\xff\xff", b"\x00\x00\x10\x00", b"\x00\x01", b"\xff\xff"]


@st.composite
def mutated_images(draw) -> bytes:
    data = bytearray(SEEDS[draw(st.sampled_from(sorted(SEEDS)))])
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "byte", "truncate", "insert", "delete", "size_field", "repeat"]))
        if not data:
            break
        pos = draw(st.integers(0, len(data) - 1))
        if op == "flip":
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "byte":
            data[pos] = draw(st.integers(0, 255))
        elif op == "truncate":
            del data[pos:]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=32))
        elif op == "delete":
            del data[pos : pos + draw(st.integers(1, 64))]
        elif op == "size_field":  # widths, heights, lengths and offsets live near the start
            at = draw(st.integers(0, min(len(data) - 1, 200)))
            field = draw(st.sampled_from(SIZE_FIELDS))
            data[at : at + len(field)] = field
        else:
            span = bytes(data[pos : pos + draw(st.integers(1, 256))])
            data[pos:pos] = span * draw(st.integers(1, 8))
    return bytes(data)


random_bytes = st.one_of(
    st.binary(max_size=4096),
    st.builds(lambda magic, rest: magic + rest, st.sampled_from(MAGICS), st.binary(max_size=4096)),
)


def _check_one(data: bytes, cfg: IngestConfig) -> bool:
    """The property for one input; returns whether it made a good row."""
    table = pa.table({"source_uri": ["fuzz://input"], "image_bytes": pa.array([data], pa.binary())})
    out = validate_batch(table, ingest=cfg)
    assert out.num_rows == 1
    row = out.to_pylist()[0]
    if row["error"] is None:
        w, h = row["width"], row["height"]
        assert w >= cfg.min_side and h >= cfg.min_side and w * h <= cfg.max_pixels
        assert max(w, h) <= cfg.max_side and max(w, h) <= cfg.max_aspect_ratio * min(w, h)
        assert row["image_bytes"] == data and row["image_id"] == sha256_hex(data)
        return True
    assert isinstance(row["error"], str) and row["error"]
    assert not row["error"].startswith("unexpected error"), row["error"]
    assert row["image_bytes"] is None and row["width"] is None and row["height"] is None
    return False


def _report(name: str, counts: dict[str, int], t0: float) -> None:
    n = counts["good"] + counts["error"]
    print(f"\n{name}: {n} inputs in {time.monotonic() - t0:.1f} s "
          f"({counts['good']} good rows, {counts['error']} error rows)", file=sys.stderr)


def test_seeds_are_good_rows() -> None:
    for name, data in SEEDS.items():
        for cfg in CONFIGS:
            assert _check_one(data, cfg), name


@pytest.mark.timeout(300)
def test_fuzz_mutated_images_give_one_row_each() -> None:
    counts = {"good": 0, "error": 0}

    @FUZZ_SETTINGS
    @given(data=mutated_images(), cfg=st.sampled_from(CONFIGS))
    def run(data: bytes, cfg: IngestConfig) -> None:
        counts["good" if _check_one(data, cfg) else "error"] += 1

    t0 = time.monotonic()
    run()
    _report("mutated images", counts, t0)
    assert counts["good"] > 0 and counts["error"] > 0  # the mutations reached both outcomes


@pytest.mark.timeout(300)
def test_fuzz_random_bytes_give_one_error_row_each() -> None:
    counts = {"good": 0, "error": 0}

    @settings(FUZZ_SETTINGS, max_examples=2000)
    @given(data=random_bytes, cfg=st.sampled_from(CONFIGS))
    def run(data: bytes, cfg: IngestConfig) -> None:
        counts["good" if _check_one(data, cfg) else "error"] += 1

    t0 = time.monotonic()
    run()
    _report("random bytes", counts, t0)
    assert counts["error"] > 0
