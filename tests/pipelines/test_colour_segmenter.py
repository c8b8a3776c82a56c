"""The "colour" foreground backend on toy-world images, whose exact masks are known.

Thresholds come from measurements; pipelines/colour_segmenter.py was tuned on another toy world
(/tmp/demo3), so the images here are held out. On the default corpus's 148 distinct images the
median IoU is 1.00 and p25 1.00; 93% are >= 0.9. The misses are colour coincidences, a documented
limit: a striped cyan object's dark stripes (cyan * 0.55) have nearly the colour of a teal
background, so they count as background. Blurred + noised copies (like the toy model's samples)
give median 0.94, p25 0.87. The asserted bounds leave a margin below those.

A second known limit, rare (1 of 36 ring/noise combinations tried, seed 9 of grey/olive noise,
blurred): a low-contrast noise background whose one colour sits in a blob inside the frame is
taken for part of the object. `PICKED` uses seed 4 of the same noise.
"""
from __future__ import annotations

import io

import cv2
import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from fbmem.jobs.config import Config, SegmenterConfig
from fbmem.jobs.toy.corpus import (
    BG_KINDS,
    BgSpec,
    FgSpec,
    ToyCorpusSpec,
    build_corpus,
    compose,
)
from fbmem.pipelines.colour_segmenter import colour_foreground, is_pattern
from fbmem.pipelines.sam_segmenter import SamSegmenter, make_backend


def iou(pred: np.ndarray, truth: np.ndarray) -> float:
    p, t = pred > 0.5, truth > 0.5
    union = (p | t).sum()
    return 1.0 if union == 0 else float((p & t).sum() / union)


def blurred(image: np.ndarray, seed: int = 0) -> np.ndarray:
    """A stand-in for a toy-model sample: Gaussian blur (sigma 1.5) plus pixel noise (sd 6)."""
    rng = np.random.default_rng(seed)
    out = cv2.GaussianBlur(image.astype(np.float32), (0, 0), 1.5) + rng.normal(0, 6, image.shape)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def corpus_images():
    """The default corpus's distinct images (VM copies are byte-identical)."""
    seen, out = set(), []
    for r in build_corpus(ToyCorpusSpec()).images:
        if r.image.tobytes() not in seen:
            seen.add(r.image.tobytes())
            out.append(r)
    return out


# One object per background kind and per fill texture, colours chosen apart from the background's.
PICKED = [
    (FgSpec("circle", "red", "flat", cx=0.4, cy=0.55, scale=0.3), BgSpec("stripes", "grey", "beige", angle=45.0)),
    (FgSpec("square", "green", "striped", scale=0.3), BgSpec("dots", "navy", "ivory", period=0.25)),
    (FgSpec("triangle", "blue", "shaded", cx=0.55, scale=0.33), BgSpec("checker", "olive", "ivory", period=1 / 3)),
    (FgSpec("star", "yellow", "checked", cy=0.45, scale=0.34), BgSpec("grid", "slate", "beige")),
    (FgSpec("diamond", "orange", "shaded", scale=0.3), BgSpec("gradient", "teal", "ivory", angle=30.0)),
    (FgSpec("cross", "magenta", "flat", cx=0.6, scale=0.3), BgSpec("waves", "navy", "beige", period=0.5)),
    (FgSpec("hexagon", "cyan", "checked", scale=0.28), BgSpec("noise", "brown", "ivory", seed=5)),
    (FgSpec("ring", "purple", "striped", cx=0.45, scale=0.32), BgSpec("noise", "grey", "olive", seed=4)),
]


@pytest.mark.parametrize("fg, bg", PICKED, ids=[f"{f.shape}-{b.kind}" for f, b in PICKED])
def test_masks_match_the_exact_masks(fg, bg):
    img, truth = compose(fg, bg, 64)
    assert iou(colour_foreground(img), truth) >= 0.95
    assert iou(colour_foreground(blurred(img)), truth) >= 0.8


def test_masks_match_across_the_default_corpus(corpus_images):
    scores = np.array([iou(colour_foreground(r.image), r.mask) for r in corpus_images])
    assert len(scores) > 100
    assert np.median(scores) >= 0.97 and np.percentile(scores, 25) >= 0.95
    assert (scores >= 0.9).mean() >= 0.85


def test_blurred_corpus_images_keep_their_object(corpus_images):
    picked = [r for r in corpus_images if r.planted == "NM" or r.image_name.endswith("_00")]
    masks = [colour_foreground(blurred(r.image, i)) for i, r in enumerate(picked)]
    scores = np.array([iou(m, r.mask) for m, r in zip(masks, picked)])
    assert np.median(scores) >= 0.85 and np.percentile(scores, 25) >= 0.75
    assert all(m.any() for m in masks)  # grabcut's failure on blurry samples: an empty mask


def test_ring_keeps_its_hole():
    img, truth = compose(FgSpec("ring", "red", "shaded", scale=0.35), BgSpec("stripes", "grey", "beige"), 64)
    hole = np.zeros((64, 64), dtype=bool)
    hole[28:36, 28:36] = True  # well inside the inner radius (0.55 * 0.35 * 64 = 12 px)
    for image in (img, blurred(img)):
        mask = colour_foreground(image)
        assert iou(mask, truth) >= 0.85
        assert mask[hole].max() == 0.0


@pytest.mark.parametrize("kind", BG_KINDS)
def test_empty_backgrounds_give_an_empty_mask(kind):
    for period, colours in ((0.25, ("navy", "ivory")), (0.5, ("olive", "teal"))):
        img, _ = compose(None, BgSpec(kind, *colours, period=period, seed=3), 64)
        assert colour_foreground(img).mean() <= 0.01
        assert colour_foreground(blurred(img)).mean() <= 0.01


def test_dots_that_never_touch_the_frame_are_background():
    """Dots sit inside each period, so at angle 0 none touches the frame: the border rule alone
    would call them objects; the pattern rule does not."""
    bg = BgSpec("dots", "slate", "ivory", period=0.5, angle=0.0)
    empty, _ = compose(None, bg, 64)
    dots = np.all(empty == np.array([240, 236, 220], np.uint8), axis=-1)
    assert dots.any() and not (dots[0].any() or dots[-1].any() or dots[:, 0].any() or dots[:, -1].any())
    assert is_pattern(dots, min_px=20)
    img, truth = compose(FgSpec("star", "magenta", "striped", cx=0.45, cy=0.55, scale=0.3), bg, 64)
    assert iou(colour_foreground(img), truth) >= 0.9


def test_output_is_a_deterministic_binary_float_mask():
    img, _ = compose(FgSpec("cross", "purple", "shaded", cx=0.45, scale=0.3), BgSpec("checker", "navy", "slate"), 64)
    img = blurred(img)
    a, b = colour_foreground(img, seed=0), colour_foreground(img.copy(), seed=0)
    assert a.dtype == np.float32 and a.shape == (64, 64)
    assert set(np.unique(a)) <= {0.0, 1.0}
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "bad, message",
    [
        (np.zeros((32, 32), np.uint8), "RGB HxWx3"),
        (np.zeros((32, 32, 4), np.uint8), "RGB HxWx3"),
        (np.zeros((32, 32, 3), np.float32), "uint8"),
    ],
)
def test_wrong_input_raises_a_clear_error(bad, message):
    with pytest.raises(ValueError, match=message):
        colour_foreground(bad)


def test_too_few_clusters_is_refused():
    with pytest.raises(ValueError, match="n_clusters"):
        colour_foreground(np.zeros((16, 16, 3), np.uint8), n_clusters=1)


def test_backend_from_config_and_in_the_actor():
    cfg = SegmenterConfig(backend="colour")
    backend = make_backend(cfg, device=None)
    assert backend.model_id == "colour:k4"
    assert SegmenterConfig(backend="colour", colour_clusters=5, colour_refine=False).model_id == "colour:k5:no-refine"
    img, truth = compose(FgSpec("hexagon", "orange", "shaded"), BgSpec("waves", "grey", "beige"), 64)
    assert iou(backend(img), truth) >= 0.9

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    config = Config.model_validate({"models": {"segmenter": {"backend": "colour"}}, "resources": {"device": "cpu"}})
    row = SamSegmenter(config.to_json())(pa.table({"image_bytes": pa.array([buf.getvalue()], pa.binary())})).to_pylist()[0]
    assert row["error"] is None and row["mask_model"] == "colour:k4"
    assert row["fg_fraction"] == pytest.approx(float(truth.mean()), abs=0.02)
