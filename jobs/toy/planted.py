"""The planted scoring set: (generation, training image) pairs on photo-like textures with the
FB-Mem label each should get, used to check that the region metric separates FM from BM."""
from __future__ import annotations

import io
import math
from typing import NamedTuple

import numpy as np
from PIL import Image

from fbmem.jobs.toy.corpus import FgSpec, shape_mask, to_uint8, unit_grid

# ---------------------------------------------------------------------------------- planted test set


class PlantedCase(NamedTuple):
    """One (generation, training image) pair with the FB-Mem label it should get in `region` mode
    at tau 0.8. Images uint8 HxWx3, masks float32 HxW in {0, 1}."""

    name: str
    generation: np.ndarray
    generation_mask: np.ndarray
    training: np.ndarray
    training_mask: np.ndarray
    expected: str


def _spectral_field(rng: np.random.Generator, size: int, lo: float, hi: float, alpha: float) -> np.ndarray:
    """Random field with power only between `lo` and `hi` cycles per image, amplitude ~ f^-alpha,
    normalised to [0, 1]. Band-limited noise lets a case choose which MS-SSIM scales it feeds."""
    fy = np.fft.fftfreq(size)[:, None] * size
    fx = np.fft.rfftfreq(size)[None, :] * size
    f = np.sqrt(fx * fx + fy * fy)
    amp = np.where((f >= lo) & (f <= hi), np.maximum(f, 1.0) ** -alpha, 0.0)
    spec = amp * np.exp(2j * math.pi * rng.random(amp.shape)) * rng.rayleigh(1.0, amp.shape)
    field_ = np.fft.irfft2(spec, s=(size, size))
    field_ -= field_.min()
    return field_ / max(field_.max(), 1e-12)


def _colourise(t: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return a * (1 - t[..., None]) + b * t[..., None]


def _textured_background(rng: np.random.Generator, size: int, tone: str = "any") -> np.ndarray:
    """Photo-like clutter: mid/high-frequency noise over stripes whose frequency varies across the
    frame, in muted colours (0..255 floats). Little power at the coarsest MS-SSIM scales, so two
    backgrounds are told apart by structure, not by a global tint. `tone` ("light", "dark") sets
    the overall brightness, for pairs whose backgrounds must differ even at the coarsest scale."""
    x, y = unit_grid(size)
    t = math.radians(float(rng.uniform(0, 180)))
    s = x * math.cos(t) + y * math.sin(t)
    f0, f1 = rng.uniform(5, 9), rng.uniform(14, 22)  # cycles per image, chirping across the frame
    phase = 2 * math.pi * (f0 * s + 0.5 * (f1 - f0) * s * s) + rng.uniform(0, 2 * math.pi)
    stripes = 0.5 + 0.5 * np.sin(phase)
    noise = _spectral_field(rng, size, 6, size / 3, 1.0)
    mix = 0.55 * stripes + 0.45 * noise
    lo, hi = {"any": ((40, 120), (150, 230)), "light": ((120, 170), (200, 250)), "dark": ((5, 50), (70, 120))}[tone]
    a = rng.uniform(*lo, 3)
    b = rng.uniform(*hi, 3)
    return _colourise(mix, a, b)


def _textured_object(rng: np.random.Generator, size: int, warm: bool) -> np.ndarray:
    """A foreground fill: large smooth blobs plus coarse bands, saturated; `warm` picks a red/yellow
    or a blue/green palette so two objects differ at every scale, not just in fine detail."""
    blobs = _spectral_field(rng, size, 1, 6, 1.5)
    x, y = unit_grid(size)
    t = math.radians(float(rng.uniform(0, 180)))
    bands = 0.5 + 0.5 * np.sin(2 * math.pi * rng.uniform(3, 5) * (x * math.cos(t) + y * math.sin(t)))
    mix = 0.65 * blobs + 0.35 * bands
    if warm:
        a, b = np.array([120.0, 10.0, 10.0]), np.array([255.0, 230.0, 60.0])
    else:
        a, b = np.array([10.0, 40.0, 110.0]), np.array([70.0, 240.0, 200.0])
    return _colourise(mix, a, b)


def _area_scale(shape: str, area: float, size: int) -> float:
    """The circumradius that gives a shape `area` (fraction of the frame), measured on its mask."""
    ref = 0.2
    got = shape_mask(FgSpec(shape, "red", scale=ref), size).mean()
    return ref * math.sqrt(area / got)


def _object_mask(rng: np.random.Generator, size: int, shape: str, cx: float, cy: float) -> np.ndarray:
    """A large object's mask: 28-40% of the frame, slightly turned."""
    scale = _area_scale(shape, float(rng.uniform(0.28, 0.40)), size)
    return shape_mask(FgSpec(shape, "red", cx=cx, cy=cy, scale=scale, angle=float(rng.uniform(0, 30))), size)


def _paste(bg: np.ndarray, obj: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return to_uint8(np.where(mask[..., None], obj, bg))


def _degrade(img: np.ndarray, rng: np.random.Generator, sigma: float = 3.0, quality: int = 90) -> np.ndarray:
    """A near-verbatim regeneration: mild Gaussian noise, then a JPEG round trip."""
    noisy = to_uint8(img.astype(np.float64) + rng.normal(0, sigma, img.shape))
    buf = io.BytesIO()
    Image.fromarray(noisy, "RGB").save(buf, format="JPEG", quality=quality)
    buf.seek(0)
    return np.asarray(Image.open(buf).convert("RGB")).copy()


# generation vs training image -> expected FB-Mem label (region metric, beta 0.03, tau 0.8, S 192).
# Ranges: fbmem.jobs.core.region_similarity.score_pairs over seeds 0-9.
PLANTED_EXPECTED: dict[str, str] = {
    # same image, noise sigma 3 + JPEG q90: full 0.99
    "vm-noisy-jpeg": "VM",
    # same object pixels and mask on a new (light -> dark) background: fg 1.00, bg 0.21-0.50, full 0.24-0.47
    "fm-new-background": "FM",
    # same background, a new object (circle over a hexagon of equal area, IoU ~0.93), other palette:
    # bg 0.91-0.95, fg 0.27-0.44, full 0.13-0.39
    "bm-new-object": "BM",
    # same background, a new object filling EXACTLY the same mask: bg 1.00, fg 0.29-0.62, full 0.11-0.56
    "bm-same-mask": "BM",
    # new object, new background: all three <= 0.40
    "nm-new-both": "NM",
    # no foreground (empty masks), same image degraded: the beta rule makes fg = full = 0.99
    "empty-vm": "VM",
    # no foreground, two unrelated images: the beta rule makes fg = full (0.06-0.44); without it the
    # masked foreground views (all black) would score 1.0
    "empty-nm": "NM",
}


def planted_test_set(size: int = 192, seed: int = 0) -> list[PlantedCase]:
    """One textured (generation, training) pair per FB-Mem case, for testing scorers and labels.

    Needs `size >= 161` (MS-SSIM with window 11 and 5 scales). Objects cover 28-40% of the frame
    and are filled with smooth blobs and bands; backgrounds are clutter with most of their power
    at mid/high frequencies. The expected labels are in `PLANTED_EXPECTED` (region metric, SPEC
    sections 1-2, tau 0.8). The masks given are the exact masks of what was drawn.

    Choices that keep each case well clear of tau (at 192 px the coarsest MS-SSIM scale sees the
    whole frame): the two objects of a BM pair come from opposite palettes (warm vs cool), so they
    differ at every scale and not only in fine texture; BM backgrounds are light, so the white
    paint of the background view contrasts little with them where the two masks disagree; the two
    backgrounds of the FM pair differ in overall tone, which keeps the full-image score low.
    """
    if size < 161:
        raise ValueError(f"planted_test_set needs size >= 161 for 5-scale MS-SSIM, got {size}")
    rng = np.random.default_rng([seed, 161])
    empty = np.zeros((size, size), dtype=np.float32)
    cases: list[PlantedCase] = []

    def add(name: str, gen: np.ndarray, gmask: np.ndarray, train: np.ndarray, tmask: np.ndarray) -> None:
        f32 = np.float32
        cases.append(PlantedCase(name, gen, gmask.astype(f32), train, tmask.astype(f32), PLANTED_EXPECTED[name]))

    # VM: a training image and a mildly degraded copy of it
    bg = _textured_background(rng, size)
    m = _object_mask(rng, size, "circle", 0.45, 0.5)
    train = _paste(bg, _textured_object(rng, size, warm=True), m)
    add("vm-noisy-jpeg", _degrade(train, rng), m, train, m)

    # FM: the same object (pixels and mask) on a new background
    obj = _textured_object(rng, size, warm=False)
    m = _object_mask(rng, size, "hexagon", 0.5, 0.52)
    train = _paste(_textured_background(rng, size, "light"), obj, m)
    gen = _paste(_textured_background(rng, size, "dark"), obj, m)
    add("fm-new-background", gen, m, train, m)

    # BM: the same background, a different object at about the same place and size
    bg = _textured_background(rng, size, "light")
    mt = _object_mask(rng, size, "hexagon", 0.5, 0.5)
    mg = shape_mask(FgSpec("circle", "red", cx=0.5, cy=0.5, scale=_area_scale("circle", float(mt.mean()), size)), size)
    train = _paste(bg, _textured_object(rng, size, warm=True), mt)
    gen = _paste(bg, _textured_object(rng, size, warm=False), mg)
    add("bm-new-object", gen, mg, train, mt)

    # BM, hardest: the new object fills exactly the training object's mask
    bg = _textured_background(rng, size, "light")
    m = _object_mask(rng, size, "diamond", 0.5, 0.5)
    train = _paste(bg, _textured_object(rng, size, warm=False), m)
    gen = _paste(bg, _textured_object(rng, size, warm=True), m)
    add("bm-same-mask", gen, m, train, m)

    # NM: new object and new background
    mt = _object_mask(rng, size, "circle", 0.5, 0.5)
    mg = _object_mask(rng, size, "square", 0.5, 0.5)
    train = _paste(_textured_background(rng, size), _textured_object(rng, size, warm=True), mt)
    gen = _paste(_textured_background(rng, size), _textured_object(rng, size, warm=False), mg)
    add("nm-new-both", gen, mg, train, mt)

    # No foreground at all: the beta rule decides
    train = to_uint8(_textured_background(rng, size))
    add("empty-vm", _degrade(train, rng), empty, train, empty)
    train = to_uint8(_textured_background(rng, size))
    gen = to_uint8(_textured_background(rng, size))
    add("empty-nm", gen, empty, train, empty)
    return cases
