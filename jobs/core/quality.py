"""What mitigation costs in image quality, as pure functions over embeddings (SPEC section 8).

The mitigation score says how many memorized images went away, not whether the images got worse;
the paper reports image quality beside it. These are the quality numbers fbmem can compute from
what every generation already stores, its CLIP image embedding, with no model to load:

- `clip_score`: the cosine between a prompt's CLIP text embedding and an image's CLIP image
  embedding (prompt-image alignment; plain cosine, not torchmetrics' 100 * max(cos, 0), so that
  a drop reads directly in cosine units).
- `frechet_distance` and `kid`: how far the "after" images moved from the "before" images as
  sets, on CLIP image features. Inception weights (FID's usual features) cannot be downloaded
  here; CLIP features of the configured model are what every row holds. Both wrap torchmetrics'
  own computations (FrechetInceptionDistance, KernelInceptionDistance) fed the given features
  through a pass-through `feature` module, so the math is theirs, not ours.

Both set distances are biased by the set size (FD grows like 1/n; the unbiased KID of a set with
itself is -2 (mean k(x,x) - mean k(x,y)) / m, a few 1e-4 on unit CLIP vectors): compare them
across alphas and methods on the same pairs, which a sweep gives (same prompts, seeds, samples).
"""
from __future__ import annotations

import warnings

import numpy as np
import torch
from torch import nn


def clip_score(text_emb: np.ndarray, image_emb: np.ndarray) -> np.ndarray:
    """Per row, the cosine between text and image embeddings (shape (n,)); both (n, d).

    Rows are normalised here, so stored unit vectors and raw features give the same score.
    A zero vector has no direction: its score is NaN, not a silent 0.
    """
    t = np.asarray(text_emb, dtype=np.float64)
    i = np.asarray(image_emb, dtype=np.float64)
    if t.ndim != 2 or t.shape != i.shape:
        raise ValueError(f"text and image embeddings must both be (n, d) with the same shape, got {t.shape} and {i.shape}")
    norms = np.linalg.norm(t, axis=1) * np.linalg.norm(i, axis=1)
    dots = np.einsum("nd,nd->n", t, i)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(norms > 0, dots / np.where(norms > 0, norms, 1.0), np.nan)


class _GivenFeatures(nn.Module):
    """torchmetrics' `feature` extractor for features computed elsewhere: passes them through.

    `num_features` spares torchmetrics its dummy-image probe (a 299x299 uint8 image it would
    otherwise push through the extractor to learn the feature size).
    """

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _as_features(feats: np.ndarray, name: str) -> torch.Tensor:
    """(n, d) float64 tensor; float64 because torchmetrics returns FD in the features' dtype."""
    a = np.asarray(feats, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"{name} must be a 2-d (n, d) array of features, got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} holds NaN or infinite values")
    return torch.from_numpy(np.ascontiguousarray(a))


def _check_pair(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sizes differ: {a.shape[1]} and {b.shape[1]} (features of two models?)")
    if a.shape[0] < 2 or b.shape[0] < 2:
        raise ValueError(f"a set distance needs at least 2 rows per set, got {a.shape[0]} and {b.shape[0]}")


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (torchmetrics' FID math).

    0 for identical sets (up to float error), growing with any shift of mean or spread.
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    a, b = _as_features(feats_a, "feats_a"), _as_features(feats_b, "feats_b")
    _check_pair(a, b)
    metric = FrechetInceptionDistance(feature=_GivenFeatures(a.shape[1]))
    metric.update(a, real=True)
    metric.update(b, real=False)
    return float(metric.compute())


def kid(feats_a: np.ndarray, feats_b: np.ndarray, *, subset_size: int, subsets: int, seed: int) -> tuple[float, float]:
    """Kernel Inception Distance (mean, std over subsets) between two feature sets, torchmetrics'
    polynomial-kernel unbiased MMD^2.

    `subset_size` is capped by the smaller set (a cluster may have few pairs). torchmetrics draws
    the subsets with torch's global generator: they are drawn here under `seed` inside a forked
    RNG state, so the value is reproducible and the caller's random state is left alone.
    """
    from torchmetrics.image.kid import KernelInceptionDistance

    if subsets < 1 or subset_size < 2:
        raise ValueError(f"kid needs subsets >= 1 and subset_size >= 2, got {subsets} and {subset_size}")
    a, b = _as_features(feats_a, "feats_a"), _as_features(feats_b, "feats_b")
    _check_pair(a, b)
    size = min(subset_size, a.shape[0], b.shape[0])
    with warnings.catch_warnings():
        # "KID will save all extracted features in buffer": true, and the point (they are given)
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        metric = KernelInceptionDistance(feature=_GivenFeatures(a.shape[1]), subsets=subsets, subset_size=size)
    metric.update(a, real=True)
    metric.update(b, real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std)
