"""Wen et al.'s score (jobs/core/wen.py) on tensors whose norms and means are known by hand.

The UNet loop (`guided_first_steps`) is tested against the diffusers pipeline on the tiny model in
tests/jobs/test_detect.py.
"""
from __future__ import annotations

import math

import pytest
import torch

from fbmem.jobs.core.wen import text_noise_norms, wen_scores


def test_norm_is_the_l2_norm_of_the_difference_over_channels_and_pixels():
    uncond = torch.zeros(2, 1, 2, 2)
    cond = torch.zeros(2, 1, 2, 2)
    cond[0] = 3.0  # four entries of 3: sqrt(4 * 9) = 6
    cond[1, 0, 0, 0], cond[1, 0, 1, 1] = 3.0, -4.0  # a 3-4-5 triangle: 5
    got = text_noise_norms(cond, uncond)
    assert got.tolist() == [6.0, 5.0]
    # only the difference counts: the same offset on both branches changes nothing
    assert text_noise_norms(cond + 7.5, uncond + 7.5).tolist() == pytest.approx([6.0, 5.0])
    # and its sign does not
    assert text_noise_norms(uncond, cond).tolist() == [6.0, 5.0]


def test_norm_keeps_leading_dims_and_sums_over_all_channels():
    cond = torch.ones(3, 2, 4, 2, 2)  # [seeds, steps, C=4, 2, 2]: 16 ones per sample and step
    cond[1, 0] *= 2.0  # 16 twos: sqrt(64) = 8
    norms = text_noise_norms(cond, torch.zeros_like(cond))
    assert norms.shape == (3, 2)
    assert norms[0, 0].item() == 4.0 and norms[1, 0].item() == 8.0 and norms[1, 1].item() == 4.0


def test_norm_is_float32_from_half_inputs():
    cond = torch.full((1, 4, 8, 8), 0.5, dtype=torch.float16)
    got = text_noise_norms(cond, torch.zeros_like(cond))
    assert got.dtype == torch.float32 and got.item() == pytest.approx(0.5 * math.sqrt(256))


def test_score_is_the_mean_over_seeds_and_steps():
    norms = torch.tensor([
        [[1.0, 3.0], [5.0, 7.0]],  # prompt 0: seeds x steps, mean 4
        [[10.0, 0.0], [0.0, 2.0]],  # prompt 1: mean 3
    ])
    assert wen_scores(norms).tolist() == [4.0, 3.0]
    # the authors' order (mean over generations per step, then over steps) is the same number
    assert wen_scores(norms).tolist() == norms.mean(dim=1).mean(dim=1).tolist()
    # one seed and one step: the score is that norm
    assert wen_scores(norms[:, :1, :1]).tolist() == [1.0, 10.0]


def test_a_non_finite_norm_makes_the_score_nan_not_a_number_that_looks_fine():
    norms = torch.tensor([[[1.0, float("inf")]], [[1.0, 2.0]]])
    got = wen_scores(norms)
    assert not math.isfinite(got[0].item()) and got[1].item() == 1.5


@pytest.mark.parametrize("shape", [(2, 3), (2, 0, 3), (0, 1, 1)])
def test_score_refuses_norms_of_the_wrong_shape(shape):
    with pytest.raises(ValueError, match="prompts, seeds, steps"):
        wen_scores(torch.ones(shape))


def test_norm_refuses_mismatched_or_flat_predictions():
    with pytest.raises(ValueError, match="differ in shape"):
        text_noise_norms(torch.zeros(1, 4, 2, 2), torch.zeros(1, 4, 2, 3))
    with pytest.raises(ValueError, match=r"\[\.\.\., C, h, w\]"):
        text_noise_norms(torch.zeros(4, 2), torch.zeros(4, 2))
