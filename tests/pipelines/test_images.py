"""Decoding and validation of single images (pure, no Ray)."""
from __future__ import annotations

import http.server
import io
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from bad_inputs import (
    EXPECTED_ERRORS,
    MUST_DECODE,
    ODDITY_SIZE,
    write_bad_inputs,
    write_good_images,
)
from PIL import Image

from fbmem.pipelines.images import (
    ImageError,
    decode_image,
    read_uri,
    sha256_hex,
    validate_batch,
    validate_record,
)

DEFAULT_MAX_PIXELS = 89_478_485
LIMITS = dict(max_pixels=DEFAULT_MAX_PIXELS, min_side=32)


@pytest.fixture(scope="module")
def bad(tmp_path_factory) -> dict[str, Path]:
    return write_bad_inputs(tmp_path_factory.mktemp("bad"))


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def test_sha256_hex_matches_hashlib_reference() -> None:
    assert sha256_hex(b"abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


@pytest.mark.parametrize("name", [n for n in EXPECTED_ERRORS if n != "missing"])
def test_each_bad_input_gives_its_specific_error(bad, name: str) -> None:
    with pytest.raises(ImageError) as info:
        decode_image(bad[name].read_bytes(), **LIMITS)
    assert EXPECTED_ERRORS[name] in str(info.value)


def test_missing_path_names_the_uri(bad) -> None:
    with pytest.raises(ImageError, match="file not found") as info:
        read_uri(str(bad["missing"]), timeout_s=1)
    assert str(bad["missing"]) in str(info.value)


def test_read_uri_local_path_and_file_url(tmp_path: Path) -> None:
    p = tmp_path / "x.bin"
    p.write_bytes(b"\x00\x01payload")
    assert read_uri(str(p), timeout_s=1) == b"\x00\x01payload"
    assert read_uri(p.as_uri(), timeout_s=1) == b"\x00\x01payload"
    with pytest.raises(ImageError, match="is a directory"):
        read_uri(str(tmp_path), timeout_s=1)
    with pytest.raises(ImageError, match="empty uri"):
        read_uri("", timeout_s=1)


def test_read_uri_http_ok_and_404_on_loopback(tmp_path: Path) -> None:
    (tmp_path / "img.png").write_bytes(b"PNGDATA")

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **k):
            super().__init__(*a, directory=str(tmp_path), **k)

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        assert read_uri(f"{base}/img.png", timeout_s=5) == b"PNGDATA"
        with pytest.raises(ImageError, match="HTTP 404") as info:
            read_uri(f"{base}/nope.png", timeout_s=5)
        assert f"{base}/nope.png" in str(info.value)
    finally:
        server.shutdown()
        server.server_close()


def test_pixel_limit_is_checked_from_header_and_pil_limit_untouched(bad) -> None:
    before = Image.MAX_IMAGE_PIXELS
    for name in ("huge", "bomb"):
        with pytest.raises(ImageError, match="image too large"):
            decode_image(bad[name].read_bytes(), **LIMITS)
    assert Image.MAX_IMAGE_PIXELS == before


def test_max_pixels_above_pil_limit_is_honoured_and_pil_limit_restored(monkeypatch) -> None:
    # Shrink PIL's own limit so a 64x48 image is over PIL's hard limit (2x) without a huge file.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    data = _png(Image.new("RGB", (64, 48), (10, 20, 30)))
    img = decode_image(data, max_pixels=10_000, min_side=8)
    assert img.size == (64, 48)
    assert Image.MAX_IMAGE_PIXELS == 1000
    with pytest.raises(ImageError, match=r"image too large: 64x48 = 3072 pixels > max_pixels 3071"):
        decode_image(data, max_pixels=3071, min_side=8)
    assert Image.MAX_IMAGE_PIXELS == 1000


def test_size_limits_boundaries() -> None:
    data = _png(Image.new("RGB", (32, 40)))
    assert decode_image(data, max_pixels=32 * 40, min_side=32).size == (32, 40)
    with pytest.raises(ImageError, match="image too small: 32x40 < min side 33"):
        decode_image(data, max_pixels=10**6, min_side=33)
    with pytest.raises(ImageError, match="image too large"):
        decode_image(data, max_pixels=32 * 40 - 1, min_side=1)


def test_truncated_png_fails_on_full_decode() -> None:
    rng = np.random.default_rng(0)
    data = _png(Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)))
    with pytest.raises(ImageError, match="truncated or corrupt image"):
        decode_image(data[: len(data) * 2 // 3], **LIMITS)


def test_cmyk_jpeg_decodes_to_rgb(bad) -> None:
    img = decode_image(bad["cmyk"].read_bytes(), **LIMITS)
    arr = np.asarray(img).astype(int)
    w, h = ODDITY_SIZE
    assert img.mode == "RGB" and img.size == (w, h)
    cyan, white = arr[h // 2, w // 4], arr[h // 2, 3 * w // 4]
    assert cyan[0] < 30 and cyan[1] > 225 and cyan[2] > 225
    assert (white > 225).all()


def test_16bit_gradient_scales_to_full_8bit_range_monotonically(bad) -> None:
    img = decode_image(bad["gray16"].read_bytes(), **LIMITS)
    arr = np.asarray(img).astype(int)
    assert img.mode == "RGB"
    row = arr[0, :, 0]
    assert (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all()
    assert row[0] == 0 and row[-1] == 255
    assert (np.diff(row) >= 0).all()
    assert len(np.unique(row)) > 50  # a real gradient, not clipped to a few values
    mid = row[len(row) // 2]
    assert 120 <= mid <= 136


def test_palette_transparency_composited_on_white(bad) -> None:
    img = decode_image(bad["palette_alpha"].read_bytes(), **LIMITS)
    arr = np.asarray(img)
    w, h = ODDITY_SIZE
    assert (arr[:, : w // 2] == 255).all()  # transparent (palette colour black) -> white
    assert (arr[:, w // 2 :] == [255, 0, 0]).all()


@pytest.mark.parametrize("name", MUST_DECODE)
def test_valid_oddities_decode(bad, name: str) -> None:
    img = decode_image(bad[name].read_bytes(), **LIMITS)
    assert img.mode == "RGB" and img.size == ODDITY_SIZE


def test_rgba_and_la_alpha_blend_over_white() -> None:
    rgba = np.zeros((40, 40, 4), dtype=np.uint8)
    rgba[..., 3] = 0
    rgba[:, 20:, 3] = 255  # opaque black right half
    rgba[:20, :20, 3] = 128  # half-transparent black top-left
    arr = np.asarray(decode_image(_png(Image.fromarray(rgba, mode="RGBA")), max_pixels=10**6, min_side=8)).astype(int)
    assert (arr[30, 5] == 255).all()
    assert (arr[30, 30] == 0).all()
    assert abs(int(arr[5, 5, 0]) - 127) <= 2
    la = np.stack([np.full((40, 40), 50, np.uint8), np.zeros((40, 40), np.uint8)], axis=-1)
    arr = np.asarray(decode_image(_png(Image.fromarray(la, mode="LA")), max_pixels=10**6, min_side=8))
    assert (arr == 255).all()


def test_exif_orientation_is_applied() -> None:
    arr = np.zeros((32, 64, 3), dtype=np.uint8)
    arr[:, :32] = (255, 0, 0)  # stored: red left, blue right
    arr[:, 32:] = (0, 0, 255)
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=95, exif=exif.tobytes())
    out = np.asarray(decode_image(buf.getvalue(), max_pixels=10**6, min_side=8)).astype(int)
    assert out.shape == (64, 32, 3)  # width and height swapped
    top, bottom = out[8, 16], out[56, 16]
    assert top[0] > 200 and top[2] < 60  # the stored left column is now on top
    assert bottom[2] > 200 and bottom[0] < 60


def test_validate_record_reads_uri_sets_id_size_and_mask(tmp_path: Path) -> None:
    paths = write_good_images(tmp_path, 1, seed=3)
    img_path = paths[0]
    mask_path = Path(f"{img_path.with_suffix('')}.mask.png")
    row = {"source_uri": str(img_path), "image_bytes": None, "mask_uri": str(mask_path), "caption": "c"}
    out = validate_record(row, max_pixels=10**6, min_side=32, timeout_s=1)
    assert out["error"] is None
    assert out["image_bytes"] == img_path.read_bytes()
    assert out["image_id"] == sha256_hex(img_path.read_bytes())
    assert (out["width"], out["height"]) == (64, 64)
    assert out["mask_bytes"] == mask_path.read_bytes()
    assert out["caption"] == "c"


def test_validate_record_missing_mask_is_an_error_naming_the_mask(tmp_path: Path) -> None:
    img_path = write_good_images(tmp_path, 1, seed=4)[0]
    missing = tmp_path / "nope.mask.png"
    out = validate_record(
        {"source_uri": str(img_path), "image_bytes": None, "mask_uri": str(missing)},
        max_pixels=10**6, min_side=32, timeout_s=1,
    )
    assert out["error"].startswith("mask: ") and str(missing) in out["error"]
    assert out["image_bytes"] is None and out["width"] is None


def test_validate_record_keeps_an_error_set_by_the_source() -> None:
    out = validate_record(
        {"source_uri": "s.tar#k", "image_bytes": b"junk", "error": "corrupt shard"},
        max_pixels=10**6, min_side=32, timeout_s=1,
    )
    assert out["error"] == "corrupt shard" and out["image_bytes"] is None


def test_validate_batch_one_error_row_per_bad_input_keeps_good_rows(bad, tmp_path: Path) -> None:
    good = write_good_images(tmp_path, 3, seed=5)
    uris = [str(p) for p in good] + [str(p) for p in bad.values()]
    table = pa.table(
        {
            "source_uri": uris,
            "image_bytes": pa.array([None] * len(uris), pa.binary()),
            "extra": list(range(len(uris))),
        }
    )
    out = validate_batch(table, max_pixels=DEFAULT_MAX_PIXELS, min_side=32, timeout_s=1)
    assert out.num_rows == len(uris)
    assert out.column("source_uri").to_pylist() == uris
    assert out.column("extra").to_pylist() == list(range(len(uris)))  # other columns pass through
    assert out.schema.field("width").type == pa.int32()
    assert out.schema.field("image_id").type == pa.string()
    errors = dict(zip(uris, out.column("error").to_pylist()))
    for name, path in bad.items():
        if name in EXPECTED_ERRORS:
            assert EXPECTED_ERRORS[name] in errors[str(path)], name
        else:
            assert errors[str(path)] is None, (name, errors[str(path)])
    for p in good:
        assert errors[str(p)] is None
    n_err = sum(e is not None for e in errors.values())
    assert n_err == len(EXPECTED_ERRORS)


def test_read_uri_unknown_scheme_is_an_image_error() -> None:
    with pytest.raises(ImageError, match="cannot read nosuchscheme://host/x.jpg"):
        read_uri("nosuchscheme://host/x.jpg", timeout_s=1)
