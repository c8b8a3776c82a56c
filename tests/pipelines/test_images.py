"""Decoding and validation of single images (pure, no Ray)."""
from __future__ import annotations

import http.server
import io
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from bad_inputs import (
    EXPECTED_ERRORS,
    MUST_DECODE,
    ODDITY_SIZE,
    BadServer,
    SilentServer,
    write_bad_inputs,
    write_black_png,
    write_good_images,
)
from PIL import Image, ImageFile

from fbmem.jobs.config import IngestConfig
from fbmem.pipelines.images import (
    ImageError,
    decode_image,
    decode_image_sized,
    read_uri,
    sha256_hex,
    validate_batch,
    validate_record,
)

DEFAULT_MAX_PIXELS = 89_478_485
LIMITS = dict(max_pixels=DEFAULT_MAX_PIXELS, min_side=32, max_side=16384, max_aspect_ratio=20)  # IngestConfig defaults


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


# ------------------------------------------------------------------------- memory-safe decode limits


@pytest.fixture(scope="module")
def rgb_strip(tmp_path_factory) -> bytes:
    """The issue's strip: 400000 x 32 8-bit RGB (12.8 M pixels, under max_pixels), all black."""
    return write_black_png(tmp_path_factory.mktemp("strip") / "strip.png", 400000, 32, "RGB").read_bytes()


def test_400000x32_strip_is_rejected_from_the_header_without_decoding(rgb_strip, monkeypatch) -> None:
    def no_decode(self):
        raise AssertionError("pixels decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decode)
    out = validate_record({"source_uri": "s.png", "image_bytes": rgb_strip}, ingest=IngestConfig())
    assert out["error"] == "image too elongated: 400000x32 has aspect ratio 1.25e+04:1 > max_aspect_ratio 20"
    assert out["image_bytes"] is None and out["image_id"] == sha256_hex(rgb_strip)


def test_strip_allowed_by_settings_is_decoded_reduced_with_its_full_size(rgb_strip) -> None:
    cfg = IngestConfig(max_aspect_ratio=20000, max_side=400000, decode_max_pixels=1_000_000)
    img, size = decode_image_sized(
        rgb_strip, max_pixels=cfg.max_pixels, min_side=cfg.min_side, max_side=cfg.max_side,
        max_aspect_ratio=cfg.max_aspect_ratio, decode_max_pixels=cfg.decode_max_pixels,
    )
    assert size == (400000, 32)
    assert img.mode == "RGB" and img.size == (100000, 8)  # reduced 4x: 800000 pixels <= 1 M
    assert not np.asarray(img).any()
    out = validate_record({"source_uri": "s.png", "image_bytes": rgb_strip}, ingest=cfg)
    assert out["error"] is None and (out["width"], out["height"]) == (400000, 32)
    with pytest.raises(ImageError, match=r"image too large: 400000x32 has a side over max_side 399999"):
        decode_image(rgb_strip, max_pixels=cfg.max_pixels, min_side=32, max_side=399999)


def test_aspect_ratio_and_max_side_boundaries() -> None:
    ok = _png(Image.new("RGB", (640, 32)))  # exactly 20:1
    assert decode_image(ok, max_pixels=10**6, min_side=32, max_aspect_ratio=20).size == (640, 32)
    tall = _png(Image.new("RGB", (32, 641)))
    with pytest.raises(ImageError, match=r"image too elongated: 32x641 has aspect ratio 20.03:1 > max_aspect_ratio 20"):
        decode_image(tall, max_pixels=10**6, min_side=32, max_aspect_ratio=20)
    assert decode_image(tall, max_pixels=10**6, min_side=32).size == (32, 641)  # no limit given: none applied
    assert decode_image(ok, max_pixels=10**6, min_side=32, max_side=640).size == (640, 32)
    with pytest.raises(ImageError, match=r"image too large: 640x32 has a side over max_side 639"):
        decode_image(ok, max_pixels=10**6, min_side=32, max_side=639)


def _jpeg(arr: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=90, **kw)
    return buf.getvalue()


def test_large_jpeg_is_decoded_at_reduced_scale_by_draft(monkeypatch) -> None:
    from fbmem.pipelines import images

    arr = np.zeros((3000, 4000, 3), np.uint8)
    arr[:, 2000:] = (0, 0, 255)  # blue right half
    data = _jpeg(arr)

    def no_reduce(img, k):
        raise AssertionError("decoded at full size, then reduced")

    monkeypatch.setattr(images, "_reduce", no_reduce)
    img, size = decode_image_sized(data, max_pixels=10**8, min_side=32, decode_max_pixels=1_000_000)
    assert size == (4000, 3000)
    assert img.size == (1000, 750)  # libjpeg's 1/4 scale: the 12 MP never existed in memory
    px = np.asarray(img).astype(int)
    assert px[375, 100].max() < 30 and px[375, 900, 2] > 220


def test_reduced_decode_reports_the_exif_oriented_full_size() -> None:
    arr = np.zeros((1000, 2000, 3), np.uint8)
    exif = Image.new("RGB", (1, 1)).getexif()
    exif[0x0112] = 6  # rotate 90 CW to display
    data = _jpeg(arr, exif=exif.tobytes())
    img, size = decode_image_sized(data, max_pixels=10**8, min_side=32, decode_max_pixels=100_000)
    assert size == (1000, 2000)
    assert img.size[0] < img.size[1] and img.size[0] * img.size[1] <= 100_000


def _rgba_half_red(w: int, h: int) -> Image.Image:
    rgba = np.zeros((h, w, 4), np.uint8)
    rgba[:, w // 2 :] = (255, 0, 0, 255)  # left half transparent, right half opaque red
    return Image.fromarray(rgba, mode="RGBA")


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "1", "L", "I;16", "I", "F", "CMYK"])
def test_over_budget_images_of_every_mode_reduce_to_sensible_rgb(mode: str) -> None:
    w, h = 400, 200
    if mode == "P":
        img = Image.fromarray(np.where(np.arange(w) < w // 2, 0, 1).astype(np.uint8)[None].repeat(h, 0), mode="P")
        img.putpalette([0, 0, 0, 255, 0, 0] + [0, 0, 0] * 254)
        buf = io.BytesIO()
        img.save(buf, "PNG", transparency=0)
        data, expect_left, expect_right = buf.getvalue(), (255, 255, 255), (255, 0, 0)
    elif mode in ("RGBA", "LA"):
        src = _rgba_half_red(w, h)
        src = src if mode == "RGBA" else src.convert(mode)
        data = _png(src)
        right = tuple(np.asarray(src.convert("RGBA").convert("RGB"))[0, -1])
        expect_left, expect_right = (255, 255, 255), right
    elif mode in ("I;16", "I", "F", "1", "L"):
        lo, hi = {"I;16": (0, 65535), "I": (-70000, 70000), "F": (-1.5, 3.5), "1": (0, 1), "L": (0, 255)}[mode]
        arr = np.full((h, w), lo, dtype=np.float64)
        arr[:, w // 2 :] = hi
        typed = {"I;16": np.uint16, "I": np.int32, "F": np.float32, "1": bool, "L": np.uint8}[mode]
        src = Image.fromarray(arr.astype(typed))
        buf = io.BytesIO()
        src.save(buf, "PNG" if mode in ("I;16", "1", "L") else "TIFF")
        data, expect_left, expect_right = buf.getvalue(), (0, 0, 0), (255, 255, 255)
    else:  # CMYK: cyan | white
        cmyk = np.zeros((h, w, 4), np.uint8)
        cmyk[:, : w // 2, 0] = 255
        data = _jpeg_cmyk(cmyk)
        expect_left, expect_right = (0, 255, 255), (255, 255, 255)
    img, size = decode_image_sized(data, max_pixels=10**6, min_side=8, decode_max_pixels=2000)
    assert size == (w, h)
    assert img.mode == "RGB" and img.size[0] * img.size[1] <= 2000
    px = np.asarray(img).astype(int)
    assert np.abs(px[img.size[1] // 2, 1] - expect_left).max() <= 40, (mode, px[img.size[1] // 2, 1])
    assert np.abs(px[img.size[1] // 2, -2] - expect_right).max() <= 40, (mode, px[img.size[1] // 2, -2])


def _jpeg_cmyk(cmyk: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(cmyk, mode="CMYK").save(buf, "JPEG", quality=95)
    return buf.getvalue()


def test_formats_outside_the_corpus_formats_are_not_images() -> None:
    buf = io.BytesIO()
    Image.new("RGB", (40, 40)).save(buf, "PCX")  # PIL reads PCX, a corpus does not hold it
    with pytest.raises(ImageError, match=r"not an image \(unrecognised format\)"):
        decode_image(buf.getvalue(), max_pixels=10**6, min_side=8)


# --------------------------------------------------------------------------- fetching in validation


def test_slow_drip_and_silent_servers_cost_one_deadline_and_the_good_rows_come_through(tmp_path: Path) -> None:
    good_local = write_good_images(tmp_path, 2, seed=9)
    files = {p.name: p.read_bytes() for p in good_local}
    cfg = IngestConfig(fetch_deadline_s=1.5, http_timeout_s=30, fetch_threads=8, fetch_backoff_s=0.01)
    with BadServer(files, drip_s=0.2) as server, SilentServer() as silent:
        a, b = (p.name for p in good_local)
        uris = [
            server.url(f"/file/{a}"),  # good, over http
            server.url(f"/drip/{a}"),  # one byte every 0.2 s: done in minutes
            silent.url("/1.png"),  # accepts, never answers
            silent.url("/2.png"),
            str(good_local[1]),  # good, local
            server.url("/status/503/v/1/" + b),  # a transient 503, then good
            server.url("/gone.png"),  # 404
        ]
        table = pa.table({"source_uri": uris, "image_bytes": pa.array([None] * len(uris), pa.binary())})
        t0 = time.monotonic()
        out = validate_batch(table, ingest=cfg)
        elapsed = time.monotonic() - t0
    rows = out.to_pylist()
    assert [r["source_uri"] for r in rows] == uris
    good = [rows[i] for i in (0, 4, 5)]
    assert all(r["error"] is None and (r["width"], r["height"]) == (64, 64) for r in good), good
    assert rows[0]["image_bytes"] == files[a] and rows[5]["image_bytes"] == files[b]
    for i in (1, 2, 3):
        assert rows[i]["error"].startswith(f"cannot read {uris[i]}: deadline exceeded"), rows[i]["error"]
        assert rows[i]["image_bytes"] is None
    assert rows[6]["error"] == f"cannot read {uris[6]}: HTTP 404 Not Found"
    assert elapsed < 1.5 + 2.0  # concurrently: one deadline, not three (plus slack for a busy machine)


def test_mask_uri_fetched_with_its_image_and_a_failed_mask_names_the_mask(tmp_path: Path) -> None:
    img = write_good_images(tmp_path, 1, seed=11)[0]
    mask = Path(f"{img.with_suffix('')}.mask.png")
    with BadServer({"m.png": mask.read_bytes()}) as server:
        rows = [
            {"source_uri": str(img), "image_bytes": None, "mask_uri": server.url("/file/m.png")},
            {"source_uri": str(img), "image_bytes": None, "mask_uri": server.url("/nope.png")},
        ]
        out = validate_batch(pa.Table.from_pylist(rows), ingest=IngestConfig()).to_pylist()
    assert out[0]["error"] is None and out[0]["mask_bytes"] == mask.read_bytes()
    assert out[1]["error"] == f"mask: cannot read {server.url('/nope.png')}: HTTP 404 Not Found"


def test_byte_cap_makes_an_error_row(tmp_path: Path) -> None:
    p = write_good_images(tmp_path, 1, seed=12)[0]
    size = p.stat().st_size
    out = validate_record({"source_uri": str(p), "image_bytes": None}, ingest=IngestConfig(fetch_max_bytes=size - 1))
    assert out["error"] == f"cannot read {p}: too large: {size} bytes > max_bytes {size - 1}"


def test_validate_batch_in_ray_with_the_ingest_config(ray_local, tmp_path: Path) -> None:
    """The Ray Data path: the whole IngestConfig travels in fn_kwargs; a silent server costs one deadline."""
    good = write_good_images(tmp_path, 4, seed=13)
    cfg = IngestConfig(fetch_deadline_s=1.0, fetch_threads=4)
    with SilentServer() as silent:
        uris = [str(p) for p in good] + [silent.url("/a.png"), silent.url("/b.png")]
        ds = ray_local.data.from_items([{"source_uri": u} for u in uris])
        out = ds.map_batches(validate_batch, fn_kwargs=dict(ingest=cfg), batch_format="pyarrow", batch_size=8)
        rows = {r["source_uri"]: r for r in out.take_all()}
    assert all(rows[str(p)]["error"] is None and rows[str(p)]["width"] == 64 for p in good)
    assert all("deadline exceeded" in rows[u]["error"] for u in uris[-2:])


def test_truncation_is_caught_in_a_reduced_decode_too() -> None:
    rng = np.random.default_rng(5)
    data = _jpeg(rng.integers(0, 256, (1500, 2000, 3), dtype=np.uint8))
    img, size = decode_image_sized(data, max_pixels=10**8, min_side=32, decode_max_pixels=100_000)
    assert size == (2000, 1500) and img.size[0] * img.size[1] <= 100_000
    with pytest.raises(ImageError, match="truncated or corrupt image"):
        decode_image_sized(data[: len(data) - 200], max_pixels=10**8, min_side=32, decode_max_pixels=100_000)
