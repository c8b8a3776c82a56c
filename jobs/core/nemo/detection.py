"""NeMo detection (SPEC.md section 6): noise differences at t_1 and their MS-SSIM.

- noise differences at t_1 (`initial_latents`, `ddim_t1`, `noise_difference`), min-max scaled;
- detection (`detection`): m_i = max_{j != i} MS-SSIM(delta_i, delta_j), retained = m_i > threshold;
- blocking effect s(B) (`blocking_scores`): max over retained samples of MS-SSIM(delta_i, delta_i^B);
- `masks_for_sets`: per-sample channel masks so many candidate sets share one UNet call.

MS-SSIM (`MsSsimSettings`, `nemo.detect_metric`):
- `torchmetrics` (default, the reference's): torchmetrics 1.3.2's multi-scale SSIM with
  kernel_size=11, betas=(0.33,)*3 and data_range=None, as msssim.py reproduces it; detection
  scores all pairs as one reference call, and each candidate set's retained samples are one
  reference call, because with data_range=None the range at each scale is taken over the call.
- `pytorch-msssim`: the former score, `region_ms_ssim` of jobs/core/region_similarity.py with no
  region (pytorch_msssim's `ms_ssim` step for step) with data range 1 and weights 1/n: not the
  reference's, kept to compare with earlier results.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fbmem.jobs.core.nemo.hooks import channel_scales
from fbmem.jobs.core.nemo.msssim import SIGMA, gaussian_size, tm_min_side, tm_ms_ssim
from fbmem.jobs.core.nemo.numerics import NATIVE, autocast_for, compute_dtype
from fbmem.jobs.core.region_similarity import min_valid_side, region_ms_ssim

METRIC_TORCHMETRICS = "torchmetrics"
METRIC_PYTORCH_MSSSIM = "pytorch-msssim"
METRICS = (METRIC_TORCHMETRICS, METRIC_PYTORCH_MSSSIM)


def initial_latents(n: int, shape: Sequence[int], seed: int = 1) -> torch.Tensor:
    """x_T for n samples: torch.randn((n, C, h, w), generator=torch.manual_seed(seed)) on the CPU.

    A fresh CPU generator seeded with `seed` draws exactly what `torch.manual_seed(seed)` (the
    reference's call) does, without resetting the process-wide RNG as a side effect.
    """
    if n < 1:
        raise ValueError(f"need at least one latent, got n={n}")
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    return torch.randn((n, *shape), generator=g, device="cpu", dtype=torch.float32)


def ddim_t1(scheduler_config: Mapping, steps: int = 50, index: int = 1) -> int:
    """t_1: timestep number `index` of the `steps`-step DDIM schedule of this model's scheduler."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(dict(scheduler_config))
    sched.set_timesteps(steps)
    if not 0 <= index < len(sched.timesteps):
        raise ValueError(f"timestep index {index} outside the {steps}-step DDIM schedule")
    return int(sched.timesteps[index])


def minmax_scale(delta: torch.Tensor) -> torch.Tensor:
    """Min-max scale [N, C, h, w] to [0, 1] per sample and channel.

    A constant channel (max == min) becomes 0 instead of the 0/0 NaN the plain formula gives.
    """
    lo = delta.amin(dim=(-2, -1), keepdim=True)
    hi = delta.amax(dim=(-2, -1), keepdim=True)
    rng = hi - lo
    return torch.where(rng > 0, (delta - lo) / torch.where(rng > 0, rng, 1), torch.zeros_like(delta))


@torch.no_grad()
def noise_difference(
    unet: torch.nn.Module,
    latents: torch.Tensor,
    t1: int,
    cond_embeddings: torch.Tensor,
    scales: Mapping[int, torch.Tensor] | None = None,
    numerics: str = NATIVE,
) -> torch.Tensor:
    """delta = eps(x_T, t_1, c_p) - x_T, conditional branch only, min-max scaled; float32 on the UNet's device.

    One UNet call on the whole batch. `cond_embeddings` is [1, T, D] (broadcast) or [N, T, D];
    `scales` are per-sample channel multipliers ([N, C] per layer, see neuron_hooks.channel_scales).
    DDIM's init_noise_sigma is 1 and its scale_model_input is the identity, so x_T goes in as is.
    `numerics` (numerics.py): `autocast` on a GPU runs fp32 weights under fp16 autocast with x_T in
    fp32 (the reference's); `native` casts x_T to the weights' dtype.
    """
    p = next(unet.parameters())
    dtype = compute_dtype(unet, numerics)
    x = latents.to(device=p.device, dtype=dtype)
    n = x.shape[0]
    e = cond_embeddings.to(device=p.device, dtype=dtype)
    if e.shape[0] == 1 and n > 1:
        e = e.expand(n, *e.shape[1:])
    elif e.shape[0] != n:
        raise ValueError(f"{e.shape[0]} text embeddings for {n} latents")
    t = torch.tensor(t1, device=p.device)
    with autocast_for(unet, numerics):
        if scales:
            with channel_scales(unet, scales):
                eps = unet(x, t, encoder_hidden_states=e).sample
        else:
            eps = unet(x, t, encoder_hidden_states=e).sample
    return minmax_scale(eps.float() - x.float())


# ============================================================================ MS-SSIM on deltas


def min_detect_side(win_size: int, n_scales: int, metric: str = METRIC_TORCHMETRICS) -> int:
    """The smallest side `metric` can score at: 44 for torchmetrics at 11 / 3 scales (its own size
    check, side // (scales-1)**2 > win - 1, and a whole window at the last scale), 41 for
    pytorch-msssim-style scoring (side > (win-1) * 2**(scales-1))."""
    if metric == METRIC_TORCHMETRICS:
        return tm_min_side(win_size, n_scales)
    if metric == METRIC_PYTORCH_MSSSIM:
        return min_valid_side(win_size, n_scales)
    raise ValueError(f"nemo.detect_metric must be one of {METRICS}, got {metric!r}")


def detect_side(h: int, w: int, *, win_size: int, n_scales: int, min_side: int = 0,
                metric: str = METRIC_TORCHMETRICS) -> int:
    """The smaller side deltas are scored at.

    Deltas smaller than the metric needs (`min_detect_side`; tiny models: 16 x 16 latents) are
    upsampled to `min_side`, or to that minimum when min_side is 0; a min_side below the minimum is
    an error, because scoring there would mean a window larger than the coarsest scale. SD 1.4's
    64 x 64 latents are scored as they are.
    """
    need = min_detect_side(win_size, n_scales, metric)
    if min_side and min_side < need:
        raise ValueError(
            f"nemo.detect_min_side={min_side} is below the {need} px that {n_scales}-scale MS-SSIM with "
            f"window {win_size} ({metric}) needs; use 0 (the minimum) or at least {need}"
        )
    target = max(min_side, need)
    return min(h, w) if min(h, w) >= target else target


def upsample_deltas(delta: torch.Tensor, side: int) -> torch.Tensor:
    """Bilinear upsampling so the smaller side is `side` (values stay in [0, 1]: convex weights)."""
    h, w = delta.shape[-2:]
    if min(h, w) >= side:
        return delta
    f = side / min(h, w)
    size = (max(side, round(h * f)), max(side, round(w * f)))
    return F.interpolate(delta, size=size, mode="bilinear", align_corners=False)


@dataclass(frozen=True)
class MsSsimSettings:
    """SPEC 6 detection MS-SSIM: window 11, three scales, deltas upsampled if small.

    `metric` torchmetrics (default): torchmetrics 1.3.2 with data_range=None and every scale's
    exponent `beta` (ref 0.33); its Gaussian window comes from sigma 1.5 (11 taps), so `win_size`
    must be 11 there. `metric` pytorch-msssim: the former score, data range 1, weights 1/n_scales.
    """

    win_size: int = 11
    n_scales: int = 3
    min_side: int = 0
    metric: str = METRIC_TORCHMETRICS
    beta: float = 0.33

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ValueError(f"nemo.detect_metric must be one of {METRICS}, got {self.metric!r}")
        if self.metric == METRIC_TORCHMETRICS and self.win_size != gaussian_size(SIGMA):
            raise ValueError(
                f"nemo.detect_win_size={self.win_size}: torchmetrics' Gaussian window is set by sigma {SIGMA} "
                f"({gaussian_size(SIGMA)} taps) and its kernel_size only enters a size check, so only "
                f"{gaussian_size(SIGMA)} reproduces it; use detect_metric=pytorch-msssim for another window"
            )

    @property
    def weights(self) -> list[float]:
        """Per-scale exponents: (beta,) * n for torchmetrics, 1/n each for pytorch-msssim."""
        if self.metric == METRIC_TORCHMETRICS:
            return [float(self.beta)] * self.n_scales
        return [1.0 / self.n_scales] * self.n_scales

    def prepare(self, delta: torch.Tensor) -> torch.Tensor:
        side = detect_side(*delta.shape[-2:], win_size=self.win_size, n_scales=self.n_scales,
                           min_side=self.min_side, metric=self.metric)
        return upsample_deltas(delta.float(), side)

    def score(self, a: torch.Tensor, b: torch.Tensor, group_size: int | None = None) -> torch.Tensor:
        """MS-SSIM per pair of prepared deltas [N, C, H, W] -> [N].

        torchmetrics: consecutive groups of `group_size` pairs (None: all N) are one reference call
        each, sharing its per-scale data range. pytorch-msssim: pairs are independent.
        """
        if self.metric == METRIC_TORCHMETRICS:
            return tm_ms_ssim(a, b, group_size=group_size, kernel_size=self.win_size, betas=self.weights)
        return region_ms_ssim(a, b, None, win_size=self.win_size, weights=self.weights, data_range=1.0)


@dataclass
class Detection:
    m: torch.Tensor  # [n] max similarity of each sample to another one
    pairwise: torch.Tensor  # [n, n] symmetric, diagonal 1
    retained: torch.Tensor  # [n] bool, m > threshold
    score: float  # max_i m_i
    mean: float  # mean pairwise similarity over i < j

    @property
    def memorized(self) -> bool:
        return bool(self.retained.any())


def detection(delta: torch.Tensor, *, threshold: float, ms: MsSsimSettings) -> Detection:
    """m_i = max_{j != i} MS-SSIM(delta_i, delta_j); all n(n-1)/2 pairs in one MS-SSIM call.

    Pairs (i, j), i < j, in torch.combinations order, preds delta_i and target delta_j: the
    reference's one call (which fixes the torchmetrics data range at every scale).
    """
    n = delta.shape[0]
    if n < 2:
        raise ValueError("detection needs at least 2 noise differences")
    d = ms.prepare(delta)
    i, j = torch.triu_indices(n, n, offset=1)
    sim = ms.score(d[i.to(d.device)], d[j.to(d.device)]).float().cpu()
    pw = torch.ones(n, n)
    pw[i, j] = sim
    pw[j, i] = sim
    off = pw.masked_fill(torch.eye(n, dtype=torch.bool), float("-inf"))
    m = off.amax(dim=1)
    return Detection(m=m, pairwise=pw, retained=m > threshold, score=float(m.max()), mean=float(sim.mean()))


def blocking_scores(ref: torch.Tensor, blocked: torch.Tensor, *, ms: MsSsimSettings) -> torch.Tensor:
    """s(B) per candidate: ref [r, C, h, w] (retained, unblocked), blocked [m * r, ...] -> [m].

    Row c * r + i of `blocked` is retained sample i under candidate set c. Each candidate's r pairs
    are scored as one reference call (preds: the unblocked deltas, target: the blocked ones).
    """
    r = ref.shape[0]
    if blocked.shape[0] % r:
        raise ValueError(f"{blocked.shape[0]} blocked deltas are not a multiple of {r} retained samples")
    m = blocked.shape[0] // r
    a = ms.prepare(ref.to(blocked.device)).repeat(m, 1, 1, 1)
    sim = ms.score(a, ms.prepare(blocked), group_size=r).float()
    return sim.view(m, r).amax(dim=1).cpu()


def masks_for_sets(
    sets: Sequence[Mapping[int, Sequence[int]]], widths: Mapping[int, int], repeat: int, alpha: float = 0.0
) -> dict[int, torch.Tensor]:
    """channel_scales masks for candidate sets, each repeated for `repeat` consecutive samples.

    Layers blocked by no candidate get no mask (no hook, no cost).
    """
    out: dict[int, torch.Tensor] = {}
    for idx, width in widths.items():
        if not any(s.get(idx) for s in sets):
            continue
        mask = torch.ones(len(sets), width)
        for c, s in enumerate(sets):
            chans = list(s.get(idx, ()))
            if chans:
                mask[c, torch.as_tensor(chans, dtype=torch.long)] = alpha
        out[idx] = mask.repeat_interleave(repeat, dim=0)
    return out
