"""A deterministic toy training corpus with planted memorization (pure numpy + PIL).

Why it exists: the audit needs ground truth. A tiny diffusion model trained on this corpus really
memorizes the planted groups (docs/TOY.md), and every image comes with its exact foreground mask,
so FB-Mem labels can be checked against what was planted instead of against a segmenter's guess.

Groups (each image and each prompt records its `planted` group):
- VM: one image duplicated `copies` times under one caption (verbatim memorization).
- FM: one foreground object (same shape, colour, texture, size, position, so the same pixels and
  mask) on `copies` different backgrounds under one caption.
- BM: one background under `copies` different objects under one caption. The objects sit at
  almost the same place and size (`bm_jitter`), so their masks overlap: the hard case for a
  masked-view score.
- NM: unique images with unique captions.

The corpus is "coarse" on purpose (large shapes, low-frequency backgrounds and fill textures):
a small autoencoder cannot reproduce fine textures, and then nothing looks memorized.

Shapes are drawn without anti-aliasing from an analytic inside test at pixel centres: the mask
is exactly the set of pixels that carry foreground colour, which is what lets tests and audits
trust it.

`planted_test_set` is separate: large (S >= 161) textured image pairs, one per FB-Mem case, for
testing the region scorer and the label rule rather than a model.
"""
from __future__ import annotations

import csv
import hashlib
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

# ------------------------------------------------------------------------------------------ vocabulary

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "diamond", "cross", "ring", "hexagon")
FG_TEXTURES: tuple[str, ...] = ("flat", "striped", "shaded", "checked")
BG_KINDS: tuple[str, ...] = ("stripes", "dots", "checker", "grid", "gradient", "waves", "noise")

# Foreground colours are saturated, background colours muted: the two sets never share a colour,
# so an object always stands out from the background it is drawn on.
FG_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 38, 38),
    "green": (34, 177, 76),
    "blue": (36, 84, 224),
    "yellow": (245, 214, 35),
    "orange": (247, 136, 24),
    "purple": (136, 52, 184),
    "cyan": (32, 204, 214),
    "magenta": (224, 44, 168),
}
BG_COLOURS: dict[str, tuple[int, int, int]] = {
    "grey": (128, 128, 128),
    "navy": (30, 40, 90),
    "olive": (110, 110, 50),
    "teal": (40, 100, 100),
    "beige": (215, 200, 170),
    "brown": (110, 70, 40),
    "slate": (80, 90, 110),
    "ivory": (240, 236, 220),
}

# Coarse choices (fractions of the image side) so patterns survive a small autoencoder.
_BG_PERIODS: tuple[float, ...] = (0.2, 0.25, 1 / 3, 0.5)
_BG_ANGLES: tuple[float, ...] = (0.0, 45.0, 90.0, 135.0)
_TEXTURE_WORDS = {"flat": "", "striped": "striped ", "shaded": "shaded ", "checked": "checked "}

Colour = str | tuple[int, int, int]


def _rgb(colour: Colour) -> np.ndarray:
    """A named colour from either palette, or an explicit RGB triple."""
    if isinstance(colour, str):
        if colour in FG_COLOURS:
            return np.array(FG_COLOURS[colour], dtype=np.float64)
        if colour in BG_COLOURS:
            return np.array(BG_COLOURS[colour], dtype=np.float64)
        names = sorted(FG_COLOURS) + sorted(BG_COLOURS)
        raise ValueError(f"unknown colour {colour!r}: use one of {names} or an RGB triple")
    rgb = tuple(colour)
    if len(rgb) != 3 or not all(isinstance(c, (int, np.integer)) and 0 <= c <= 255 for c in rgb):
        raise ValueError(f"colour {colour!r} is not a name or an RGB triple of ints in 0..255")
    return np.array(rgb, dtype=np.float64)


# ---------------------------------------------------------------------------------------------- specs


@dataclass(frozen=True)
class FgSpec:
    """A foreground object. Position and radius are fractions of the image side, so the same spec
    draws the same object at any image size."""

    shape: str
    colour: Colour
    texture: str = "flat"
    cx: float = 0.5
    cy: float = 0.5
    scale: float = 0.3  # circumradius / image side
    angle: float = 0.0  # degrees, counter-clockwise

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}: use one of {', '.join(SHAPES)}")
        if self.texture not in FG_TEXTURES:
            raise ValueError(f"unknown foreground texture {self.texture!r}: use one of {', '.join(FG_TEXTURES)}")
        _rgb(self.colour)
        if not 0 < self.scale <= 1:
            raise ValueError(f"foreground scale must be in (0, 1], got {self.scale}")

    def words(self) -> str:
        """Caption words, e.g. 'striped red star'."""
        name = self.colour if isinstance(self.colour, str) else "rgb{}-{}-{}".format(*self.colour)
        return f"{_TEXTURE_WORDS[self.texture]}{name} {self.shape}"

    def with_article(self) -> str:
        words = self.words()
        return f"{'an' if words[0] in 'aeiou' else 'a'} {words}"


@dataclass(frozen=True)
class BgSpec:
    """A background pattern of two colours. `period` is the pattern's cycle as a fraction of the
    image side (noise: the size of one random cell); `seed` only matters for `noise`."""

    kind: str
    colour_a: Colour = "grey"
    colour_b: Colour = "beige"
    period: float = 0.25
    angle: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in BG_KINDS:
            raise ValueError(f"unknown background kind {self.kind!r}: use one of {', '.join(BG_KINDS)}")
        _rgb(self.colour_a)
        _rgb(self.colour_b)
        if not 0 < self.period <= 2:
            raise ValueError(f"background period must be in (0, 2], got {self.period}")


# ----------------------------------------------------------------------------------------- primitives


def unit_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in [0, 1]: x to the right, y down."""
    c = (np.arange(size, dtype=np.float64) + 0.5) / size
    return np.meshgrid(c, c)  # x varies along columns, y along rows


def _regular_polygon(n: int, radius: float = 1.0, phase: float = -math.pi / 2) -> np.ndarray:
    a = phase + 2 * math.pi * np.arange(n) / n
    return np.stack([radius * np.cos(a), radius * np.sin(a)], axis=1)


def _star_polygon(points: int = 5, inner: float = 0.45) -> np.ndarray:
    a = -math.pi / 2 + math.pi * np.arange(2 * points) / points
    r = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return np.stack([r * np.cos(a), r * np.sin(a)], axis=1)


def _inside_polygon(u: np.ndarray, v: np.ndarray, verts: np.ndarray) -> np.ndarray:
    """Even-odd crossing test, vectorised over pixels (works for the non-convex star)."""
    inside = np.zeros(u.shape, dtype=bool)
    n = len(verts)
    for i in range(n):
        x1, y1 = verts[i]
        x2, y2 = verts[(i + 1) % n]
        if y1 == y2:
            continue  # a horizontal edge never crosses a horizontal ray
        crosses = (y1 > v) != (y2 > v)
        x_at = x1 + (v - y1) * (x2 - x1) / (y2 - y1)
        inside ^= crosses & (u < x_at)
    return inside


def _object_coords(fg: FgSpec, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel centres in the object's frame: unit circumradius, rotated by -angle."""
    x, y = unit_grid(size)
    dx, dy = (x - fg.cx) / fg.scale, (y - fg.cy) / fg.scale
    t = math.radians(fg.angle)
    return dx * math.cos(t) - dy * math.sin(t), dx * math.sin(t) + dy * math.cos(t)


def shape_mask(fg: FgSpec, size: int) -> np.ndarray:
    """Boolean mask of the shape, decided at pixel centres (no anti-aliasing, so exact)."""
    u, v = _object_coords(fg, size)
    r2 = u * u + v * v
    if fg.shape == "circle":
        return r2 <= 1.0
    if fg.shape == "ring":
        return (r2 <= 1.0) & (r2 >= 0.55**2)
    if fg.shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.75
    if fg.shape == "diamond":
        return np.abs(u) + np.abs(v) <= 1.0
    if fg.shape == "cross":
        arm = 0.34
        return ((np.abs(u) <= arm) & (np.abs(v) <= 1.0)) | ((np.abs(v) <= arm) & (np.abs(u) <= 1.0))
    if fg.shape == "triangle":
        return _inside_polygon(u, v, _regular_polygon(3))
    if fg.shape == "hexagon":
        return _inside_polygon(u, v, _regular_polygon(6, phase=0.0))
    if fg.shape == "star":
        return _inside_polygon(u, v, _star_polygon())
    raise AssertionError(fg.shape)  # FgSpec validated it


def render_foreground(fg: FgSpec, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(rgb float64 HxWx3 in 0..255, bool mask). Fill textures are coarse (half the radius)."""
    u, v = _object_coords(fg, size)
    c = _rgb(fg.colour)
    if fg.texture == "flat":
        shade = np.ones_like(u)[..., None] * c
    elif fg.texture == "striped":
        band = (np.floor((u + v) * 1.5) % 2)[..., None]
        shade = c * (1 - 0.45 * band)
    elif fg.texture == "shaded":
        light = np.clip(1.0 - 0.5 * np.sqrt(u * u + v * v) - 0.25 * v, 0.35, 1.0)[..., None]
        shade = c * light
    else:  # checked
        cell = (np.floor(u * 2) + np.floor(v * 2)) % 2
        shade = c + (255.0 - c) * 0.5 * cell[..., None]
    return shade, shape_mask(fg, size)


def _bilinear(grid: np.ndarray, size: int) -> np.ndarray:
    """Upsample a small 2-D grid to size x size (corners aligned), separably in numpy."""

    def weights(n: int) -> np.ndarray:
        pos = np.linspace(0, n - 1, size)
        lo = np.clip(np.floor(pos).astype(int), 0, max(n - 2, 0))
        frac = pos - lo
        w = np.zeros((size, n))
        w[np.arange(size), lo] += 1 - frac
        if n > 1:
            w[np.arange(size), lo + 1] += frac
        return w

    return weights(grid.shape[0]) @ grid @ weights(grid.shape[1]).T


def background_field(bg: BgSpec, size: int) -> np.ndarray:
    """The pattern as a blend weight in [0, 1] per pixel (0 = colour_a, 1 = colour_b)."""
    x, y = unit_grid(size)
    t = math.radians(bg.angle)
    s = x * math.cos(t) + y * math.sin(t)  # along the pattern direction
    q = -x * math.sin(t) + y * math.cos(t)  # across it
    p = bg.period
    if bg.kind == "stripes":
        return (np.floor(s / (p / 2)) % 2).astype(np.float64)
    if bg.kind == "checker":
        return ((np.floor(s / (p / 2)) + np.floor(q / (p / 2))) % 2).astype(np.float64)
    if bg.kind == "dots":
        ds = (s % p) - p / 2
        dq = (q % p) - p / 2
        return ((ds * ds + dq * dq) <= (0.3 * p) ** 2).astype(np.float64)
    if bg.kind == "grid":
        w = max(0.2 * p, 1.5 / size)
        return (((s % p) < w) | ((q % p) < w)).astype(np.float64)
    if bg.kind == "gradient":
        lo, hi = s.min(), s.max()
        return (s - lo) / (hi - lo) if hi > lo else np.zeros_like(s)
    if bg.kind == "waves":
        return 0.5 + 0.5 * np.sin(2 * math.pi * (s / p + 0.35 * np.sin(2 * math.pi * q / (2 * p))))
    if bg.kind == "noise":
        cells = max(2, int(round(1 / p)) + 1)
        grid = np.random.default_rng(bg.seed).random((cells, cells))
        f = _bilinear(grid, size)
        return (f - f.min()) / max(f.max() - f.min(), 1e-9)
    raise AssertionError(bg.kind)  # BgSpec validated it


def render_background(bg: BgSpec, size: int) -> np.ndarray:
    """rgb float64 HxWx3 in 0..255."""
    w = background_field(bg, size)[..., None]
    return _rgb(bg.colour_a) * (1 - w) + _rgb(bg.colour_b) * w


def to_uint8(rgb: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def compose(fg_spec: FgSpec | None, bg_spec: BgSpec, size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """(image uint8 HxWx3, mask float32 HxW in {0, 1}). The mask is exactly the pixels painted with
    the foreground; every other pixel is the background's own pixel. `fg_spec=None` gives a
    foreground-less image with an all-zero mask."""
    if size < 8:
        raise ValueError(f"image size must be at least 8, got {size}")
    img = render_background(bg_spec, size)
    mask = np.zeros((size, size), dtype=bool)
    if fg_spec is not None:
        fg_rgb, mask = render_foreground(fg_spec, size)
        img = np.where(mask[..., None], fg_rgb, img)
    return to_uint8(img), mask.astype(np.float32)


# -------------------------------------------------------------------------------------------- corpus


@dataclass(frozen=True)
class ToyCorpusSpec:
    """How many groups of each kind and how they look. The defaults are docs/TOY.md's prototype
    (208 images); more groups (say `vm_prompts=8, nm_prompts=32`) give stabler AUCs, and
    `dataclasses.replace(spec, ...)` changes any of it."""

    vm_prompts: int = 4
    vm_copies: int = 16
    fm_prompts: int = 4
    fm_copies: int = 16
    bm_prompts: int = 4
    bm_copies: int = 16
    nm_prompts: int = 16
    size: int = 64
    seed: int = 0
    scale_range: tuple[float, float] = (0.24, 0.36)  # circumradius / side: large, coarse shapes
    bm_jitter: float = 0.03  # BM objects' centre jitter (fraction of the side) and relative scale jitter
    fg_textures: tuple[str, ...] = FG_TEXTURES
    bg_kinds: tuple[str, ...] = BG_KINDS
    # FM groups' backgrounds: crisp patterns only. MS-SSIM finds smooth fields (gradients, noise)
    # alike whatever their layout, so with noise backgrounds one FM generation matched up to 7 of
    # its 16 training images with full > 0.8 (labelled VM); a crisp pattern that is not the one
    # generated scores low, so only a truly reproduced background counts.
    fm_bg_kinds: tuple[str, ...] = ("stripes", "dots", "checker", "grid", "waves")
    # FM groups' objects: compact shapes only. The `region` metric scores a foreground on the pixels
    # at least `fbmem.edge_band` inside both masks; a ring's band, a star's points or a cross's
    # arms at 64 px leave almost none of that interior, so an FM sample of a ring scored 0.62-0.74
    # however faithful it looked, while compact objects' samples scored up to 0.90.
    fm_shapes: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "hexagon")
    # BM groups' backgrounds: no dots or grid. Those two are the finest patterns (dots of radius
    # 0.3 period, lines of 0.2 period), and the 64 px model does not redraw them faithfully: over
    # two trained models, BM samples got their BM label for dots 1/10 and grid 2/10, against
    # gradient 8/10 and waves 7/10, and the VM prompt on dots was the least verbatim VM prompt
    # (6/10 VM, the other three 29/30). A BM group tests background memorization, not the
    # autoencoder's resolution.
    bm_bg_kinds: tuple[str, ...] = ("stripes", "checker", "gradient", "waves", "noise")

    def __post_init__(self) -> None:
        for name in ("vm_prompts", "fm_prompts", "bm_prompts", "nm_prompts"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("vm_copies", "fm_copies", "bm_copies"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.size < 16:
            raise ValueError(f"size must be at least 16 pixels, got {self.size}")
        lo, hi = self.scale_range
        if not 0.05 <= lo <= hi <= 0.45:
            raise ValueError(f"scale_range must satisfy 0.05 <= lo <= hi <= 0.45, got {self.scale_range}")
        if not 0 <= self.bm_jitter <= 0.2:
            raise ValueError(f"bm_jitter must be in [0, 0.2], got {self.bm_jitter}")
        bad = [t for t in self.fg_textures if t not in FG_TEXTURES] or (["(none)"] if not self.fg_textures else [])
        if bad:
            raise ValueError(f"fg_textures: unknown or empty {bad}; use some of {', '.join(FG_TEXTURES)}")
        bad = [s for s in self.fm_shapes if s not in SHAPES] or (["(none)"] if not self.fm_shapes else [])
        if bad:
            raise ValueError(f"fm_shapes: unknown or empty {bad}; use some of {', '.join(SHAPES)}")
        for name in ("bg_kinds", "fm_bg_kinds", "bm_bg_kinds"):
            kinds = getattr(self, name)
            bad = [k for k in kinds if k not in BG_KINDS] or (["(none)"] if not kinds else [])
            if bad:
                raise ValueError(f"{name}: unknown or empty {bad}; use some of {', '.join(BG_KINDS)}")
        combos = len(SHAPES) * len(FG_COLOURS) * len(self.fg_textures)
        if self.bm_copies > combos:
            raise ValueError(f"bm_copies={self.bm_copies} exceeds the {combos} distinct objects available")

    @property
    def n_images(self) -> int:
        return (
            self.vm_prompts * self.vm_copies
            + self.fm_prompts * self.fm_copies
            + self.bm_prompts * self.bm_copies
            + self.nm_prompts
        )

    @property
    def n_prompts(self) -> int:
        return self.vm_prompts + self.fm_prompts + self.bm_prompts + self.nm_prompts


@dataclass(frozen=True)
class ToyImage:
    """One training image. `caption` is the text it is trained under (the group's `prompt`);
    `description` says what this particular image shows."""

    image_name: str
    caption: str
    prompt: str
    planted: str
    group_id: str
    image: np.ndarray = field(repr=False, compare=False)
    mask: np.ndarray = field(repr=False, compare=False)
    description: str = ""
    fg: FgSpec | None = None
    bg: BgSpec | None = None


@dataclass(frozen=True)
class ToyPrompt:
    text: str
    planted: str
    group_id: str
    linked: tuple[str, ...]  # names of the training images of the group, in order


@dataclass
class ToyCorpus:
    spec: ToyCorpusSpec
    images: list[ToyImage]
    prompts: list[ToyPrompt]

    def group(self, group_id: str) -> list[ToyImage]:
        return [r for r in self.images if r.group_id == group_id]

    def image(self, name: str) -> ToyImage:
        for r in self.images:
            if r.image_name == name:
                return r
        raise KeyError(f"no image named {name!r} in the corpus")


class _Sampler:
    """All randomness of a corpus, drawn in a fixed order from one seeded Generator, with the
    bookkeeping that keeps backgrounds unique across groups and names them for captions."""

    def __init__(self, spec: ToyCorpusSpec) -> None:
        self.spec = spec
        self.rng = np.random.default_rng(spec.seed)
        self.used_bgs: set[bytes] = set()
        self.bg_names: dict[BgSpec, str] = {}
        self.kind_counts: dict[str, int] = {}
        self.owned_looks: set[tuple[str, str, str]] = set()
        self.memorized_words: list[tuple[str, str, str, str | None]] = []

    def _pick(self, options: Sequence):
        return options[int(self.rng.integers(len(options)))]

    def background(self, kinds: Sequence[str] | None = None) -> BgSpec:
        """A background whose pixels appear nowhere else in the corpus (so NM really is unique),
        of one of `kinds` (default: the spec's bg_kinds)."""
        for _ in range(10_000):
            kind = self._pick(kinds or self.spec.bg_kinds)
            a, b = self.rng.choice(sorted(BG_COLOURS), size=2, replace=False)
            period = float(self._pick(_BG_PERIODS))
            if kind == "gradient":
                angle = float(self.rng.integers(0, 360))
            elif kind == "noise":
                angle = 0.0
            else:
                angle = float(self._pick(_BG_ANGLES))
            seed = int(self.rng.integers(2**31)) if kind == "noise" else 0
            bg = BgSpec(kind, str(a), str(b), period=period, angle=angle, seed=seed)
            # keyed on pixels, not the spec: some specs draw the same picture (a checker turned by
            # 90 degrees with its colours swapped)
            key = hashlib.sha256(to_uint8(render_background(bg, self.spec.size)).tobytes()).digest()
            if key not in self.used_bgs:
                self.used_bgs.add(key)
                n = self.kind_counts.get(kind, 0) + 1
                self.kind_counts[kind] = n
                self.bg_names[bg] = f"{kind} {n}"
                return bg
        raise RuntimeError("could not find an unused background; allow more bg_kinds")

    def placement(self) -> tuple[float, float, float]:
        lo, hi = self.spec.scale_range
        scale = float(self.rng.uniform(lo, hi))
        margin = min(scale + 1.5 / self.spec.size, 0.5)  # keep the whole shape in the frame
        cx, cy = (float(self.rng.uniform(margin, 1 - margin)) for _ in range(2))
        return cx, cy, scale

    def look(self, shapes: Sequence[str] = SHAPES) -> tuple[str, str, str]:
        """An object look no memorized group owns: a VM or FM object appears under its own
        caption only, so no other prompt's words or pixels teach the model that object."""
        for _ in range(10_000):
            look = (
                str(self._pick(shapes)),
                str(self._pick(sorted(FG_COLOURS))),
                str(self._pick(self.spec.fg_textures)),
            )
            if look not in self.owned_looks:
                return look
        raise RuntimeError("every object look is owned by a memorized group; allow more fg_textures")

    def remember_memorized(self, fg: FgSpec, bg_kind: str | None) -> None:
        """Record a VM / FM caption's words (object look, background kind) for `unrelated_look`."""
        self.memorized_words.append((fg.shape, fg.colour, fg.texture, bg_kind))

    def unrelated_look(self) -> tuple[FgSpec, str]:
        """An NM object and background kind whose caption shares at most one of (shape, colour,
        texture, background kind) with every VM / FM caption. With a frozen text encoder, a
        caption that shares most words with a memorized one lands near it, and the model answers
        it with the memorized image (measured: 17 of 80 NM samples were VM images, all from
        captions sharing 2-3 words with a VM caption). Such leaks are real, but they are not
        what the NM group plants."""
        for _ in range(10_000):
            shape, colour, texture = self.look()
            kind = str(self._pick(self.spec.bg_kinds))
            words = (shape, colour, texture, kind)
            if all(sum(a == b for a, b in zip(words, m) if b is not None) <= 1 for m in self.memorized_words):
                cx, cy, scale = self.placement()
                return FgSpec(shape, colour, texture, cx=cx, cy=cy, scale=scale), kind
        raise RuntimeError("no NM caption far enough from the memorized ones; allow more looks")

    def foreground(self, *, own: bool = False, shapes: Sequence[str] = SHAPES) -> FgSpec:
        """A placed object; `own=True` reserves its look for the calling (VM or FM) group."""
        shape, colour, texture = self.look(shapes)
        if own:
            self.owned_looks.add((shape, colour, texture))
        cx, cy, scale = self.placement()
        return FgSpec(shape, colour, texture, cx=cx, cy=cy, scale=scale)

    def foregrounds_at(self, n: int, cx: float, cy: float, scale: float) -> list[FgSpec]:
        """n objects that all look different, placed around (cx, cy, scale) with small jitter."""
        j = self.spec.bm_jitter
        looks: list[tuple[str, str, str]] = []
        while len(looks) < n:
            look = self.look()
            if look not in looks:
                looks.append(look)
        out = []
        for shape, colour, texture in looks:
            s = scale * float(1 + self.rng.uniform(-j, j))
            lim = min(s + 1.5 / self.spec.size, 0.5)
            x = float(np.clip(cx + self.rng.uniform(-j, j), lim, 1 - lim))
            y = float(np.clip(cy + self.rng.uniform(-j, j), lim, 1 - lim))
            out.append(FgSpec(shape, colour, texture, cx=x, cy=y, scale=s))
        return out

    def describe(self, fg: FgSpec | None, bg: BgSpec) -> str:
        return f"{fg.with_article()} on {self.bg_names[bg]}" if fg is not None else f"an empty {self.bg_names[bg]}"


def _readonly(a: np.ndarray) -> np.ndarray:
    a.setflags(write=False)
    return a


def build_corpus(spec: ToyCorpusSpec = ToyCorpusSpec()) -> ToyCorpus:
    """Build every image and prompt of the corpus. Deterministic: the same spec gives
    byte-identical images, names and captions. Group ids are `vm00`, `fm00`, `bm00`, `nm00`, ...;
    image names are `<group>_<copy>`."""
    smp = _Sampler(spec)
    images: list[ToyImage] = []
    prompts: list[ToyPrompt] = []

    rendered: dict[tuple[FgSpec, BgSpec], tuple[np.ndarray, np.ndarray]] = {}  # VM copies share one render

    def add_group(planted: str, gid: str, prompt: str, members: list[tuple[FgSpec, BgSpec]]) -> None:
        names = []
        for k, (fg, bg) in enumerate(members):
            if (fg, bg) not in rendered:
                img, mask = compose(fg, bg, spec.size)
                rendered[(fg, bg)] = (_readonly(img), _readonly(mask))
            img, mask = rendered[(fg, bg)]
            name = f"{gid}_{k:02d}"
            names.append(name)
            images.append(
                ToyImage(name, prompt, prompt, planted, gid, img, mask, smp.describe(fg, bg), fg, bg)
            )
        prompts.append(ToyPrompt(prompt, planted, gid, tuple(names)))

    for g in range(spec.vm_prompts):
        fg, bg = smp.foreground(own=True), smp.background()
        smp.remember_memorized(fg, bg.kind)
        add_group("VM", f"vm{g:02d}", smp.describe(fg, bg), [(fg, bg)] * spec.vm_copies)
    for g in range(spec.fm_prompts):
        fg = smp.foreground(own=True, shapes=spec.fm_shapes)
        smp.remember_memorized(fg, None)  # "on assorted backgrounds": no kind in the caption
        bgs = [smp.background(spec.fm_bg_kinds) for _ in range(spec.fm_copies)]
        add_group("FM", f"fm{g:02d}", f"{fg.with_article()} on assorted backgrounds {g + 1}", [(fg, b) for b in bgs])
    for g in range(spec.bm_prompts):
        bg = smp.background(spec.bm_bg_kinds)
        fgs = smp.foregrounds_at(spec.bm_copies, *smp.placement())
        add_group("BM", f"bm{g:02d}", f"assorted objects on {smp.bg_names[bg]}", [(f, bg) for f in fgs])
    for g in range(spec.nm_prompts):
        fg, kind = smp.unrelated_look()
        bg = smp.background((kind,))
        add_group("NM", f"nm{g:02d}", smp.describe(fg, bg), [(fg, bg)])

    texts = [p.text for p in prompts]
    if len(set(texts)) != len(texts):  # a prompt set keys prompts by text: a repeat would merge two groups
        raise AssertionError("toy corpus produced a repeated prompt text")
    return ToyCorpus(spec, images, prompts)


# --------------------------------------------------------------------------------------------- write


@dataclass(frozen=True)
class CorpusPaths:
    root: Path
    images_dir: Path
    prompts_csv: Path
    manifest_csv: Path
    groups_csv: Path
    image_paths: dict[str, Path]  # image name -> PNG path


def png_bytes(array: np.ndarray, mode: str) -> bytes:
    """PNG encoding; PIL's encoder is deterministic, so equal arrays give equal bytes (and hashes)."""
    buf = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buf, format="PNG")
    return buf.getvalue()


def write_corpus(corpus: ToyCorpus, folder: str | Path) -> CorpusPaths:
    """Write the corpus as a source fbmem ingests, in any of its forms:

    - `images/NAME.png` with sidecars `images/NAME.txt` (the training caption) and
      `images/NAME.mask.png` (8-bit L, 255 = foreground): a folder source.
    - `manifest.csv` (`uri`, `caption`, `mask_uri`, `id`) over the same files: a manifest source.
    - `prompts.csv` (`prompt`, `planted`, `url`, `id`): one row per prompt, linked to one training
      image of its group (the duplicated image for VM, the group's first image otherwise): `url`
      is its path relative to the folder, `id` the sha256 of its bytes (see below).
    - `groups.csv` (`image`, `group_id`, `planted`, `prompt`, `sha256`): every image's group, so an
      evaluation can find all of a prompt's training images.

    Ids: the manifest's `id` is an image's path relative to the folder, `images/NAME.png` (the
    `source_id` a folder ingest of `folder` gives it). A prompt's `id` is the content hash of its
    linked image instead, which is the ingested row's `image_id`: the copies of a VM image are
    byte-identical files, so an ingest keyed on that hash keeps ONE row per VM group, under
    whichever copy it met last (right for an audit: one image, memorized), and a path would name
    a copy that may not be the kept one. The hash finds the row whichever copy was kept and
    whichever folder was ingested, so the linked candidates (SPEC 3) always join. All copies are
    written anyway because training needs them.
    """
    root = Path(folder)
    img_dir = root / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    sha: dict[str, str] = {}
    manifest_rows = []
    group_rows = []
    for r in corpus.images:
        data = png_bytes(r.image, "RGB")
        sha[r.image_name] = hashlib.sha256(data).hexdigest()
        p = img_dir / f"{r.image_name}.png"
        p.write_bytes(data)
        (img_dir / f"{r.image_name}.txt").write_text(r.caption + "\n", encoding="utf-8")
        mask8 = np.where(r.mask > 0.5, 255, 0).astype(np.uint8)
        (img_dir / f"{r.image_name}.mask.png").write_bytes(png_bytes(mask8, "L"))
        paths[r.image_name] = p
        rel = f"images/{r.image_name}.png"
        manifest_rows.append([rel, r.caption, f"images/{r.image_name}.mask.png", rel])
        group_rows.append([r.image_name, r.group_id, r.planted, r.prompt, sha[r.image_name]])

    def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> None:
        with path.open("w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(header)
            w.writerows(rows)

    prompt_rows = []
    for pr in corpus.prompts:
        first = pr.linked[0]
        rel = f"images/{first}.png"
        prompt_rows.append([pr.text, pr.planted, rel, sha[first]])
    write_csv(root / "prompts.csv", ["prompt", "planted", "url", "id"], prompt_rows)
    write_csv(root / "manifest.csv", ["uri", "caption", "mask_uri", "id"], manifest_rows)
    write_csv(root / "groups.csv", ["image", "group_id", "planted", "prompt", "sha256"], group_rows)
    return CorpusPaths(root, img_dir, root / "prompts.csv", root / "manifest.csv", root / "groups.csv", paths)
