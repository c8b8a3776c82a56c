"""Recall@k and throughput of the LanceDB vector index against exact search.

Candidate retrieval (SPEC section 3) asks the index for the top-k training images of every
generation; a neighbour the index misses is a memorized image the audit never scores. So the
index settings (IndexConfig) must keep recall@20 >= 0.95, and they should cost as little query
time as that allows. This bench builds the index on synthetic clustered unit vectors (clusters
because real CLIP embeddings are clustered, and uniform random vectors make every method look
equally bad), then sweeps nprobes x refine_factor on that one index.

Yardsticks, measured in the same run:
  - numpy brute force (the true top-k: one matrix product),
  - LanceDB flat search (`bypass_vector_index`), which is what the index has to beat.

Defaults come from `fbmem.jobs.config.IndexConfig`; every setting can be overridden:

    OMP_WAIT_POLICY=PASSIVE python bench/retrieval.py              # 200k x 512, IndexConfig defaults
    python bench/retrieval.py --nprobes 8 16 32 --refine-factor 0 5 10   # sweep (0 = no refine)
"""
from __future__ import annotations

import argparse
import math
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import lancedb
import numpy as np
import pyarrow as pa
from lancedb.index import HnswSq, IvfFlat, IvfPq

from fbmem.jobs.config import IndexConfig

VECTOR_COLUMN = "embedding"


# ---------------------------------------------------------------- data


def clustered_unit_vectors(
    *, n: int, dim: int, clusters: int, noise: float, rng: np.random.Generator,
    centres: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors around random unit centres: unequal cluster sizes and spreads, like real data.

    `noise` is the typical ratio of the noise norm to the centre norm; each cluster draws its
    own spread in [0.5, 1.5] x noise so some clusters are tight (near-duplicates) and some loose.
    Returns (vectors, centres) so queries can be drawn from the same centres.
    """
    if centres is None:
        centres = _normalise(rng.standard_normal((clusters, dim), dtype=np.float32))
    weights = rng.lognormal(0.0, 0.5, size=len(centres))
    assign = rng.choice(len(centres), size=n, p=weights / weights.sum())
    spread = rng.uniform(0.5, 1.5, size=len(centres)).astype(np.float32) * noise
    out = np.empty((n, dim), dtype=np.float32)
    step = 50_000  # bounds the temporary noise block
    for lo in range(0, n, step):
        hi = min(lo + step, n)
        g = rng.standard_normal((hi - lo, dim), dtype=np.float32) / np.float32(math.sqrt(dim))
        out[lo:hi] = centres[assign[lo:hi]] + spread[assign[lo:hi], None] * g
    return _normalise(out), centres


def _normalise(x: np.ndarray) -> np.ndarray:
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def as_arrow(vectors: np.ndarray) -> pa.Table:
    n, dim = vectors.shape
    flat = pa.array(vectors.reshape(-1), type=pa.float32())
    return pa.table(
        {
            "id": pa.array(np.arange(n, dtype=np.int64)),
            VECTOR_COLUMN: pa.FixedSizeListArray.from_arrays(flat, dim),
        }
    )


# ---------------------------------------------------------------- exact search


def exact_top_k(data: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """True top-k ids by cosine (= dot product on unit vectors), best first."""
    sims = queries @ data.T
    part = np.argpartition(-sims, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(sims, part, axis=1), axis=1)
    return np.take_along_axis(part, order, axis=1)


def recall_at_k(found: list[np.ndarray], truth: np.ndarray) -> np.ndarray:
    """Per query: the share of the true top-k ids that the search returned."""
    k = truth.shape[1]
    return np.array([len(np.intersect1d(f, t)) / k for f, t in zip(found, truth)])


# ---------------------------------------------------------------- lancedb


def index_config_object(
    *, index_type: str, metric: str, num_partitions: int, num_sub_vectors: int | None
) -> Any:
    """The lancedb index description for an IndexConfig.index_type."""
    if index_type == "IVF_PQ":
        return IvfPq(
            distance_type=metric, num_partitions=num_partitions, num_sub_vectors=num_sub_vectors
        )
    if index_type == "IVF_HNSW_SQ":
        return HnswSq(distance_type=metric, num_partitions=num_partitions)
    if index_type == "IVF_FLAT":
        return IvfFlat(distance_type=metric, num_partitions=num_partitions)
    raise ValueError(f"unknown index_type {index_type!r}; expected IVF_PQ, IVF_HNSW_SQ or IVF_FLAT")


def search_one_by_one(
    table: Any, queries: np.ndarray, *, k: int, metric: str, nprobes: int | None,
    refine_factor: int | None, exact: bool,
) -> tuple[list[np.ndarray], float]:
    """Each query on its own, as a per-generation lookup would run. Returns (ids, seconds)."""
    found: list[np.ndarray] = []
    start = time.perf_counter()
    for q in queries:
        found.append(_builder(table, q, k, metric, nprobes, refine_factor, exact).to_arrow()["id"]
                     .to_numpy())
    return found, time.perf_counter() - start


def search_batched(
    table: Any, queries: np.ndarray, *, k: int, metric: str, nprobes: int | None,
    refine_factor: int | None, exact: bool,
) -> tuple[list[np.ndarray], float]:
    """All queries in one call (lancedb adds `query_index`), as a batch job could run them."""
    start = time.perf_counter()
    result = _builder(table, queries, k, metric, nprobes, refine_factor, exact).to_arrow()
    seconds = time.perf_counter() - start
    qidx = result["query_index"].to_numpy()
    ids = result["id"].to_numpy()
    return [ids[qidx == i] for i in range(len(queries))], seconds


def _builder(table: Any, q: np.ndarray, k: int, metric: str, nprobes: int | None,
             refine_factor: int | None, exact: bool) -> Any:
    b = table.search(q, vector_column_name=VECTOR_COLUMN).distance_type(metric).limit(k)
    b = b.select(["id", "_distance"])  # naming _distance keeps lance from warning on every query
    if exact:
        return b.bypass_vector_index()
    if nprobes:
        b = b.nprobes(nprobes)
    if refine_factor:
        b = b.refine_factor(refine_factor)
    return b


# ---------------------------------------------------------------- driver


@dataclass
class Row:
    nprobes: int
    refine_factor: int | None
    recall_mean: float
    recall_p5: float
    qps: float
    qps_batched: float | None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    d = IndexConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--n", type=int, default=200_000, help="table rows")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--clusters", type=int, default=1000)
    p.add_argument("--noise", type=float, default=1.0, help="noise norm / centre norm")
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--target", type=float, default=0.95, help="recall@k goal")
    p.add_argument("--index-type", default=d.index_type, choices=["IVF_PQ", "IVF_HNSW_SQ", "IVF_FLAT"])
    p.add_argument("--metric", default=d.metric, choices=["cosine", "dot", "l2"])
    p.add_argument("--num-partitions", type=int, default=d.num_partitions,
                   help="default: IndexConfig (None = sqrt(rows))")
    p.add_argument("--num-sub-vectors", type=int, default=d.num_sub_vectors,
                   help="default: IndexConfig (None = dim / 8)")
    p.add_argument("--nprobes", type=int, nargs="+", default=[d.nprobes])
    p.add_argument("--refine-factor", type=int, nargs="+", default=[d.refine_factor or 0],
                   help="0 = no refine step")
    p.add_argument("--exact-queries", type=int, default=50,
                   help="queries timed through lancedb's flat search (it scans the whole table)")
    p.add_argument("--no-batched", action="store_true", help="skip the batched-query timing")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    rng = np.random.default_rng(a.seed)
    num_partitions = a.num_partitions or max(1, round(math.sqrt(a.n)))
    num_sub_vectors = a.num_sub_vectors or max(1, a.dim // 8)

    t = time.perf_counter()
    data, centres = clustered_unit_vectors(n=a.n, dim=a.dim, clusters=a.clusters, noise=a.noise, rng=rng)
    queries, _ = clustered_unit_vectors(n=a.queries, dim=a.dim, clusters=a.clusters, noise=a.noise,
                                        rng=rng, centres=centres)
    print(f"data: {a.n:,} x {a.dim} unit vectors in {a.clusters} clusters (noise {a.noise}), "
          f"{a.queries} held-out queries, k={a.k}  [{time.perf_counter() - t:.1f}s]")

    t = time.perf_counter()
    truth = exact_top_k(data, queries, a.k)
    numpy_qps = a.queries / (time.perf_counter() - t)
    nn_sim = np.einsum("qd,qd->q", queries, data[truth[:, 0]])
    kth_sim = np.einsum("qd,qd->q", queries, data[truth[:, -1]])
    print(f"numpy brute force: {numpy_qps:,.0f} queries/s (batched matmul); "
          f"mean cosine of 1st / {a.k}th neighbour {nn_sim.mean():.3f} / {kth_sim.mean():.3f}")

    with tempfile.TemporaryDirectory(prefix="fbmem-bench-") as tmp:
        db = lancedb.connect(tmp)
        t = time.perf_counter()
        table = db.create_table("vectors", data=as_arrow(data))
        print(f"lancedb table written in {time.perf_counter() - t:.1f}s")
        common = dict(k=a.k, metric=a.metric)

        t = time.perf_counter()
        table.create_index(
            VECTOR_COLUMN,
            config=index_config_object(index_type=a.index_type, metric=a.metric,
                                       num_partitions=num_partitions, num_sub_vectors=num_sub_vectors),
        )
        build_s = time.perf_counter() - t
        print(f"index {a.index_type} ({a.metric}, num_partitions={num_partitions}"
              + (f", num_sub_vectors={num_sub_vectors}" if a.index_type == "IVF_PQ" else "")
              + f") built in {build_s:.1f}s")

        # Exact yardstick through lancedb itself, timed next to the ANN sweep so both see the
        # same machine load (the bench shares its cores).
        nq = min(a.exact_queries, a.queries)
        flat_found, flat_s = search_one_by_one(table, queries[:nq], nprobes=None, refine_factor=None,
                                               exact=True, **common)
        flat_qps = nq / flat_s
        flat_recall = recall_at_k(flat_found, truth[:nq]).mean()
        print(f"lancedb flat search (bypass_vector_index): {flat_qps:,.2f} queries/s one by one; "
              f"recall@{a.k} vs numpy {flat_recall:.4f} (sanity: should be 1)")
        flat_qps_batched = None
        if not a.no_batched:
            _, s = search_batched(table, queries[:nq], nprobes=None, refine_factor=None, exact=True,
                                  **common)
            flat_qps_batched = nq / s
            print(f"lancedb flat search (bypass_vector_index): {flat_qps_batched:,.1f} queries/s "
                  f"batched ({nq} per call)")

        # Warm the index caches so the first setting is not charged for loading them.
        search_one_by_one(table, queries[:5], nprobes=a.nprobes[0], refine_factor=None, exact=False,
                          **common)

        rows: list[Row] = []
        for nprobes in a.nprobes:
            for rf in a.refine_factor:
                rf_ = rf or None
                found, s = search_one_by_one(table, queries, nprobes=nprobes, refine_factor=rf_,
                                             exact=False, **common)
                r = recall_at_k(found, truth)
                qb = None
                if not a.no_batched:
                    found_b, sb = search_batched(table, queries, nprobes=nprobes, refine_factor=rf_,
                                                 exact=False, **common)
                    qb = a.queries / sb
                    rb = recall_at_k(found_b, truth).mean()
                    if abs(rb - r.mean()) > 0.01:
                        print(f"  note: batched recall {rb:.4f} differs from one-by-one {r.mean():.4f}")
                rows.append(Row(nprobes, rf_, float(r.mean()), float(np.percentile(r, 5)),
                                a.queries / s, qb))
                _print_row(rows[-1], a.k, flat_qps, flat_qps_batched)

    print()
    meeting = [r for r in rows if r.recall_mean >= a.target]
    if meeting:
        best = max(meeting, key=lambda r: r.qps)
        print(f"fastest setting with recall@{a.k} >= {a.target}: nprobes={best.nprobes} "
              f"refine_factor={best.refine_factor}  recall {best.recall_mean:.4f}, "
              f"{best.qps:,.0f} q/s one by one = {best.qps / flat_qps:.0f}x lancedb flat search, "
              f"{best.qps / numpy_qps:.1f}x numpy batched brute force")
    else:
        print(f"no setting reached recall@{a.k} >= {a.target}; raise nprobes / refine_factor")
    print(f"index build: {build_s:.1f}s for {a.n:,} rows")


def _print_row(r: Row, k: int, flat_qps: float, flat_qps_batched: float | None) -> None:
    line = (f"nprobes={r.nprobes:<4} refine={str(r.refine_factor):<5} recall@{k} mean {r.recall_mean:.4f}"
            f" p5 {r.recall_p5:.2f} | {r.qps:8,.0f} q/s one by one ({r.qps / flat_qps:5.1f}x flat)")
    if r.qps_batched is not None and flat_qps_batched:
        line += f" | {r.qps_batched:8,.0f} q/s batched ({r.qps_batched / flat_qps_batched:5.1f}x flat)"
    print(line, flush=True)


if __name__ == "__main__":
    main()
