"""NeMo detection (SPEC.md section 6): noise differences, NeMo's MS-SSIM, detection and blocking scores.

NeMo's MS-SSIM is torchmetrics 1.3.2's with the reference's arguments (kernel_size=11,
betas=(0.33,)*3, data_range=None). fbmem computes it itself (jobs/core/nemo/msssim.py) and it is
checked here against torchmetrics 1.3.2 itself (a dev dependency pinned for these tests), called
exactly as the reference calls it, on random images and on real noise differences of a UNet.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from pytorch_msssim import ms_ssim

from fbmem.jobs.core.nemo.detection import (
    METRIC_PYTORCH_MSSSIM,
    MsSsimSettings,
    blocking_scores,
    ddim_t1,
    detect_side,
    detection,
    initial_latents,
    masks_for_sets,
    minmax_scale,
    noise_difference,
)
from fbmem.jobs.core.nemo.hooks import find_value_layers
from fbmem.jobs.core.nemo.msssim import tm_min_side, tm_ms_ssim
from fbmem.jobs.core.nemo.numerics import AUTOCAST, NATIVE, check_weights, uses_autocast
from fbmem.pipelines.diffusion_models import TinySpec, build_tiny_components

torch.set_num_threads(1)

torchmetrics = pytest.importorskip("torchmetrics")
REF_ARGS = {"reduction": "none", "kernel_size": 11, "betas": (0.33, 0.33, 0.33)}  # the reference's call
TOL = 1e-6


def tm_reference(preds, target):
    """torchmetrics 1.3.2, called as the reference calls it (one call; it imports the same function
    from torchmetrics.functional)."""
    from torchmetrics.functional.image import (
        multiscale_structural_similarity_index_measure,
    )

    assert torchmetrics.__version__ == "1.3.2", "the reference pins torchmetrics 1.3.2 (1.9 changed the last scale)"
    return multiscale_structural_similarity_index_measure(preds, target, **REF_ARGS)


def pooled_ranges(x: torch.Tensor, scales: int = 3) -> list[float]:
    """max - min of the whole batch at each scale (what torchmetrics uses when data_range is None)."""
    out = []
    for s in range(scales):
        out.append(float(x.max() - x.min()))
        if s < scales - 1:
            x = F.avg_pool2d(x, (2, 2))
    return out


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_components(seed=0, spec=TinySpec())


# ---------------------------------------------------------------------------- noise differences


def test_initial_latents_are_the_reference_draw_without_touching_global_rng():
    with torch.random.fork_rng(devices=[]):
        ref = torch.randn((4, 4, 8, 8), generator=torch.manual_seed(1))
    before = torch.random.get_rng_state()
    got = initial_latents(4, (4, 8, 8), seed=1)
    assert torch.equal(got, ref)
    assert torch.equal(torch.random.get_rng_state(), before)


def test_t1_is_the_second_ddim_timestep(tiny):
    config = tiny["scheduler"].config
    t1 = ddim_t1(config, 50, 1)
    from diffusers import DDIMScheduler

    s = DDIMScheduler.from_config(config)
    s.set_timesteps(50)
    assert t1 == int(s.timesteps[1]) and t1 < int(s.timesteps[0])
    assert t1 == 961  # SD's scheduler config (steps_offset 1) gives TOY.md's / the reference's 961


def test_minmax_scale_per_sample_and_channel():
    x = torch.randn(3, 4, 8, 8) * torch.arange(1, 5).view(1, 4, 1, 1)
    x[1, 2] = 7.0  # a constant channel
    y = minmax_scale(x)
    assert torch.allclose(y.amin(dim=(2, 3))[[0, 2]], torch.zeros(2, 4))
    assert torch.allclose(y.amax(dim=(2, 3))[[0, 2]], torch.ones(2, 4))
    assert torch.equal(y[1, 2], torch.zeros(8, 8))
    assert not torch.isnan(y).any()


# ---------------------------------------------------------------------------- MS-SSIM


def test_detect_side_upsamples_small_deltas_explicitly():
    # torchmetrics (default): side // 4 > 10 and a whole window at the third scale: 44
    assert detect_side(16, 16, win_size=11, n_scales=3) == 44
    assert tm_min_side(11, 3) == 44 and tm_min_side(11, 5) == 176
    # the pytorch-msssim-style setting keeps its own minimum, > (11 - 1) * 2**2
    assert detect_side(16, 16, win_size=11, n_scales=3, metric=METRIC_PYTORCH_MSSSIM) == 41
    assert detect_side(64, 64, win_size=11, n_scales=3) == 64  # SD 1.4 latents: no upsampling
    assert detect_side(16, 16, win_size=11, n_scales=3, min_side=192) == 192
    with pytest.raises(ValueError, match="below the 44 px"):
        detect_side(16, 16, win_size=11, n_scales=3, min_side=41)
    with pytest.raises(ValueError, match="below the 41 px"):
        detect_side(16, 16, win_size=11, n_scales=3, min_side=32, metric=METRIC_PYTORCH_MSSSIM)


def test_pytorch_msssim_setting_is_pytorch_msssim_with_three_equal_weights():
    """The former score, kept as `nemo.detect_metric=pytorch-msssim`."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(2, 4, 170, 170, generator=g), torch.rand(2, 4, 170, 170, generator=g)
    b = 0.5 * a + 0.5 * b
    ours = MsSsimSettings(metric=METRIC_PYTORCH_MSSSIM).score(a, b)
    ref = ms_ssim(a, b, data_range=1.0, size_average=False, win_size=11, weights=[1 / 3] * 3)
    assert torch.allclose(ours, ref, atol=1e-5)


def _random_pairs(n: int, h: int, w: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max scaled noise and a smoothed, partly related partner: ranges shrink unevenly with pooling."""
    g = torch.Generator().manual_seed(seed)
    a = minmax_scale(torch.randn(n, 4, h, w, generator=g))
    smooth = F.avg_pool2d(torch.randn(n, 4, h + 4, w + 4, generator=g), 5, stride=1)
    b = minmax_scale(0.5 * a + smooth * torch.linspace(0.2, 3.0, n).view(n, 1, 1, 1))
    return a, b


@pytest.mark.parametrize("h,w", [(44, 44), (64, 64), (50, 71)])
def test_ms_ssim_equals_torchmetrics_1_3_2_on_random_inputs(h, w):
    a, b = _random_pairs(12, h, w, seed=h * w)
    ref_one_call = tm_reference(a, b)
    assert (tm_ms_ssim(a, b) - ref_one_call).abs().max() <= TOL
    # groups of 3 rows are 3 separate reference calls, each with its own per-scale data range
    ref_groups = torch.cat([tm_reference(a[i:i + 3], b[i:i + 3]) for i in range(0, 12, 3)])
    assert (tm_ms_ssim(a, b, group_size=3) - ref_groups).abs().max() <= TOL
    # the inputs do exercise a range that differs per scale and per call ...
    ranges = [pooled_ranges(torch.cat([a[i:i + 3], b[i:i + 3]])) for i in range(0, 12, 3)]
    assert all(r[0] == pytest.approx(1.0) and r[2] < r[1] < 1.0 for r in ranges)
    assert max(r[2] for r in ranges) - min(r[2] for r in ranges) > 0.01
    # ... and the scores see it: one call for all rows is not four calls, nor a fixed range of 1
    assert (ref_one_call - ref_groups).abs().max() > 1e-4
    from torchmetrics.functional.image import (
        multiscale_structural_similarity_index_measure,
    )

    fixed = multiscale_structural_similarity_index_measure(a, b, data_range=1.0, **REF_ARGS)
    assert (fixed - ref_one_call).abs().max() > 1e-4


def test_ms_ssim_refuses_what_torchmetrics_refuses():
    a = torch.rand(2, 4, 43, 43)
    with pytest.raises(ValueError, match="at least 44"):
        tm_ms_ssim(a, a)
    with pytest.raises(ValueError, match="image height must be larger than 40"):
        tm_reference(a[:, :, :39, :39], a[:, :, :39, :39])
    with pytest.raises(ValueError, match="groups of 3"):
        tm_ms_ssim(torch.rand(4, 4, 44, 44), torch.rand(4, 4, 44, 44), group_size=3)
    with pytest.raises(ValueError, match="only 11 reproduces it"):
        MsSsimSettings(win_size=7)


@pytest.fixture(scope="module")
def real_deltas(tiny):
    """Noise differences of the tiny UNet at SD 1.4's latent size (64 x 64: scored as they are)
    and at its own (16 x 16: upsampled to 44), unblocked and under three candidate sets."""
    unet, enc, tok = tiny["unet"], tiny["text_encoder"], tiny["tokenizer"]
    from fbmem.jobs.core.prompt_encoding import encode_prompts

    cond = encode_prompts(tok, enc, ["a red star on stripes"])
    layers = find_value_layers(unet)
    widths = {l.idx: l.out_features for l in layers}
    sets = [{0: [1, 5, 7]}, {2: list(range(0, 64, 2))}, {0: list(range(32)), 1: list(range(64)), 2: list(range(64))}]
    out = {}
    for side in (64, 16):
        lat = initial_latents(5, (4, side, side), seed=1)
        ref = noise_difference(unet, lat, 961, cond)
        masks = masks_for_sets(sets, widths, repeat=5)
        blocked = noise_difference(unet, lat.repeat(len(sets), 1, 1, 1), 961, cond, scales=masks)
        out[side] = (ref, blocked, len(sets))
    return out


@pytest.mark.parametrize("side", [64, 16])
def test_detection_equals_the_references_one_torchmetrics_call_on_real_deltas(real_deltas, side):
    delta = real_deltas[side][0]
    ms = MsSsimSettings()
    det = detection(delta, threshold=0.428, ms=ms)
    d = ms.prepare(delta)
    assert d.shape[-1] == (64 if side == 64 else 44)
    # the reference: all pairs (torch.combinations order) in one call, max per sample
    pairs = torch.combinations(torch.arange(len(d)), r=2)
    ssim = tm_reference(d[pairs[:, 0]], d[pairs[:, 1]])
    m = torch.stack([ssim[(pairs == i).max(-1).values].max() for i in range(len(d))])
    assert (det.m - m).abs().max() <= TOL
    assert (det.pairwise[pairs[:, 0], pairs[:, 1]] - ssim).abs().max() <= TOL
    r = pooled_ranges(d[pairs[:, 0]]), pooled_ranges(d[pairs[:, 1]])
    assert max(r[0][2], r[1][2]) < 0.95  # the coarse scales' data range is not 1 ...
    from torchmetrics.functional.image import (
        multiscale_structural_similarity_index_measure,
    )

    fixed = multiscale_structural_similarity_index_measure(d[pairs[:, 0]], d[pairs[:, 1]], data_range=1.0, **REF_ARGS)
    assert (fixed - ssim).abs().max() > 0.01  # ... and a fixed range of 1 moves detection scores a lot


@pytest.mark.parametrize("side", [64, 16])
def test_blocking_scores_equal_one_torchmetrics_call_per_candidate_on_real_deltas(real_deltas, side):
    ref, blocked, n_sets = real_deltas[side]
    ms = MsSsimSettings()
    got = blocking_scores(ref, blocked, ms=ms)
    r = ref.shape[0]
    a, b = ms.prepare(ref), ms.prepare(blocked)
    want = torch.stack([tm_reference(a, b[c * r:(c + 1) * r]).max() for c in range(n_sets)])
    assert (got - want).abs().max() <= TOL
    assert want.min() < 0.999  # the sets do change the noise differences (a random model: a little)
    # the coarse scales' data range is not 1, and a fixed range of 1 would move these scores
    assert all(max(pooled_ranges(a)[2], pooled_ranges(b[c * r:(c + 1) * r])[2]) < 0.95 for c in range(n_sets))
    from torchmetrics.functional.image import (
        multiscale_structural_similarity_index_measure,
    )

    fixed = torch.stack([multiscale_structural_similarity_index_measure(a, b[c * r:(c + 1) * r], data_range=1.0,
                                                                        **REF_ARGS).max() for c in range(n_sets)])
    assert (fixed - want).abs().max() > 1e-5


def test_detection_retains_samples_with_a_similar_partner():
    g = torch.Generator().manual_seed(1)
    base = minmax_scale(torch.randn(1, 4, 16, 16, generator=g))
    noise = minmax_scale(torch.randn(3, 4, 16, 16, generator=g))
    delta = torch.cat([base, minmax_scale(base + 0.05 * noise[:1]), noise[1:]])  # 0 ~ 1, 2 and 3 unrelated
    det = detection(delta, threshold=0.428, ms=MsSsimSettings())
    assert det.retained.tolist() == [True, True, False, False]
    assert det.memorized and det.score == pytest.approx(float(det.m.max()))
    assert det.pairwise[0, 1] > 0.9 and det.pairwise[2, 3] < 0.428
    iu = torch.triu_indices(4, 4, 1)
    assert det.mean == pytest.approx(float(det.pairwise[iu[0], iu[1]].mean()), abs=1e-6)
    assert not detection(noise, threshold=0.428, ms=MsSsimSettings()).memorized


# ---------------------------------------------------------------------------- GPU numerics


def test_gpu_numerics_setting():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert uses_autocast(cuda, AUTOCAST) and not uses_autocast(cuda, NATIVE)
    assert not uses_autocast(cpu, AUTOCAST)  # autocast is the reference's GPU behaviour only
    check_weights(cuda, torch.float32, AUTOCAST)
    check_weights(cuda, torch.float16, NATIVE)
    check_weights(cpu, torch.float16, AUTOCAST)
    with pytest.raises(ValueError, match="needs the model loaded in float32 on the GPU, but its UNet is float16"):
        check_weights(cuda, torch.float16, AUTOCAST)
    with pytest.raises(ValueError, match="must be one of"):
        uses_autocast(cpu, "fp16")


def test_numerics_settings_agree_on_the_cpu(tiny):
    unet = tiny["unet"]
    lat = initial_latents(2, (4, 16, 16), seed=1)
    cond = torch.randn(1, 77, TinySpec().cross_attention_dim, generator=torch.Generator().manual_seed(0))
    assert torch.equal(noise_difference(unet, lat, 961, cond, numerics=AUTOCAST),
                       noise_difference(unet, lat, 961, cond, numerics=NATIVE))
