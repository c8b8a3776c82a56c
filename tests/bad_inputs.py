"""Writes the awkward inputs that ingestion must survive, into a directory of the caller's choice.

Two kinds, kept apart on purpose:
- ERRORS: inputs that must become one error row each (truncated, empty, text-as-jpg, 1x1, over the
  pixel limit, over PIL's own hard limit, a 400000x32 strip (over the aspect-ratio limit), a side
  over the max_side limit, a missing path). `EXPECTED_ERRORS` maps each to a substring of its error
  message (with the default IngestConfig limits).
- MUST_DECODE: legitimate images in unusual encodings (CMYK JPEG, 16-bit grey PNG, palette PNG with a
  transparent index) that must decode to sensible RGB — rejecting them would silently drop data.

The over-limit images cost almost nothing: they are 1-bit PNGs of an all-black picture written with
streaming zlib, so a 12000x12000 header (144 M pixels > PIL's and our default 89.5 M) takes ~20 KB on
disk and is never decoded. `write_black_png` writes the same in 8-bit RGB, for tests that do decode.
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
    "strip": "image too elongated: 400000x32 has aspect ratio 1.25e+04:1 > max_aspect_ratio 20",
    "long_side": "image too large: 20000x1000 has a side over max_side 16384",
    "missing": "file not found",
}
MUST_DECODE: tuple[str, ...] = ("cmyk", "gray16", "palette_alpha")

# sizes of the valid oddities (width, height)
ODDITY_SIZE = (64, 48)
# palette image: the left half uses the transparent index, the right half opaque red
PALETTE_TRANSPARENT_INDEX = 0


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def write_black_png(path: Path, width: int, height: int, mode: str = "1") -> Path:
    """A valid all-black PNG of any size, streamed so a huge header costs kilobytes.

    mode "1": 1-bit grey (never worth decoding); "RGB": 8-bit RGB, "RGBA": 8-bit RGBA (transparent).
    """
    bit_depth, colour_type, row_bytes = {"1": (1, 0, (width + 7) // 8), "RGB": (8, 2, 3 * width),
                                         "RGBA": (8, 6, 4 * width)}[mode]
    row = b"\x00" * (1 + row_bytes)  # filter byte 0 + zero samples
    comp = zlib.compressobj(9)
    idat = bytearray()
    for _ in range(height):
        idat += comp.compress(row)
    idat += comp.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", bytes(idat)) + _png_chunk(b"IEND", b"")
    )
    return path


def write_black_bilevel_png(path: Path, width: int, height: int) -> Path:
    """A valid 1-bit all-black PNG of any size (see `write_black_png`)."""
    return write_black_png(path, width, height, "1")


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
    # 12.8 M pixels (under max_pixels) but 12500:1: a model resizing its short side to 224 would
    # make it 2.8 M pixels wide (GBs); rejected from the header by max_aspect_ratio
    paths["strip"] = write_black_bilevel_png(d / "strip.png", 400000, 32)
    # 20 M pixels at 20:1 (both within limits) but a side over max_side
    paths["long_side"] = write_black_bilevel_png(d / "long_side.png", 20000, 1000)

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


# ------------------------------------------------------------------------------------- bad servers


class BadServer:
    """An HTTP server on 127.0.0.1 (a free port) that misbehaves on purpose, by path.

    - `/file/NAME`: 200 with `files[NAME]`
    - `/drip/NAME`: headers at once, then the body one byte every `drip_s` (a slow-drip server)
    - `/drip-head`: even the status line comes one byte every `drip_s`
    - `/status/CODE/KEY/N/NAME`: the first N requests of KEY answer CODE (Retry-After: 0), then 200
    - `/reset/KEY/N/NAME`: the first N requests of KEY are reset (RST) before any answer, then 200
    - `/short/NAME`: declares 1000 bytes more than it sends, then closes
    - `/chunked/N`: N zero bytes, chunked (no Content-Length)
    - `/redirect/NAME`: 302 to `/file/NAME`
    - anything else: 404
    `hits` counts requests by path. Every loop stops at `close()` (the server is used as a context
    manager), so a test never leaves a thread writing.
    """

    def __init__(self, files: dict[str, bytes] | None = None, drip_s: float = 0.2) -> None:
        import collections
        import http.server
        import threading

        self.files = dict(files or {})
        self.drip_s = drip_s
        self.hits: collections.Counter[str] = collections.Counter()
        self.stop = threading.Event()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                outer.hits[self.path] += 1
                parts = self.path.strip("/").split("/")
                try:
                    outer._serve(self, parts)
                except OSError:
                    self.close_connection = True  # the client went away: fine

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address) -> None:
                pass  # reset connections are the point

        self._server = Server(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()
        self.base = f"http://127.0.0.1:{self._server.server_address[1]}"

    def url(self, path: str) -> str:
        return f"{self.base}/{path.lstrip('/')}"

    def _send(self, h, code: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        h.send_response(code)
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(body)))
        h.send_header("Connection", "close")
        h.end_headers()
        h.wfile.write(body)

    def _drip(self, h, data: bytes) -> None:
        for i in range(len(data)):
            if self.stop.wait(self.drip_s):
                return
            h.wfile.write(data[i : i + 1])
            h.wfile.flush()

    def _serve(self, h, parts: list[str]) -> None:
        import socket
        import struct

        kind = parts[0]
        if kind == "file" and parts[1] in self.files:
            self._send(h, 200, self.files[parts[1]])
        elif kind == "drip" and parts[1] in self.files:
            data = self.files[parts[1]]
            h.send_response(200)
            h.send_header("Content-Length", str(len(data)))
            h.end_headers()
            h.wfile.flush()
            self._drip(h, data)
        elif kind == "drip-head":
            self._drip(h, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        elif kind in ("status", "reset"):
            code, key, n, name = (parts[1], parts[2], int(parts[3]), parts[4]) if kind == "status" else (
                "0", parts[1], int(parts[2]), parts[3])
            if self.hits[f"{kind}:{key}"] < n:
                self.hits[f"{kind}:{key}"] += 1
                if kind == "reset":
                    h.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    h.connection.close()
                    h.close_connection = True
                    return
                self._send(h, int(code), b"not now", {"Retry-After": "0"})
                return
            self._send(h, 200, self.files[name])
        elif kind == "short" and parts[1] in self.files:
            data = self.files[parts[1]]
            h.send_response(200)
            h.send_header("Content-Length", str(len(data) + 1000))
            h.end_headers()
            h.wfile.write(data)
            h.close_connection = True
        elif kind == "chunked":
            h.send_response(200)
            h.send_header("Transfer-Encoding", "chunked")
            h.end_headers()
            left = int(parts[1])
            while left > 0 and not self.stop.is_set():
                n = min(left, 1 << 16)
                h.wfile.write(f"{n:x}\r\n".encode() + b"\x00" * n + b"\r\n")
                left -= n
            h.wfile.write(b"0\r\n\r\n")
        elif kind == "redirect":
            h.send_response(302)
            h.send_header("Location", f"/file/{parts[1]}")
            h.send_header("Content-Length", "0")
            h.end_headers()
        else:
            self._send(h, 404, b"no such thing")

    def close(self) -> None:
        self.stop.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> BadServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SilentServer:
    """A socket on 127.0.0.1 that takes connections (the kernel completes them) and never answers."""

    def __init__(self) -> None:
        import socket

        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(128)
        self.base = f"http://127.0.0.1:{self._sock.getsockname()[1]}"

    def url(self, path: str) -> str:
        return f"{self.base}/{path.lstrip('/')}"

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> SilentServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class UnreachableServer:
    """A socket on 127.0.0.1 whose connection queue is full: a new connect gets no answer (times out).

    Linux keeps backlog+1 finished connections for a listening socket that never accepts; SYNs past
    that are dropped, so the client's connect hangs as it would for a black-holed host.
    """

    def __init__(self) -> None:
        import socket

        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(0)
        self.base = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        self._fillers = []
        for _ in range(2):
            s = socket.socket()
            s.settimeout(0.5)
            try:
                s.connect(("127.0.0.1", self._sock.getsockname()[1]))
            except OSError:
                pass
            self._fillers.append(s)

    def url(self, path: str) -> str:
        return f"{self.base}/{path.lstrip('/')}"

    def close(self) -> None:
        for s in self._fillers:
            s.close()
        self._sock.close()

    def __enter__(self) -> UnreachableServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
