"""NeMo's MS-SSIM (SPEC.md section 6): torchmetrics 1.3.2's multi-scale SSIM, batched over calls.

The reference scores noise differences with torchmetrics 1.3.2 (the version it pins):
`multiscale_structural_similarity_index_measure(preds, target, reduction='none', kernel_size=11,
betas=(0.33, 0.33, 0.33))`, everything else at its default. `tm_ms_ssim` computes exactly that
(same operations in the same order; tested against torchmetrics 1.3.2 itself to 1e-6), without
importing torchmetrics, and for many reference calls at once. What that call does, step by step:

- Gaussian window from sigma = 1.5: `int(3.5 * sigma + 0.5) * 2 + 1` = 11 taps; `kernel_size` only
  enters the size check (with a Gaussian window torchmetrics ignores it otherwise). The 2-d kernel
  is the outer product of the 1-d one, applied per channel to the reflect-padded images and the
  border cropped again, i.e. a valid convolution.
- data_range None: at EVERY scale the range is `max(preds.max() - preds.min(), target.max() -
  target.min())`, taken over the whole batch of the call from the images as pooled to that
  scale. C1 = (0.01 * range)**2 and C2 = (0.03 * range)**2 therefore shrink at coarser scales,
  and depend on which images share the call: the reference scores all n(n-1)/2 detection pairs in
  one call, and the r retained samples of one candidate set in one call. `group_size` reproduces
  that: consecutive groups of `group_size` rows each get the range of their own group.
- per image: the SSIM map (last scale) and the contrast-structure map (other scales) are averaged
  over channels AND pixels together, then `normalize='relu'` (the default) clips them at 0, then
  each scale's value is raised to its beta and the scales are multiplied. The betas are not
  normalized (0.33 * 3 = 0.99).
- scales: 2 x 2 average pooling between scales (floor).
- size check (torchmetrics raises): side >= 2**len(betas) and side // max(1, len(betas)-1)**2 >
  kernel_size - 1; also the last scale must hold one whole window (else torchmetrics averages an
  empty map: NaN). 44 px for 11 / 3 scales; `tm_min_side`.

pytorch-msssim's `ms_ssim` (SPEC section 1, FB-Mem labels) differs: data range fixed (1), C1/C2 the
same at every scale, separable filter, weights normalized, the channel mean taken per channel
before the exponents. On noise differences that moves detection scores by 0.01-0.05.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

REFERENCE_BETAS: tuple[float, ...] = (0.33, 0.33, 0.33)
SIGMA = 1.5
K1, K2 = 0.01, 0.03


def gaussian_size(sigma: float = SIGMA) -> int:
    """torchmetrics' Gaussian window for `sigma` (11 for 1.5)."""
    return int(3.5 * sigma + 0.5) * 2 + 1


def tm_min_side(kernel_size: int = 11, n_scales: int = 3, sigma: float = SIGMA) -> int:
    """Smallest image side torchmetrics 1.3.2 accepts and scores without an empty last scale."""
    if n_scales < 1:
        raise ValueError(f"need at least one MS-SSIM scale, got {n_scales}")
    div = max(1, n_scales - 1) ** 2
    side = max(2 ** n_scales, (kernel_size - 1) * div + div)  # side // div > kernel_size - 1
    win = gaussian_size(sigma)
    while True:
        s = side
        for _ in range(n_scales - 1):
            s //= 2
        if s >= win:
            return side
        side += 1


def check_size(h: int, w: int, kernel_size: int, n_scales: int, sigma: float = SIGMA) -> None:
    """torchmetrics' own size errors, plus the empty-last-scale case it would turn into NaN."""
    need = tm_min_side(kernel_size, n_scales, sigma)
    if min(h, w) < need:
        raise ValueError(
            f"{h} x {w} images are too small for {n_scales}-scale MS-SSIM (torchmetrics 1.3.2, kernel "
            f"{kernel_size}, sigma {sigma}): the side must be at least {need}"
        )


def _gaussian_kernel(channels: int, size: int, sigma: float, dtype: torch.dtype, device) -> torch.Tensor:
    """torchmetrics.functional.image.utils._gaussian_kernel_2d, same operations."""
    dist = torch.arange(start=(1 - size) / 2, end=(1 + size) / 2, step=1, dtype=dtype, device=device)
    gauss = torch.exp(-torch.pow(dist / sigma, 2) / 2)
    g = (gauss / gauss.sum()).unsqueeze(dim=0)
    return torch.matmul(g.t(), g).expand(channels, 1, size, size)


def _group_range(x: torch.Tensor, groups: int) -> torch.Tensor:
    """max - min over each group of consecutive rows -> [groups]."""
    v = x.reshape(groups, -1)
    return v.amax(dim=1) - v.amin(dim=1)


def _sim_cs(x: torch.Tensor, y: torch.Tensor, groups: int, kernel: torch.Tensor, pad: int,
            k1: float, k2: float) -> tuple[torch.Tensor, torch.Tensor]:
    """torchmetrics' _ssim_update(..., data_range=None, return_contrast_sensitivity=True), per group."""
    n = x.shape[0]
    data_range = torch.maximum(_group_range(x, groups), _group_range(y, groups))
    c1 = torch.pow(k1 * data_range, 2).repeat_interleave(n // groups).view(n, 1, 1, 1)
    c2 = torch.pow(k2 * data_range, 2).repeat_interleave(n // groups).view(n, 1, 1, 1)
    dtype = x.dtype
    xp = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    yp = F.pad(y, (pad, pad, pad, pad), mode="reflect")
    inputs = torch.cat((xp, yp, xp * xp, yp * yp, xp * yp))
    out = F.conv2d(inputs, kernel, groups=x.shape[1]).split(n)
    mu_x_sq = out[0].pow(2)
    mu_y_sq = out[1].pow(2)
    mu_xy = out[0] * out[1]
    sigma_x_sq = torch.clamp(out[2] - mu_x_sq, min=0.0)
    sigma_y_sq = torch.clamp(out[3] - mu_y_sq, min=0.0)
    sigma_xy = out[4] - mu_xy
    upper = 2 * sigma_xy.to(dtype) + c2
    lower = (sigma_x_sq + sigma_y_sq).to(dtype) + c2
    ssim_full = ((2 * mu_xy + c1) * upper) / ((mu_x_sq + mu_y_sq + c1) * lower)
    ssim = ssim_full[..., pad:-pad, pad:-pad]
    cs = (upper / lower)[..., pad:-pad, pad:-pad]
    return ssim.reshape(n, -1).mean(-1), cs.reshape(n, -1).mean(-1)


def tm_ms_ssim(
    preds: torch.Tensor,
    target: torch.Tensor,
    *,
    group_size: int | None = None,
    kernel_size: int = 11,
    sigma: float = SIGMA,
    betas: Sequence[float] = REFERENCE_BETAS,
    k1: float = K1,
    k2: float = K2,
) -> torch.Tensor:
    """MS-SSIM per pair [N], as torchmetrics 1.3.2 computes it with data_range=None, normalize='relu'.

    `group_size` g (a divisor of N): rows [c*g, (c+1)*g) are one torchmetrics call (their data
    range is shared, at every scale). None: all N rows are one call. Row i of the result equals
    `multiscale_structural_similarity_index_measure(preds[c*g:(c+1)*g], target[...],
    reduction='none', kernel_size=kernel_size, sigma=sigma, betas=tuple(betas))[i - c*g]`.
    """
    if preds.shape != target.shape or preds.dim() != 4:
        raise ValueError(f"expected two [N, C, H, W] tensors of one shape, got {tuple(preds.shape)} and "
                         f"{tuple(target.shape)}")
    if kernel_size % 2 == 0 or kernel_size <= 0:
        raise ValueError(f"kernel_size must be a positive odd number, got {kernel_size}")
    betas = tuple(float(b) for b in betas)
    n = preds.shape[0]
    g = n if group_size is None else int(group_size)
    if g < 1 or n % g:
        raise ValueError(f"{n} pairs do not split into groups of {group_size}")
    if target.dtype != preds.dtype:
        target = target.to(preds.dtype)
    check_size(*preds.shape[-2:], kernel_size, len(betas), sigma)
    size = gaussian_size(sigma)
    kernel = _gaussian_kernel(preds.shape[1], size, sigma, preds.dtype, preds.device)
    pad = (size - 1) // 2
    x, y = preds, target
    mcs: list[torch.Tensor] = []
    sim = None
    for s in range(len(betas)):
        sim, cs = _sim_cs(x, y, n // g, kernel, pad, k1, k2)
        mcs.append(torch.relu(cs))
        sim = torch.relu(sim)
        if s < len(betas) - 1:
            x, y = F.avg_pool2d(x, (2, 2)), F.avg_pool2d(y, (2, 2))
    mcs[-1] = sim
    stack = torch.stack(mcs)
    b = torch.tensor(betas, device=stack.device).view(-1, 1)
    return torch.prod(stack ** b, dim=0)
