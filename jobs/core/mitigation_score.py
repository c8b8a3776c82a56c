"""The mitigation score (SPEC section 8), a pure function; sql/mitigation_score.sql is its twin.

Each (prompt, seed, sample) generated before and after mitigation contributes the weight of its
(before, after) label transition; the score is their mean. Positive means labels moved toward
less severe memorization. The weights are the reference's: they are not symmetric in the classes'
severity (VM -> BM counts 1.5, VM -> FM only 0.5), so keep the matrix as published.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from fbmem.jobs.core.label_rule import LABELS  # the one label order, most severe first

# SPEC section 8 prints its matrix in the order VM, BM, FM, NM; the weights are keyed by
# (before, after), so the order is only presentation: fbmem uses LABELS everywhere.

WEIGHTS: dict[tuple[str, str], float] = {
    ("VM", "VM"): 0.0, ("VM", "BM"): 1.5, ("VM", "FM"): 0.5, ("VM", "NM"): 2.0,
    ("BM", "VM"): -1.5, ("BM", "BM"): 0.0, ("BM", "FM"): -0.5, ("BM", "NM"): 0.5,
    ("FM", "VM"): -0.5, ("FM", "BM"): 1.0, ("FM", "FM"): 0.0, ("FM", "NM"): 1.5,
    ("NM", "VM"): -2.0, ("NM", "BM"): -0.5, ("NM", "FM"): -1.5, ("NM", "NM"): 0.0,
}


def transition_counts(before: Sequence[str], after: Sequence[str]) -> Counter:
    """Counts of (before, after) label pairs; both sequences are aligned by (prompt, seed, sample)."""
    if len(before) != len(after):
        raise ValueError(f"before has {len(before)} labels but after has {len(after)}: pair them first")
    bad = {x for x in (*before, *after) if x not in LABELS}
    if bad:
        raise ValueError(f"unknown labels {sorted(bad)}; expected {LABELS}")
    return Counter(zip(before, after))


def mitigation_score(before: Sequence[str], after: Sequence[str]) -> float:
    """Mean transition weight over all pairs; NaN when there are no pairs."""
    counts = transition_counts(before, after)
    n = sum(counts.values())
    if n == 0:
        return float("nan")
    return sum(WEIGHTS[t] * c for t, c in counts.items()) / n


def transition_matrix(before: Sequence[str], after: Sequence[str]) -> list[list[int]]:
    """Counts as a 4x4 list in LABELS order (rows: before, columns: after)."""
    counts = transition_counts(before, after)
    return [[counts.get((b, a), 0) for a in LABELS] for b in LABELS]
