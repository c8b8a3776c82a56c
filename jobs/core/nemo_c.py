"""NeMo-C (SPEC.md section 7): a cluster's neurons are the per-layer union of its prompts' refined
neurons, so a prompt NeMo never localized is still mitigated by its neighbours."""
from __future__ import annotations

from collections import defaultdict


def union_by_cluster(refined: dict[str, dict[int, list[int]]], clusters: dict[str, int | None]) -> dict[int, dict[int, list[int]]]:
    """Per cluster, per layer: the sorted union of the refined neurons of its prompts (pure)."""
    out: dict[int, dict[int, set[int]]] = defaultdict(lambda: defaultdict(set))
    for prompt_id, layers in refined.items():
        cluster = clusters.get(prompt_id)
        if cluster is None:
            continue
        for layer, neurons in layers.items():
            out[cluster][int(layer)].update(int(n) for n in neurons)
    return {c: {l: sorted(ns) for l, ns in sorted(layers.items())} for c, layers in sorted(out.items())}
