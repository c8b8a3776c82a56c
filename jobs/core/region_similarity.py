"""Region similarity (SPEC.md section 1): MS-SSIM of full / foreground / background views.

Why this exists: pytorch-msssim averages its SSIM and contrast-structure maps over the whole
frame, so the blanked part of a masked view (identical black or white in both images) counts as
perfect agreement and inflates the score (TOY.md: the masked foreground view scored 0.86-0.94 for
unrelated images). The `region` metric reuses pytorch-msssim's own Gaussian window and filter, but
averages the per-scale maps over the region's pixels only; `masked-view` keeps the reference's
plain `ms_ssim` of the views so published numbers can be reproduced.

Entry points:
- `prepare_batch`: decode-side resize to S x S (Lanczos images, bilinear masks).
- `score_pairs`: the batched scorer (all three views of a chunk of pairs in one call).
- `score_pair_loop`: the reference-style loop (one `ms_ssim` call per view per pair); the
  benchmark baseline and the yardstick the batched path is tested against.
- `region_ms_ssim`: the definition of the region metric, written like `pytorch_msssim.ms_ssim`.

Pairs: by default pair i is (gen i, train i). Pass `gen_idx` / `train_idx` (int tensors of equal
length) to score many candidates per generation without copying the generation's tensor per
candidate: within a call the batched path builds each distinct image's views and filtered means
(and variances, when shared enough) once and computes only the cross terms per pair. Order pairs
by generation so a generation's candidates fall in the same call.

How the batched path is fast (bench/score.py, 2-core CPU, 512 px): the three views of an image
are packed side by side in the channels (9 channels), so one channels-last depthwise Gaussian
filter call covers all views; that convolution was ~8x faster per image than pytorch-msssim's
NCHW 3-channel call, which dominates the per-pair loop. On the CPU a call holds only as many pairs
as fit in the CPU block: CPU_BLOCK_BYTES (1 pair at 512 px) with glibc's default allocator, where
bigger blocks were slower, and CPU_BLOCK_BYTES_RETAINED once the process keeps freed memory
(jobs/runtime/cpu_allocator.py; the caller passes `cpu_block_bytes`), where a whole chunk fits and its generations' statistics are shared.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from pytorch_msssim import ms_ssim
from pytorch_msssim.ssim import _fspecial_gauss_1d, gaussian_filter

METRIC_REGION = "region"
METRIC_MASKED_VIEW = "masked-view"
Metric = Literal["region", "masked-view"]
SmallImages = Literal["upsample", "reject"]

DEFAULT_WEIGHTS: tuple[float, ...] = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
DATA_RANGE = 1.0
K = (0.01, 0.03)  # pytorch-msssim's default SSIM constants
# A region whose weight at some scale sums to less than this (in pixels) carries no information
# there; that scale then falls back to the frame mean instead of dividing by ~0 (never NaN).
MIN_REGION_WEIGHT = 1e-6
# pytorch_msssim.ms_ssim asserts side > (win-1) * 2**4 whatever the number of weights.
_MSSSIM_FIXED_DOWNSAMPLINGS = 4

ImageLike = Image.Image | np.ndarray
# On the CPU a call holds at most this many bytes of packed views (pairs x 3 views x C x H x W x 4).
# PyTorch has no CPU caching allocator: glibc hands big blocks back to the OS and every new block
# is page-faulted in again, which cost more than batching saved (measured at 512 px, 1 thread,
# default glibc: 1 pair per call 86 ms/pair, 3 pairs 109, 16 pairs 190, of which 28 / 49 / 121 ms
# were system time). CUDA's caching allocator has no such cost: there a call takes the whole chunk.
CPU_BLOCK_BYTES = 16 * 2**20
# Once cpu_allocator.retain_freed_memory() has run, freed blocks are reused without page faults
# and 48-400 MB blocks ran at the same ~30 ms/pair (vs 40 ms at 16 MB): a 16-pair chunk fits.
CPU_BLOCK_BYTES_RETAINED = 256 * 2**20


# ----------------------------------------------------------------------------- sizes

def min_valid_side(win_size: int, n_scales: int) -> int:
    """Smallest side for which every scale still fits one whole (valid) Gaussian window.

    Each of the n_scales-1 downsamplings halves the side (rounding up), and the last scale must be
    at least win_size wide: side > (win_size - 1) * 2**(n_scales - 1). 161 at 11 / 5 scales.
    """
    if win_size < 1 or win_size % 2 == 0:
        raise ValueError(f"win_size must be a positive odd number, got {win_size}")
    if n_scales < 1:
        raise ValueError(f"need at least one MS-SSIM scale weight, got {n_scales}")
    return (win_size - 1) * 2 ** (n_scales - 1) + 1


def required_side(win_size: int, n_scales: int, metric: Metric = METRIC_REGION) -> int:
    """Minimum side for `metric`; masked-view calls pytorch_msssim.ms_ssim, which has its own floor."""
    side = min_valid_side(win_size, n_scales)
    if metric == METRIC_MASKED_VIEW:
        side = max(side, (win_size - 1) * 2**_MSSSIM_FIXED_DOWNSAMPLINGS + 1)
    return side


def resolve_side(size: int, *, small_images: SmallImages = "upsample", win_size: int = 11,
                 n_scales: int = len(DEFAULT_WEIGHTS), metric: Metric = METRIC_REGION) -> int:
    """The side images are scored at: `size`, or the minimum valid side when `size` is too small.

    `upsample` scores too-small inputs at the minimum valid side (the finest MS-SSIM can measure);
    `reject` raises, so no input is silently scored by a window larger than its coarsest scale.
    """
    need = required_side(win_size, n_scales, metric)
    if size >= need:
        return size
    if small_images == "upsample":
        return need
    if small_images == "reject":
        raise ValueError(
            f"image side {size} px is below the minimum {need} px for {n_scales}-scale MS-SSIM "
            f"with window {win_size} (metric {metric}); use small_images='upsample' or a larger size"
        )
    raise ValueError(f"small_images must be 'upsample' or 'reject', got {small_images!r}")


# ----------------------------------------------------------------------------- inputs

def _to_rgb(image: ImageLike, i: int) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise ValueError(f"image {i}: numpy images must be uint8, got {image.dtype}")
        if image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (3, 4)):
            return Image.fromarray(image).convert("RGB")
        raise ValueError(f"image {i}: expected an HxW or HxWx3 array, got shape {image.shape}")
    raise ValueError(f"image {i}: expected a PIL image or a uint8 numpy array, got {type(image).__name__}")


def _to_float_mask(mask: np.ndarray, i: int, hw: tuple[int, int]) -> np.ndarray:
    """Float mask in [0,1]; uint8 masks are read as 255 = foreground (the mask_png convention)."""
    if not isinstance(mask, np.ndarray) or mask.ndim != 2:
        raise ValueError(f"mask {i}: expected a 2-d numpy array, got {getattr(mask, 'shape', type(mask))}")
    if mask.shape != hw:
        raise ValueError(f"mask {i}: shape {mask.shape} does not match its image (height, width) {hw}")
    if mask.dtype == np.bool_:
        m = mask.astype(np.float32)
    elif mask.dtype == np.uint8:
        m = mask.astype(np.float32) / 255.0
    elif np.issubdtype(mask.dtype, np.floating):
        m = mask.astype(np.float32)
    else:
        raise ValueError(f"mask {i}: unsupported dtype {mask.dtype} (use float in [0,1], bool or uint8)")
    if not np.isfinite(m).all() or m.min(initial=0.0) < 0.0 or m.max(initial=0.0) > 1.0:
        raise ValueError(f"mask {i}: values must be finite and in [0, 1]")
    return m


def prepare_batch(images: Sequence[ImageLike], masks: Sequence[np.ndarray], size: int, *,
                  small_images: SmallImages = "upsample", win_size: int = 11,
                  weights: Sequence[float] = DEFAULT_WEIGHTS,
                  metric: Metric = METRIC_REGION) -> tuple[torch.Tensor, torch.Tensor]:
    """Resize to S x S (SPEC 1: Lanczos for images, bilinear for masks) -> x [N,3,S,S], m [N,1,S,S].

    Resizing each original straight to the scored side (the minimum valid side when `size` is too
    small and small_images='upsample') avoids resampling twice.
    """
    if len(images) != len(masks):
        raise ValueError(f"got {len(images)} images but {len(masks)} masks")
    side = resolve_side(size, small_images=small_images, win_size=win_size,
                        n_scales=len(weights), metric=metric)
    xs = np.empty((len(images), side, side, 3), dtype=np.uint8)
    ms = np.empty((len(images), side, side), dtype=np.float32)
    for i, (image, mask) in enumerate(zip(images, masks)):
        rgb = _to_rgb(image, i)
        m = _to_float_mask(mask, i, (rgb.height, rgb.width))
        xs[i] = np.asarray(rgb.resize((side, side), Image.Resampling.LANCZOS))
        ms[i] = np.asarray(Image.fromarray(m).resize((side, side), Image.Resampling.BILINEAR))
    x = torch.from_numpy(xs).permute(0, 3, 1, 2).float().div_(255.0).contiguous()
    m = torch.from_numpy(ms).clamp_(0.0, 1.0).unsqueeze(1).contiguous()
    return x, m


# ----------------------------------------------------------------------------- views

def foreground_view(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Background painted black: only the object remains."""
    return x * m


def background_view(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Foreground painted white: only the scene remains."""
    return x * (1 - m) + m


def make_views(x: torch.Tensor, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(full, foreground, background) views of images x [N,C,H,W] with masks m [N,1,H,W]."""
    return x, foreground_view(x, m), background_view(x, m)


def _packed_views(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """[N, 3C, H, W] channels-last: full | foreground | background views, written in place.

    Same arithmetic as make_views (so the loop and the batched path see identical inputs), without
    the temporaries and the concatenation copy.
    """
    n, c, h, w = x.shape
    out = torch.empty((n, 3 * c, h, w), dtype=x.dtype, device=x.device,
                      memory_format=torch.channels_last)
    out[:, :c].copy_(x)
    torch.mul(x, m, out=out[:, c:2 * c])
    torch.mul(x, 1 - m, out=out[:, 2 * c:]).add_(m)
    return out


def region_interior(region: torch.Tensor, band: int) -> torch.Tensor:
    """The region [N,1,H,W] without the `band` pixels along its edge (grey-level erosion, a min
    filter, so soft masks stay soft); band 0 returns it unchanged: SPEC section 1 as written.

    Why: a window centred near a region's edge reaches across it, into pixels where the two views
    differ because the two MASKS differ (one view black or white there, the other not), not because
    the images do. On real photos at S = 512 that rim is a sliver of a large region; on small,
    blurry objects it decides the score. Toy model (64 px samples scored at S = 192, colour
    masks, 40 samples per group, each against its own group's 16 training images): a 6 px band
    raised the FM samples whose best foreground score reaches 0.8 from 9 to 21 and the BM samples
    whose best background score does from 15 to 21. Eroding the REGION (where both masks agree)
    rather than one mask leaves the views as SPEC defines them (X * m): blackening a band of the
    generation's view instead dropped exact copies' foreground score from 0.95 to 0.67.
    """
    if band < 0:
        raise ValueError(f"edge band must be >= 0 pixels, got {band}")
    if band == 0:
        return region
    k = 2 * band + 1  # separable: a k x 1 then a 1 x k min filter (k x k in one pass was 3x slower)
    neg = F.max_pool2d(-region, (k, 1), stride=1, padding=(band, 0))
    return -F.max_pool2d(neg, (1, k), stride=1, padding=(0, band))


def mask_interiors(m: torch.Tensor, band: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(inside of m, inside of 1 - m), each without its `band`-pixel rim: per image, so a batch
    erodes each distinct mask once instead of once per pair."""
    return region_interior(m, band), region_interior(1 - m, band)


def region_masks(m_gen: torch.Tensor, m_train: torch.Tensor, band: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Foreground region m_G*m_T and background region (1-m_G)(1-m_T): where both images agree,
    and with a band, at least `band` pixels inside both masks' edges (for 0/1 masks that is the
    region's own interior: the min filter of a product of 0/1 masks is the product of theirs)."""
    gf, gb = mask_interiors(m_gen, band)
    tf, tb = mask_interiors(m_train, band)
    return gf * tf, gb * tb


# ----------------------------------------------------------------------------- MS-SSIM maps

def _window(win_size: int, win_sigma: float, channels: int, like: torch.Tensor) -> torch.Tensor:
    win = _fspecial_gauss_1d(win_size, win_sigma).repeat([channels, 1, 1, 1])
    return win.to(like.device, dtype=like.dtype)


def _downsample(t: torch.Tensor) -> torch.Tensor:
    """The same 2x average pooling (odd sides padded) pytorch_msssim.ms_ssim applies per scale."""
    padding = [s % 2 for s in t.shape[2:]]
    return F.avg_pool2d(t, kernel_size=2, padding=padding)


def _crop_valid(t: torch.Tensor, win_size: int) -> torch.Tensor:
    """Crop a full-size map to the footprint of the 'valid' Gaussian convolution."""
    p = win_size // 2
    return t[..., p: t.shape[-2] - p, p: t.shape[-1] - p]


def _ssim_maps(X: torch.Tensor, Y: torch.Tensor, win: torch.Tensor,
               data_range: float = DATA_RANGE) -> tuple[torch.Tensor, torch.Tensor]:
    """pytorch_msssim.ssim._ssim, returning the SSIM and contrast-structure maps, not their means."""
    C1 = (K[0] * data_range) ** 2
    C2 = (K[1] * data_range) ** 2
    mu1 = gaussian_filter(X, win)
    mu2 = gaussian_filter(Y, win)
    mu1_sq = mu1.pow(2)
    mu2_sq = mu2.pow(2)
    mu1_mu2 = mu1 * mu2
    sigma1_sq = gaussian_filter(X * X, win) - mu1_sq
    sigma2_sq = gaussian_filter(Y * Y, win) - mu2_sq
    sigma12 = gaussian_filter(X * Y, win) - mu1_mu2
    cs_map = (2 * sigma12 + C2) / (sigma1_sq + sigma2_sq + C2)
    ssim_map = ((2 * mu1_mu2 + C1) / (mu1_sq + mu2_sq + C1)) * cs_map
    return ssim_map, cs_map


def _region_mean(maps: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """Per-channel mean of maps [N,C,h,w] weighted by weight [N,1,h,w] (None: the frame mean).

    Where the region has (almost) no weight at this scale the frame mean is used, so an empty
    region never yields NaN; whole-region degeneracy is handled by the beta rule on top.
    """
    if weight is None:
        return maps.mean(dim=(2, 3))
    wsum = weight.sum(dim=(1, 2, 3)).unsqueeze(1)  # [N,1]
    num = (maps * weight).sum(dim=(2, 3))  # torch's summation: 1e-7 accurate (a float32 bmm was 1e-5)
    return _safe_ratio(num, wsum, maps)


def _safe_ratio(num: torch.Tensor, wsum: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
    """num / wsum, or the frame mean of maps in rows whose region weight vanished."""
    ok = wsum > MIN_REGION_WEIGHT
    ratio = num / wsum.clamp_min(MIN_REGION_WEIGHT)
    if bool(ok.all()):
        return ratio
    return torch.where(ok, ratio, maps.mean(dim=(2, 3)))


def _combine_scales(mcs: list[torch.Tensor], ssim_last: torch.Tensor,
                    weights: Sequence[float]) -> torch.Tensor:
    """pytorch_msssim's combination: relu per scale, weighted product, mean over channels."""
    w = ssim_last.new_tensor(list(weights)).view(-1, 1, 1)
    stacked = torch.stack([torch.relu(c) for c in mcs] + [torch.relu(ssim_last)], dim=0)
    return torch.prod(stacked**w, dim=0).mean(dim=1)


def _check_side(h: int, w: int, win_size: int, n_scales: int) -> None:
    need = min_valid_side(win_size, n_scales)
    if min(h, w) < need:
        raise ValueError(f"image side {min(h, w)} px is below the minimum {need} px for "
                         f"{n_scales}-scale MS-SSIM with window {win_size}")


def region_ms_ssim(X: torch.Tensor, Y: torch.Tensor, region: torch.Tensor | None = None, *,
                   win_size: int = 11, win_sigma: float = 1.5,
                   weights: Sequence[float] = DEFAULT_WEIGHTS,
                   data_range: float = DATA_RANGE) -> torch.Tensor:
    """MS-SSIM [N] whose per-scale maps are averaged over `region` [N,1,H,W] (None: whole frame).

    Written step for step like pytorch_msssim.ms_ssim (same window, filter, pooling, relu and
    weighted product); the region is pooled with the images and cropped like the valid filter.
    With region None (or all ones) it equals ms_ssim.
    """
    if X.shape != Y.shape or X.dim() != 4:
        raise ValueError(f"expected two [N,C,H,W] tensors of equal shape, got {tuple(X.shape)} and {tuple(Y.shape)}")
    if region is not None and region.shape != (X.shape[0], 1, *X.shape[2:]):
        raise ValueError(f"region must be [N,1,H,W] = {(X.shape[0], 1, *X.shape[2:])}, got {tuple(region.shape)}")
    _check_side(X.shape[-2], X.shape[-1], win_size, len(weights))
    win = _window(win_size, win_sigma, X.shape[1], X)
    mcs: list[torch.Tensor] = []
    ssim_val = X.new_zeros(0)
    levels = len(weights)
    for i in range(levels):
        ssim_map, cs_map = _ssim_maps(X, Y, win, data_range)
        wmap = None if region is None else _crop_valid(region, win_size)
        if i < levels - 1:
            mcs.append(_region_mean(cs_map, wmap))
            X, Y = _downsample(X), _downsample(Y)
            region = None if region is None else _downsample(region)
        else:
            ssim_val = _region_mean(ssim_map, wmap)
    return _combine_scales(mcs, ssim_val, weights)


# ----------------------------------------------------------------------------- batched core

def _gather(t: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
    """Rows of t for each pair; None means the pairs are t's rows in order (no copy)."""
    return t if idx is None else t[idx]  # advanced indexing keeps channels-last, index_select does not


def _view_means(maps: torch.Tensor, region: torch.Tensor | None, n_views: int) -> torch.Tensor:
    """[Q, V, C] per-channel means of view-packed maps [Q, V*C, h, w].

    View 0, and every view when region is None, is averaged over the frame; view v >= 1 over
    region[:, v-1] [Q, V-1, h, w]. Where a region has (almost) no weight at this scale the frame
    mean is used, so an empty region never yields NaN (the beta rule handles it above).
    torch's own sum/mean keep these exact to ~1e-7; a float32 matrix product drifted by 1e-5.
    """
    q, vc = maps.shape[:2]
    c = vc // n_views
    if region is None:
        return maps.mean(dim=(2, 3)).reshape(q, n_views, c)
    out = [maps[:, :c].mean(dim=(2, 3))]
    for v in range(1, n_views):
        view = maps[:, v * c:(v + 1) * c]
        w = region[:, v - 1:v]
        wsum = w.sum(dim=(1, 2, 3)).unsqueeze(1)
        out.append(_safe_ratio((view * w).sum(dim=(2, 3)), wsum, view))
    return torch.stack(out, dim=1)


def _packed_ms_ssim(A: torch.Tensor, B: torch.Tensor, ia: torch.Tensor | None,
                    ib: torch.Tensor | None, region: torch.Tensor | None, *, n_views: int,
                    win_size: int, win_sigma: float, weights: Sequence[float],
                    data_range: float = DATA_RANGE) -> torch.Tensor:
    """MS-SSIM [Q, n_views] of pairs (A[ia[q]], B[ib[q]]), views packed along channels.

    A [a, V*C, H, W] holds each distinct generation's V views side by side in the channels (B
    likewise for training images); region [Q, V-1, H, W] weights views 1.. (view 0, and every
    view when region is None, is averaged over the frame). The depthwise Gaussian filter treats
    every channel alone, so packing views into channels is the same computation as stacking them
    in the batch, but channels-last convolution vectorises over channels: 9 channels ran ~2x
    faster than 3 and ~8x faster than NCHW on a 2-core CPU. Means are filtered once per distinct
    image; variances too when images are shared enough (else E[x^2 + y^2] is filtered per pair,
    one filter instead of two); the SSIM algebra runs in place.
    """
    C1 = (K[0] * data_range) ** 2
    C2 = (K[1] * data_range) ** 2
    cl = torch.channels_last
    A = A.contiguous(memory_format=cl)
    B = B.contiguous(memory_format=cl)
    q = A.shape[0] if ia is None else ia.numel()
    shared_var = A.shape[0] + B.shape[0] <= q  # two per-image filters cost less than one per pair
    win = _window(win_size, win_sigma, A.shape[1], A)
    levels = len(weights)
    mcs: list[torch.Tensor] = []
    ssim_val = A.new_zeros(0)
    for i in range(levels):
        last = i == levels - 1
        mu_a = gaussian_filter(A, win)
        mu_b = gaussian_filter(B, win)
        # No fused multiply-add (addcmul) below: with it, identical images stop scoring exactly
        # 1, because x*x + y*y would round differently from 2*x*y.
        xa, yb = _gather(A, ia), _gather(B, ib)
        tmp = xa * yb
        cs = gaussian_filter(tmp, win)  # E[xy]
        ma, mb = _gather(mu_a, ia), _gather(mu_b, ib)
        msq = ma * ma
        if shared_var:
            var_a = gaussian_filter(A * A, win).sub_(mu_a * mu_a)
            var_b = gaussian_filter(B * B, win).sub_(mu_b * mu_b)
            den = _gather(var_a, ia).add(_gather(var_b, ib)).add_(C2)
            del var_a, var_b
        else:
            sq = torch.mul(xa, xa)
            sq.add_(torch.mul(yb, yb, out=tmp))
            den = gaussian_filter(sq, win)  # E[x^2 + y^2]
            del sq
        del xa, yb, mu_a, mu_b, tmp
        mb_sq = mb * mb
        msq.add_(mb_sq)  # mu_x^2 + mu_y^2
        if not shared_var:
            den.sub_(msq).add_(C2)  # sigma_x^2 + sigma_y^2 + C2
        mu_ab = torch.mul(ma, mb, out=mb_sq)  # reuses mb_sq's buffer
        del ma, mb, mb_sq
        cs.sub_(mu_ab).mul_(2).add_(C2).div_(den)  # contrast-structure map
        del den
        if last:
            maps = mu_ab.mul_(2).add_(C1).div_(msq.add_(C1)).mul_(cs)  # SSIM map
        else:
            maps = cs
        del msq
        wmap = None if region is None else _crop_valid(region, win_size)
        means = _view_means(maps, wmap, n_views)
        del maps, cs, mu_ab
        if last:
            ssim_val = means
        else:
            mcs.append(means)
            A, B = _downsample(A), _downsample(B)
            region = None if region is None else _downsample(region)
    w_t = ssim_val.new_tensor(list(weights)).view(-1, 1, 1, 1)
    stacked = torch.relu(torch.stack(mcs + [ssim_val], dim=0))  # [levels, Q, V, C]
    return torch.prod(stacked**w_t, dim=0).mean(dim=-1)


# ----------------------------------------------------------------------------- scoring

def _in_unit_range(t: torch.Tensor) -> bool:
    """One min/max pass; NaN fails every comparison and inf is out of range, so no isfinite pass."""
    lo, hi = torch.aminmax(t)
    return bool(lo >= 0) and bool(hi <= 1)


def _check_pairs_inputs(gen_x: torch.Tensor, gen_m: torch.Tensor, train_x: torch.Tensor,
                        train_m: torch.Tensor, gen_idx: torch.Tensor | None,
                        train_idx: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    for name, x, m in (("gen", gen_x, gen_m), ("train", train_x, train_m)):
        if x.dim() != 4:
            raise ValueError(f"{name}_x must be [N,C,H,W], got {tuple(x.shape)}")
        if m.shape != (x.shape[0], 1, *x.shape[2:]):
            raise ValueError(f"{name}_m must be [N,1,H,W] = {(x.shape[0], 1, *x.shape[2:])}, got {tuple(m.shape)}")
        for what, t in ((f"{name}_x", x), (f"{name}_m", m)):
            if t.numel() and not _in_unit_range(t):
                raise ValueError(f"{what} values must be finite and in [0, 1] (data range 1)")
    if gen_x.shape[1:] != train_x.shape[1:]:
        raise ValueError(f"generation and training images differ in shape: {tuple(gen_x.shape[1:])} vs {tuple(train_x.shape[1:])}")
    if (gen_idx is None) != (train_idx is None):
        raise ValueError("pass both gen_idx and train_idx, or neither")
    if gen_idx is None:
        if gen_x.shape[0] != train_x.shape[0]:
            raise ValueError(f"aligned pairs need as many generations as training images, got {gen_x.shape[0]} and {train_x.shape[0]}")
        n = gen_x.shape[0]
        return torch.arange(n), torch.arange(n)
    gi = torch.as_tensor(gen_idx, dtype=torch.long).cpu().reshape(-1)
    ti = torch.as_tensor(train_idx, dtype=torch.long).cpu().reshape(-1)
    if gi.shape != ti.shape:
        raise ValueError(f"gen_idx and train_idx differ in length: {gi.numel()} vs {ti.numel()}")
    if gi.numel() and (gi.min() < 0 or gi.max() >= gen_x.shape[0]):
        raise ValueError(f"gen_idx out of range for {gen_x.shape[0]} generations")
    if ti.numel() and (ti.min() < 0 or ti.max() >= train_x.shape[0]):
        raise ValueError(f"train_idx out of range for {train_x.shape[0]} training images")
    return gi, ti


def _ensure_side(x: torch.Tensor, m: torch.Tensor, *, small_images: SmallImages, win_size: int,
                 n_scales: int, metric: Metric) -> tuple[torch.Tensor, torch.Tensor]:
    """Upsample (bilinear) tensors smaller than the minimum side, or reject them (see resolve_side)."""
    h, w = x.shape[-2:]
    side = resolve_side(min(h, w), small_images=small_images, win_size=win_size,
                        n_scales=n_scales, metric=metric)
    if side == min(h, w):
        return x, m
    scale = side / min(h, w)
    size = (max(side, int(np.ceil(h * scale))), max(side, int(np.ceil(w * scale))))
    x = F.interpolate(x, size=size, mode="bilinear", align_corners=False).clamp_(0, 1)
    m = F.interpolate(m, size=size, mode="bilinear", align_corners=False).clamp_(0, 1)
    return x, m


def _rows(t: torch.Tensor, idx: torch.Tensor, dev: torch.device) -> torch.Tensor:
    """t[idx] as float32 on dev; a run of consecutive indices is a view, not a copy."""
    lo = int(idx[0])
    if bool((idx == torch.arange(lo, lo + idx.numel())).all()):
        return t[lo:lo + idx.numel()].to(dev, torch.float32)
    return t[idx].to(dev, torch.float32)


def _areas(gm: torch.Tensor, tm: torch.Tensor, fg_r: torch.Tensor, bg_r: torch.Tensor) -> dict[str, torch.Tensor]:
    """Coverage fractions that drive the beta rule, per pair. fg_r, bg_r are the regions as scored
    (without the band), so a region with no interior left takes the full-image score."""
    return {
        "fg_area": fg_r.mean(dim=(1, 2, 3)),
        "bg_area": bg_r.mean(dim=(1, 2, 3)),
        "gen_fg_frac": gm.mean(dim=(1, 2, 3)),
        "train_fg_frac": tm.mean(dim=(1, 2, 3)),
    }


def _apply_beta(full: torch.Tensor, fg: torch.Tensor, bg: torch.Tensor,
                areas: dict[str, torch.Tensor], metric: Metric, beta: float) -> dict[str, torch.Tensor]:
    """SPEC 1 degenerate regions: a region too small to judge takes the full-image score."""
    if metric == METRIC_REGION:
        fg_fb = areas["fg_area"] < beta
        bg_fb = areas["bg_area"] < beta
    else:
        g, t = areas["gen_fg_frac"], areas["train_fg_frac"]
        fg_fb = (g < beta) | (t < beta)
        bg_fb = (g > 1 - beta) | (t > 1 - beta)
    return {
        "full": full,
        "fg": torch.where(fg_fb, full, fg),
        "bg": torch.where(bg_fb, full, bg),
        "fg_area": areas["fg_area"],
        "bg_area": areas["bg_area"],
        "fg_fallback": fg_fb,
        "bg_fallback": bg_fb,
    }


def _check_metric(metric: str, beta: float) -> None:
    if metric not in (METRIC_REGION, METRIC_MASKED_VIEW):
        raise ValueError(f"metric must be {METRIC_REGION!r} or {METRIC_MASKED_VIEW!r}, got {metric!r}")
    if not 0 <= beta < 0.5:
        raise ValueError(f"beta must be in [0, 0.5), got {beta}")


def _empty_result() -> dict[str, torch.Tensor]:
    z = torch.zeros(0)
    return {"full": z, "fg": z, "bg": z, "fg_area": z, "bg_area": z,
            "fg_fallback": z.bool(), "bg_fallback": z.bool()}


@torch.inference_mode()
def score_pairs(gen_x: torch.Tensor, gen_m: torch.Tensor, train_x: torch.Tensor,
                train_m: torch.Tensor, *, gen_idx: torch.Tensor | None = None,
                train_idx: torch.Tensor | None = None, metric: Metric = METRIC_REGION,
                beta: float = 0.03, win_size: int = 11, win_sigma: float = 1.5,
                weights: Sequence[float] = DEFAULT_WEIGHTS, chunk_size: int = 16,
                device: str | torch.device | None = None,
                small_images: SmallImages = "upsample",
                cpu_block_bytes: int | None = None, edge_band: int = 0) -> dict[str, torch.Tensor]:
    """Score (generation, training image) pairs; every value is a per-pair CPU tensor.

    Keys: full, fg, bg (MS-SSIM after the beta rule), fg_area, bg_area (coverage of the regions
    m_G*m_T and (1-m_G)(1-m_T)), fg_fallback, bg_fallback (the beta rule replaced the score by the
    full one). Pairs are (gen i, train i), or (gen gen_idx[q], train train_idx[q]) when indices are
    given. Each call on `device` (default: the inputs' device) scores all three views of up to
    chunk_size pairs at once, which bounds memory. On the CPU a call also keeps its largest tensor
    (pairs x 3 views x C x H x W float32) within cpu_block_bytes (None: CPU_BLOCK_BYTES, right for glibc's default allocator;
    a process that keeps freed memory passes runtime.cpu_allocator.default_cpu_block_bytes()).
    `edge_band` (pixels at the scored side, `region` metric only) leaves that rim along each
    region's edge out of it (`region_interior`); 0 is SPEC section 1 as written.
    """
    _check_metric(metric, beta)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    gi, ti = _check_pairs_inputs(gen_x, gen_m, train_x, train_m, gen_idx, train_idx)
    if gi.numel() == 0:
        return _empty_result()
    dev = torch.device(device) if device is not None else gen_x.device
    kw = dict(win_size=win_size, win_sigma=win_sigma, weights=weights)
    step = chunk_size
    if dev.type == "cpu":
        side = resolve_side(min(gen_x.shape[-2:]), small_images=small_images, win_size=win_size,
                            n_scales=len(weights), metric=metric)
        h, w = gen_x.shape[-2:]
        row_bytes = int(3 * gen_x.shape[1] * h * w * 4 * (side / min(h, w)) ** 2)
        block = CPU_BLOCK_BYTES if cpu_block_bytes is None else cpu_block_bytes
        step = max(1, min(chunk_size, block // row_bytes))
    outs: list[dict[str, torch.Tensor]] = []
    for start in range(0, gi.numel(), step):
        ug, inv_g = torch.unique(gi[start:start + step], return_inverse=True)
        ut, inv_t = torch.unique(ti[start:start + step], return_inverse=True)
        gx, gm = _ensure_side(_rows(gen_x, ug, dev), _rows(gen_m, ug, dev),
                              small_images=small_images, win_size=win_size,
                              n_scales=len(weights), metric=metric)
        tx, tm = _ensure_side(_rows(train_x, ut, dev), _rows(train_m, ut, dev),
                              small_images=small_images, win_size=win_size,
                              n_scales=len(weights), metric=metric)
        inv_g, inv_t = inv_g.to(dev), inv_t.to(dev)
        p = inv_g.numel()
        A, B = _packed_views(gx, gm), _packed_views(tx, tm)
        ia = None if gx.shape[0] == p and bool((inv_g == torch.arange(p, device=dev)).all()) else inv_g
        ib = None if tx.shape[0] == p and bool((inv_t == torch.arange(p, device=dev)).all()) else inv_t
        pgm, ptm = gm[inv_g], tm[inv_t]
        (gf, gb), (tf, tb) = mask_interiors(gm, edge_band), mask_interiors(tm, edge_band)
        fg_r, bg_r = gf[inv_g] * tf[inv_t], gb[inv_g] * tb[inv_t]
        region = torch.cat((fg_r, bg_r), dim=1) if metric == METRIC_REGION else None
        vals = _packed_ms_ssim(A, B, ia, ib, region, n_views=3, **kw)
        full, fg, bg = vals.unbind(dim=1)
        outs.append({k: v.cpu() for k, v in
                     _apply_beta(full, fg, bg, _areas(pgm, ptm, fg_r, bg_r), metric, beta).items()})
    return {k: torch.cat([o[k] for o in outs]) for k in outs[0]}


@torch.inference_mode()
def score_pair_loop(gen_x: torch.Tensor, gen_m: torch.Tensor, train_x: torch.Tensor,
                    train_m: torch.Tensor, *, gen_idx: torch.Tensor | None = None,
                    train_idx: torch.Tensor | None = None, metric: Metric = METRIC_REGION,
                    beta: float = 0.03, win_size: int = 11, win_sigma: float = 1.5,
                    weights: Sequence[float] = DEFAULT_WEIGHTS,
                    device: str | torch.device | None = None,
                    small_images: SmallImages = "upsample", edge_band: int = 0) -> dict[str, torch.Tensor]:
    """Reference-style scorer: one MS-SSIM call per view per pair (the baseline and yardstick).

    full (and masked-view fg/bg) use pytorch_msssim.ms_ssim itself; region fg/bg use
    `region_ms_ssim`. Same outputs and beta rule as `score_pairs`.
    """
    _check_metric(metric, beta)
    gi, ti = _check_pairs_inputs(gen_x, gen_m, train_x, train_m, gen_idx, train_idx)
    if gi.numel() == 0:
        return _empty_result()
    dev = torch.device(device) if device is not None else gen_x.device
    kw = dict(win_size=win_size, win_sigma=win_sigma, weights=list(weights))
    rows: list[dict[str, torch.Tensor]] = []
    for g, t in zip(gi.tolist(), ti.tolist()):
        gx, gm = _ensure_side(gen_x[g:g + 1].to(dev, torch.float32), gen_m[g:g + 1].to(dev, torch.float32),
                              small_images=small_images, win_size=win_size,
                              n_scales=len(weights), metric=metric)
        tx, tm = _ensure_side(train_x[t:t + 1].to(dev, torch.float32), train_m[t:t + 1].to(dev, torch.float32),
                              small_images=small_images, win_size=win_size,
                              n_scales=len(weights), metric=metric)
        full = ms_ssim(gx, tx, data_range=DATA_RANGE, size_average=False, **kw)
        g_fg, t_fg = foreground_view(gx, gm), foreground_view(tx, tm)
        g_bg, t_bg = background_view(gx, gm), background_view(tx, tm)
        fg_r, bg_r = region_masks(gm, tm, edge_band)
        if metric == METRIC_REGION:
            fg = region_ms_ssim(g_fg, t_fg, fg_r, **kw)
            bg = region_ms_ssim(g_bg, t_bg, bg_r, **kw)
        else:
            fg = ms_ssim(g_fg, t_fg, data_range=DATA_RANGE, size_average=False, **kw)
            bg = ms_ssim(g_bg, t_bg, data_range=DATA_RANGE, size_average=False, **kw)
        rows.append({k: v.cpu() for k, v in _apply_beta(full, fg, bg, _areas(gm, tm, fg_r, bg_r), metric, beta).items()})
    return {k: torch.cat([r[k] for r in rows]) for k in rows[0]}
