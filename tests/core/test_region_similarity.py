"""Region similarity (SPEC section 1): the region metric, its batched scorer and the beta rule."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from pytorch_msssim import ms_ssim

from fbmem.jobs.core.region_similarity import (
    METRIC_MASKED_VIEW,
    METRIC_REGION,
    background_view,
    foreground_view,
    make_views,
    min_valid_side,
    prepare_batch,
    region_ms_ssim,
    required_side,
    score_pair_loop,
    score_pairs,
)

S = 176  # just above the 161 px minimum of 5-scale MS-SSIM with window 11: fast tests
METRICS = (METRIC_REGION, METRIC_MASKED_VIEW)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


def texture(seed: int, size: int = S, channels: int = 3) -> torch.Tensor:
    """Structured image [1,C,S,S]: smooth noise at two scales plus an oriented grating."""
    g = torch.Generator().manual_seed(seed)
    coarse = F.interpolate(torch.rand(1, channels, 6, 6, generator=g), size=(size, size),
                           mode="bicubic", align_corners=False)
    fine = F.interpolate(torch.rand(1, channels, size // 4, size // 4, generator=g), size=(size, size),
                         mode="bilinear", align_corners=False)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    theta = float(torch.rand(1, generator=g)) * math.pi
    freq = 0.1 + 0.3 * float(torch.rand(1, generator=g))
    grating = 0.5 + 0.5 * torch.sin(freq * (xx * math.cos(theta) + yy * math.sin(theta)))
    return (0.45 * coarse + 0.3 * fine + 0.25 * grating).clamp(0, 1)


def disk(cx: float, cy: float, r: float, size: int = S) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    return (((xx - cx) ** 2 + (yy - cy) ** 2) <= r * r).float()[None, None]


def blob_mask(seed: int, size: int = S, soft: bool = False) -> torch.Tensor:
    """Random blobby mask [1,1,S,S]; soft masks have blurred (bilinear-resize-like) edges."""
    g = torch.Generator().manual_seed(seed)
    z = F.interpolate(torch.rand(1, 1, 5, 5, generator=g), size=(size, size), mode="bicubic",
                      align_corners=False)
    if soft:
        return torch.sigmoid((z - 0.5) * 12)
    return (z > 0.5).float()


def related_pairs(n: int, seed: int = 0):
    """n (gen, train) pairs that share structure (train = mix of gen and another texture)."""
    gx = torch.cat([texture(seed + i) for i in range(n)])
    other = torch.cat([texture(seed + 100 + i) for i in range(n)])
    w = torch.linspace(0.3, 0.8, n).view(n, 1, 1, 1)
    tx = (w * gx + (1 - w) * other).clamp(0, 1)
    gm = torch.cat([blob_mask(seed + 200 + i, soft=i % 2 == 1) for i in range(n)])
    tm = torch.cat([blob_mask(seed + 300 + i) for i in range(n)])
    return gx, gm, tx, tm


# ----------------------------------------------------------------------------- the metric

def test_region_equals_ms_ssim_with_full_region():
    gx, _, tx, _ = related_pairs(4)
    ref = ms_ssim(gx, tx, data_range=1.0, size_average=False)
    assert ref.min() > 0.2  # the pairs are related, so the comparison is not between zeros
    ones = torch.ones(4, 1, S, S)
    torch.testing.assert_close(region_ms_ssim(gx, tx, ones), ref, atol=1e-4, rtol=0)
    torch.testing.assert_close(region_ms_ssim(gx, tx, None), ref, atol=1e-4, rtol=0)


def test_batched_fg_with_full_masks_equals_ms_ssim():
    """All-ones masks: the fg view is the image and the fg region the frame, so fg == ms_ssim."""
    gx, _, tx, _ = related_pairs(3)
    ones = torch.ones(3, 1, S, S)
    out = score_pairs(gx, ones, tx, ones, beta=0.0)
    ref = ms_ssim(gx, tx, data_range=1.0, size_average=False)
    torch.testing.assert_close(out["fg"], ref, atol=1e-4, rtol=0)
    torch.testing.assert_close(out["full"], ref, atol=1e-4, rtol=0)


def test_region_ignores_pixels_outside_the_region():
    """Changing the images beyond the windows' reach of the region leaves its score unchanged.

    Two scales: a region pixel's value depends on inputs within about 2 * (11 // 2 + 1) * sqrt(2)
    = 17 px at full resolution, so changes 35 px beyond the region's edge cannot reach it.
    """
    gx, _, tx, _ = related_pairs(1)
    kw = {"weights": (0.5, 0.5)}
    region = disk(S / 2, S / 2, 40)
    far = 1 - disk(S / 2, S / 2, 75)
    tx2 = tx * (1 - far) + texture(999) * far
    a = region_ms_ssim(gx, tx, region, **kw)
    b = region_ms_ssim(gx, tx2, region, **kw)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    assert not torch.allclose(region_ms_ssim(gx, tx, None, **kw), region_ms_ssim(gx, tx2, None, **kw),
                              atol=1e-3)


@pytest.mark.parametrize("metric", METRICS)
def test_batched_equals_per_pair_loop(metric):
    gx, gm, tx, tm = related_pairs(4)
    gm[3] = 0.0  # one degenerate pair: the beta rule must agree too
    gen_idx = torch.tensor([0, 0, 0, 1, 2, 2, 3, 1])
    train_idx = torch.tensor([0, 1, 2, 1, 2, 3, 3, 0])
    ref = score_pair_loop(gx, gm, tx, tm, gen_idx=gen_idx, train_idx=train_idx, metric=metric)
    for chunk, block in ((1, None), (3, 1 << 40), (16, 1 << 40)):
        kw = {} if block is None else {"cpu_block_bytes": block}
        got = score_pairs(gx, gm, tx, tm, gen_idx=gen_idx, train_idx=train_idx, metric=metric,
                          chunk_size=chunk, **kw)
        for key in ("full", "fg", "bg", "fg_area", "bg_area"):
            torch.testing.assert_close(got[key], ref[key], atol=1e-5, rtol=0)
        assert torch.equal(got["fg_fallback"], ref["fg_fallback"])
        assert torch.equal(got["bg_fallback"], ref["bg_fallback"])
    assert bool(ref["fg_fallback"][gen_idx == 3].all())


def test_aligned_pairs_equal_index_pairs():
    gx, gm, tx, tm = related_pairs(3)
    a = score_pairs(gx, gm, tx, tm)
    b = score_pairs(gx, gm, tx, tm, gen_idx=torch.arange(3), train_idx=torch.arange(3))
    for key in ("full", "fg", "bg"):
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0)


@pytest.mark.parametrize("metric", METRICS)
def test_identical_images_score_one(metric):
    gx, gm, _, _ = related_pairs(2)
    out = score_pairs(gx, gm, gx.clone(), gm.clone(), metric=metric)
    for key in ("full", "fg", "bg"):
        torch.testing.assert_close(out[key], torch.ones(2), atol=1e-5, rtol=0)


def _planted(kind: str):
    """Planted FM (same object, new background) or BM (same background, new object, same mask)."""
    m = disk(S / 2, S / 2, 42)  # ~18% of the frame
    bg_a, bg_b, obj_1, obj_2 = texture(1), texture(2), texture(3), texture(4)
    gen = bg_a * (1 - m) + obj_1 * m
    if kind == "FM":
        train = bg_b * (1 - m) + obj_1 * m
    else:
        train = bg_a * (1 - m) + obj_2 * m
    return gen, m, train, m.clone()


def test_pasted_object_gives_high_fg_low_bg():
    out = score_pairs(*_planted("FM"), metric=METRIC_REGION)
    assert out["fg"].item() > 0.95
    assert out["bg"].item() < 0.5


def test_new_object_in_same_mask_region_vs_masked_view():
    """BM: region mode keeps fg low; masked-view inflates it (the blanked area agrees)."""
    pair = _planted("BM")
    region = score_pairs(*pair, metric=METRIC_REGION)
    masked = score_pairs(*pair, metric=METRIC_MASKED_VIEW)
    assert region["bg"].item() > 0.95
    assert region["fg"].item() < 0.6
    assert masked["fg"].item() >= region["fg"].item() + 0.2
    assert masked["fg"].item() > 0.7


# ----------------------------------------------------------------------------- beta rule

@pytest.mark.parametrize("metric", METRICS)
def test_empty_masks_use_full_score_for_fg(metric):
    gx, _, tx, _ = related_pairs(2)
    zeros = torch.zeros(2, 1, S, S)
    out = score_pairs(gx, zeros, tx, zeros, metric=metric)
    assert out["fg_fallback"].all() and not out["bg_fallback"].any()
    torch.testing.assert_close(out["fg"], out["full"], atol=0, rtol=0)
    assert all(torch.isfinite(v.float()).all() for v in out.values())


@pytest.mark.parametrize("metric", METRICS)
def test_all_foreground_masks_use_full_score_for_bg(metric):
    gx, _, tx, _ = related_pairs(2)
    ones = torch.ones(2, 1, S, S)
    out = score_pairs(gx, ones, tx, ones, metric=metric)
    assert out["bg_fallback"].all() and not out["fg_fallback"].any()
    torch.testing.assert_close(out["bg"], out["full"], atol=0, rtol=0)
    assert torch.isfinite(out["fg"]).all()


def test_beta_rule_region_uses_overlap_masked_view_uses_either_mask():
    gx, _, tx, _ = related_pairs(1)
    left = torch.zeros(1, 1, S, S)
    left[..., : S // 2] = 1
    right = 1 - left  # disjoint halves: fg region m_G*m_T is empty, bg region too
    region = score_pairs(gx, left, tx, right, metric=METRIC_REGION)
    masked = score_pairs(gx, left, tx, right, metric=METRIC_MASKED_VIEW)
    assert region["fg_area"].item() == 0 and region["bg_area"].item() == 0
    assert region["fg_fallback"].item() and region["bg_fallback"].item()
    assert not masked["fg_fallback"].item() and not masked["bg_fallback"].item()


def test_empty_region_without_beta_is_finite():
    """beta=0 disables the rule: an empty region must still give a number, not NaN."""
    gx, _, tx, _ = related_pairs(2)
    tiny = torch.zeros(2, 1, S, S)
    tiny[:, :, 0, 0] = 1  # a corner pixel: gone after the valid crop at every scale
    for fn in (score_pairs, score_pair_loop):
        out = fn(gx, tiny, tx, tiny, beta=0.0)
        assert all(torch.isfinite(v.float()).all() for v in out.values())
        assert not out["fg_fallback"].any()


def test_invalid_inputs_raise_clear_errors():
    gx, gm, tx, tm = related_pairs(2)
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        score_pairs(gx * 2, gm, tx, tm)
    bad = gx.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="finite"):
        score_pairs(bad, gm, tx, tm)
    with pytest.raises(ValueError, match="aligned pairs"):
        score_pairs(gx, gm, tx[:1], tm[:1])
    with pytest.raises(ValueError, match="gen_idx out of range"):
        score_pairs(gx, gm, tx, tm, gen_idx=torch.tensor([5]), train_idx=torch.tensor([0]))
    with pytest.raises(ValueError, match="metric"):
        score_pairs(gx, gm, tx, tm, metric="ssim")


# ----------------------------------------------------------------------------- sizes

def test_minimum_side_formula():
    assert min_valid_side(11, 5) == 161
    assert min_valid_side(7, 3) == 25
    assert required_side(7, 3, METRIC_REGION) == 25
    assert required_side(7, 3, METRIC_MASKED_VIEW) == 97  # pytorch_msssim's fixed 4 downsamplings


@pytest.mark.parametrize("metric", METRICS)
def test_small_images_upsample_gives_finite_scores(metric):
    small = 64
    gx = F.interpolate(texture(5), size=(small, small), mode="bilinear", align_corners=False)
    tx = F.interpolate(texture(6), size=(small, small), mode="bilinear", align_corners=False)
    m = disk(small / 2, small / 2, 20, size=small)
    out = score_pairs(gx, m, tx, m, metric=metric, small_images="upsample")
    loop = score_pair_loop(gx, m, tx, m, metric=metric, small_images="upsample")
    for key in ("full", "fg", "bg"):
        assert torch.isfinite(out[key]).all()
        torch.testing.assert_close(out[key], loop[key], atol=1e-5, rtol=0)


def test_small_images_reject_names_sizes():
    x = torch.rand(1, 3, 64, 64)
    m = torch.ones(1, 1, 64, 64)
    with pytest.raises(ValueError, match=r"64 px.*minimum 161 px"):
        score_pairs(x, m, x, m, small_images="reject")
    with pytest.raises(ValueError, match=r"100 px.*minimum 161 px"):
        prepare_batch([np.zeros((40, 50, 3), np.uint8)], [np.zeros((40, 50), np.float32)], 100,
                      small_images="reject")


def test_prepare_batch_resizes_lanczos_and_bilinear():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(120, 90, 3), dtype=np.uint8)
    mask = np.zeros((120, 90), np.float32)
    mask[30:90, 20:70] = 1.0
    x, m = prepare_batch([img, Image.fromarray(img)], [mask, (mask * 255).astype(np.uint8)], 200)
    assert x.shape == (2, 3, 200, 200) and m.shape == (2, 1, 200, 200)
    want = np.asarray(Image.fromarray(img).resize((200, 200), Image.Resampling.LANCZOS))
    np.testing.assert_allclose(x[0].permute(1, 2, 0).numpy(), want / 255.0, atol=1e-6)
    torch.testing.assert_close(x[0], x[1])
    torch.testing.assert_close(m[0], m[1], atol=1e-6, rtol=0)
    assert 0 < float(m.mean()) < 1 and float(m.min()) >= 0 and float(m.max()) <= 1
    # bilinear leaves soft edges; nearest would not
    assert bool(((m > 0.01) & (m < 0.99)).any())
    small, _ = prepare_batch([img], [mask], 64)  # upsample: straight to the minimum side
    assert small.shape[-1] == 161


def test_prepare_batch_rejects_mismatched_mask():
    with pytest.raises(ValueError, match="does not match"):
        prepare_batch([np.zeros((40, 50, 3), np.uint8)], [np.zeros((50, 40), np.float32)], 200)
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        prepare_batch([np.zeros((40, 50, 3), np.uint8)], [np.full((40, 50), 2.0, np.float32)], 200)


# ----------------------------------------------------------------------------- view properties

@st.composite
def image_and_mask(draw):
    n = draw(st.integers(1, 2))
    h = draw(st.integers(2, 10))
    w = draw(st.integers(2, 10))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, h, w, generator=g)
    if draw(st.booleans()):
        m = (torch.rand(n, 1, h, w, generator=g) > 0.5).float()
    else:
        m = torch.rand(n, 1, h, w, generator=g)
    return x, m


@settings(max_examples=30, deadline=None)
@given(image_and_mask())
def test_views_properties(xm):
    x, m = xm
    full, fg, bg = make_views(x, m)
    assert torch.equal(full, x)
    outside = (m == 0).expand_as(x)
    inside = (m == 1).expand_as(x)
    assert bool((fg[outside] == 0).all())  # foreground view is black outside the mask
    assert bool((bg[inside] == 1).all())  # background view is white inside the mask
    torch.testing.assert_close(fg + bg - m, x, atol=1e-6, rtol=0)  # the views recombine
    assert fg.min() >= 0 and bg.max() <= 1 + 1e-6
    torch.testing.assert_close(foreground_view(x, m), fg)
    torch.testing.assert_close(background_view(x, m), bg)


def test_region_interior_erodes_by_the_band():
    from fbmem.jobs.core.region_similarity import region_interior, region_masks

    m = torch.zeros(1, 1, 21, 21)
    m[..., 5:16, 5:16] = 1.0
    assert region_interior(m, 2).sum() == 7 * 7  # the 11x11 square shrunk by 2 each side
    assert region_interior(m, 0) is m
    fg, bg = region_masks(m, m, 2)
    assert fg.sum() == 7 * 7 and bg.sum() == 21 * 21 - 15 * 15  # both regions lose a 2 px rim
    with pytest.raises(ValueError, match="edge band"):
        region_interior(m, -1)


@pytest.mark.parametrize("metric", METRICS)
def test_edge_band_batched_equals_loop_and_leaves_the_rim_out(metric):
    gx, gm, tx, tm = related_pairs(3)
    gi, ti = torch.tensor([0, 1, 2, 2]), torch.tensor([0, 1, 2, 0])
    ref = score_pair_loop(gx, gm, tx, tm, gen_idx=gi, train_idx=ti, metric=metric, edge_band=4)
    got = score_pairs(gx, gm, tx, tm, gen_idx=gi, train_idx=ti, metric=metric, edge_band=4)
    for key in ("full", "fg", "bg", "fg_area", "bg_area"):
        torch.testing.assert_close(got[key], ref[key], atol=1e-5, rtol=0)
    plain = score_pairs(gx, gm, tx, tm, gen_idx=gi, train_idx=ti, metric=metric)
    torch.testing.assert_close(got["full"], plain["full"], atol=0, rtol=0)  # the full view is untouched
    if metric == METRIC_REGION:  # both regions shrink
        assert bool((got["fg_area"] < plain["fg_area"]).all()) and bool((got["bg_area"] < plain["bg_area"]).all())
    else:  # masked-view has no regions: the band changes no score
        for key in ("fg", "bg"):
            torch.testing.assert_close(got[key], plain[key], atol=0, rtol=0)


def test_edge_band_keeps_an_exact_copy_perfect():
    """The band only narrows where the maps are averaged: the views stay X * m, so a copy with
    the same mask still scores 1 (blackening the band in one view would not)."""
    _, _, tx, tm = related_pairs(1)
    got = score_pairs(tx, tm, tx, tm, edge_band=6)
    for key in ("full", "fg", "bg"):
        assert float(got[key][0]) == pytest.approx(1.0, abs=1e-5)


def test_edge_band_rescues_a_soft_edged_copy():
    """A generation that is the training image blurred (soft object edge), with its mask's edge
    set a few pixels off: leaving the rim out raises the foreground score toward the copy's."""
    gx, gm, tx, tm = related_pairs(1)
    soft = F.avg_pool2d(tx, 5, stride=1, padding=2)
    off = F.max_pool2d(tm, 5, stride=1, padding=2)  # the segmenter's edge 2 px outside the truth
    plain = score_pairs(soft, off, tx, tm)
    banded = score_pairs(soft, off, tx, tm, edge_band=3)
    assert float(banded["fg"][0]) > float(plain["fg"][0])
