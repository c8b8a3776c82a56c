"""Peak memory of validating one image: the worst cases, measured in fresh processes.

Each case runs in its own subprocess: it reads the file, resets the kernel's peak-RSS mark
(/proc/self/clear_refs), decodes, and reports the new peak above what it held before (VmHWM minus
VmRSS at the start), so imports and the file's own bytes are not counted. Cases:

- the issue's 400000 x 32 RGB strip (12.8 M pixels, under max_pixels): validation with the default
  settings (rejected from the header); with the aspect and side limits lifted (decoded reduced to
  decode_max_pixels); and the old path, a full decode plus a ViT-B/32 preprocessing (open_clip's
  real eval transform: resize the short side to 224, crop), which is what cost GBs;
- an image at max_pixels (9459 x 9459 = 89.5 M pixels) in the costliest encodings: PNG RGB, RGBA,
  palette with transparency, 16-bit grey, and JPEG: validation (`validate_record`, default
  settings) vs a full-size decode (`decode_image` without a budget, as the model stages call it).

Prints MB per case and ratios (vs the full-size decode; per pixel). Linux only.

    OMP_WAIT_POLICY=PASSIVE python bench/decode.py [--skip-preprocess] [--side 9459]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def write_png(path: Path, width: int, height: int, mode: str) -> Path:
    """An all-zero PNG streamed row by row (a huge image costs little to write)."""
    import struct

    bit_depth, colour_type, row_bytes = {
        "RGB": (8, 2, 3 * width), "RGBA": (8, 6, 4 * width), "P": (8, 3, width), "I;16": (16, 0, 2 * width),
    }[mode]

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    comp = zlib.compressobj(6)
    row = b"\x00" * (1 + row_bytes)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)))
        if mode == "P":
            f.write(chunk(b"PLTE", bytes([0, 0, 0, 255, 0, 0])) + chunk(b"tRNS", b"\x00"))  # index 0 transparent
        idat = bytearray()
        for _ in range(height):
            idat += comp.compress(row)
            if len(idat) > 1 << 20:
                f.write(chunk(b"IDAT", bytes(idat)))
                idat.clear()
        idat += comp.flush()
        f.write(chunk(b"IDAT", bytes(idat)) + chunk(b"IEND", b""))
    return path


def write_jpeg(path: Path, width: int, height: int) -> Path:
    from PIL import Image

    Image.new("RGB", (width, height), (40, 90, 160)).save(path, "JPEG", quality=90)
    return path


def child(case: str, path: str) -> None:
    """Run one case in this (fresh) process and print its measurements as JSON."""
    from fbmem.jobs.config import IngestConfig
    from fbmem.pipelines.images import decode_image, validate_record

    data = Path(path).read_bytes()
    preprocess = None
    if case == "full+vit_b32":
        from open_clip.transform import image_transform

        preprocess = image_transform(224, is_train=False)  # ViT-B/32's eval transform
    cfg = IngestConfig()
    lifted = IngestConfig(max_aspect_ratio=1e6, max_side=10**6)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    before = _status_kb("VmRSS")
    t0 = time.perf_counter()
    if case == "validate":
        result = validate_record({"source_uri": path, "image_bytes": data}, ingest=cfg)["error"] or "good row"
    elif case == "validate_lifted":
        result = validate_record({"source_uri": path, "image_bytes": data}, ingest=lifted)["error"] or "good row"
    else:  # "full" or "full+vit_b32": the model stages' decode (no budget, no aspect limit)
        img = decode_image(data, max_pixels=cfg.max_pixels, min_side=cfg.min_side)
        result = f"decoded {img.size[0]}x{img.size[1]}"
        if preprocess is not None:
            result += f", tensor {tuple(preprocess(img).shape)}"
    seconds = time.perf_counter() - t0
    peak = _status_kb("VmHWM")
    print(json.dumps({"peak_mb": (peak - before) / 1024, "seconds": seconds, "result": result}))


def run_case(case: str, path: Path) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", case, str(path)], capture_output=True, text=True, check=False
    )
    if out.returncode != 0:
        return {"peak_mb": float("nan"), "seconds": float("nan"), "result": f"FAILED: {out.stderr.strip()[-300:]}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--side", type=int, default=9459, help="side of the max-pixel images (9459^2 <= 89,478,485)")
    ap.add_argument("--skip-preprocess", action="store_true", help="skip the strip's ViT-B/32 preprocessing (~3 GB)")
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return

    from fbmem.jobs.config import IngestConfig

    cfg = IngestConfig()
    side = args.side
    rows: list[tuple[str, str, dict, int]] = []
    with tempfile.TemporaryDirectory(prefix="fbmem-bench-decode") as tmp:
        d = Path(tmp)
        strip = write_png(d / "strip.png", 400000, 32, "RGB")
        strip_cases = ["validate", "validate_lifted", "full"] + ([] if args.skip_preprocess else ["full+vit_b32"])
        for case in strip_cases:
            rows.append(("strip 400000x32 RGB PNG", case, run_case(case, strip), 400000 * 32))
        for label, make in (
            ("PNG RGB", lambda p: write_png(p, side, side, "RGB")),
            ("PNG RGBA", lambda p: write_png(p, side, side, "RGBA")),
            ("PNG palette+tRNS", lambda p: write_png(p, side, side, "P")),
            ("PNG 16-bit grey", lambda p: write_png(p, side, side, "I;16")),
            ("JPEG RGB", lambda p: write_jpeg(p, side, side)),
        ):
            path = make(d / f"max.{'jpg' if label.startswith('JPEG') else 'png'}")
            for case in ("validate", "full"):
                rows.append((f"{side}x{side} {label}", case, run_case(case, path), side * side))
            path.unlink()

    print(f"max_pixels {cfg.max_pixels:,}  decode_max_pixels {cfg.decode_max_pixels:,}  "
          f"max_aspect_ratio {cfg.max_aspect_ratio:g}  max_side {cfg.max_side}")
    print(f"{'image':34} {'case':16} {'peak MB':>9} {'B/pixel':>8} {'vs full':>8} {'s':>6}  result")
    full = {img: r["peak_mb"] for img, case, r, _ in rows if case == "full"}
    for img, case, r, pixels in rows:
        ratio = r["peak_mb"] / full[img] if full.get(img) else float("nan")
        per_px = r["peak_mb"] * 2**20 / pixels
        print(f"{img:34} {case:16} {r['peak_mb']:9.1f} {per_px:8.2f} {ratio:8.3f} {r['seconds']:6.2f}  {r['result'][:90]}")


if __name__ == "__main__":
    main()
