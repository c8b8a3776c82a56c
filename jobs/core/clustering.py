"""Prompt clustering (SPEC section 5): KMeans over prompt embeddings, with the silhouette score.

NeMo-C deactivates one union of neurons per cluster, so clusters should group prompts whose
memorization lives in the same neurons; the reference embeds prompts with the diffused model's
own text encoder (last hidden state, flattened), which is the default here.
"""
from __future__ import annotations

import numpy as np
from sklearn.cluster import KMeans
from sklearn.metrics import silhouette_score


def cluster_embeddings(x: np.ndarray, *, k: int, max_iter: int = 500, random_state: int = 1,
                       n_init: int = 10) -> tuple[np.ndarray, float]:
    """(cluster id per row, silhouette score). k must be in [2, n-1] for a silhouette to exist."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"embeddings must be [n, d], got shape {x.shape}")
    n = x.shape[0]
    if not 2 <= k <= n - 1:
        raise ValueError(f"cannot make k={k} clusters of {n} prompts (need 2 <= k <= n-1); lower --k")
    km = KMeans(n_clusters=k, max_iter=max_iter, random_state=random_state, n_init=n_init)
    labels = km.fit_predict(x)
    if len(set(labels)) < 2:
        return labels.astype(np.int32), float("nan")
    return labels.astype(np.int32), float(silhouette_score(x, labels))
