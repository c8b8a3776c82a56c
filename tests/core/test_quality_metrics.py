"""Quality metrics on feature sets whose answer is known (jobs/core/quality.py).

Identical sets are at distance 0; a copy shifted by a constant vector is farther, and farther the
larger the shift (the Fréchet distance of a pure mean shift is exactly |shift|^2: the covariances
are equal). CLIP score is a cosine: 1 for the same direction, 0 for orthogonal ones.
"""
from __future__ import annotations

from itertools import pairwise

import numpy as np
import pytest

from fbmem.jobs.core.quality import clip_score, frechet_distance, kid


def unit_rows(n: int, d: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_clip_score_is_the_cosine():
    e = np.eye(4)
    assert clip_score(e, e) == pytest.approx(np.ones(4))
    assert clip_score(e, np.roll(e, 1, axis=0)) == pytest.approx(np.zeros(4))
    # not normalised on input: the score is still the cosine
    assert clip_score(np.array([[3.0, 0.0]]), np.array([[1.0, 1.0]]))[0] == pytest.approx(1 / np.sqrt(2))
    assert clip_score(np.array([[1.0, 0.0]]), np.array([[-2.0, 0.0]]))[0] == pytest.approx(-1.0)


def test_clip_score_zero_vector_is_nan_and_shapes_are_checked():
    out = clip_score(np.array([[0.0, 0.0], [1.0, 0.0]]), np.array([[1.0, 0.0], [1.0, 0.0]]))
    assert np.isnan(out[0]) and out[1] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="same shape"):
        clip_score(np.ones((2, 3)), np.ones((3, 3)))


def test_frechet_distance_identical_sets_is_zero():
    a = unit_rows(80, 32)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance(a, a[::-1].copy()) == pytest.approx(0.0, abs=1e-6)  # order does not matter


def test_frechet_distance_grows_with_a_shift():
    a = unit_rows(80, 32)
    direction = np.zeros(32)
    direction[3] = 1.0
    fds = [frechet_distance(a, a + s * direction) for s in (0.05, 0.1, 0.3, 1.0)]
    # a mean shift with the covariance unchanged: exactly |shift|^2
    assert fds == pytest.approx([0.05**2, 0.1**2, 0.3**2, 1.0], rel=1e-5, abs=1e-6)
    assert all(x < y for x, y in pairwise(fds))
    # and a change of spread counts too
    assert frechet_distance(a, 1.5 * a) > 1e-3


def test_kid_identical_sets_is_near_zero_and_grows_with_a_shift():
    a = unit_rows(60, 512)  # CLIP-sized unit vectors
    m = len(a)
    same, _ = kid(a, a, subset_size=m, subsets=3, seed=0)
    # the unbiased MMD^2 of a set with itself is -2 (mean k(x,x) - mean k(x,y)) / m: not exactly 0,
    # but O(1/m) small; with whole-set subsets it is that value exactly (torchmetrics' kernel)
    k = (a @ a.T / a.shape[1] + 1) ** 3
    off = (k.sum() - np.trace(k)) / (m * (m - 1))
    assert same == pytest.approx(-2 * (np.diag(k).mean() - off) / m, rel=1e-9)
    assert abs(same) < 1e-3
    direction = np.full(512, 1 / np.sqrt(512))
    kids = [kid(a, a + s * direction, subset_size=30, subsets=50, seed=0)[0] for s in (0.5, 1.0, 2.0)]
    assert kids[0] > 5 * abs(same)
    assert all(x < y for x, y in pairwise(kids))


def test_kid_is_reproducible_and_leaves_the_global_rng_alone():
    import torch

    a, b = unit_rows(40, 16, seed=1), unit_rows(40, 16, seed=2)
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    first = kid(a, b, subset_size=10, subsets=20, seed=7)
    assert torch.rand(1) == expected_next  # kid drew its subsets from a forked generator
    assert kid(a, b, subset_size=10, subsets=20, seed=7) == first
    assert kid(a, b, subset_size=10, subsets=20, seed=8) != first


def test_kid_caps_the_subset_size_by_the_set_size():
    a = unit_rows(5, 8)
    mean, _std = kid(a, a + 0.5, subset_size=50, subsets=3, seed=0)  # 50 > 5 rows: uses 5
    assert np.isfinite(mean) and mean > 0


def test_set_distances_refuse_bad_input():
    a = unit_rows(10, 8)
    with pytest.raises(ValueError, match="at least 2"):
        frechet_distance(a[:1], a)
    with pytest.raises(ValueError, match="feature sizes differ"):
        frechet_distance(a, unit_rows(10, 9))
    with pytest.raises(ValueError, match="NaN"):
        kid(a, np.full((10, 8), np.nan), subset_size=5, subsets=2, seed=0)
