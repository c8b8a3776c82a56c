"""Nearest-neighbour search over training embeddings: an ANN index, or exact search below a size.

Candidates for FB-Mem come from here (SPEC section 3). The index is LanceDB's (IVF_PQ by default,
cosine); its settings are `IndexConfig`. Exact search stays available because small pools don't
need an index and because it is the yardstick the index's recall is measured against.

A growing corpus keeps its index with `update_index`: new rows are assigned to the existing
partitions (Lance's `optimize_indices`, no retraining) while the rows the index does not cover
stay under `index.max_unindexed_share` of the table; past that the partitions were fitted to a
corpus too different from today's, and the index is rebuilt. Until then Lance searches the rows
the index does not cover by a flat scan, so results include them either way.
"""
from __future__ import annotations

import logging
import math
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401 - pa.compute

from fbmem.jobs.config import IndexConfig
from fbmem.storage.database import Database

log = logging.getLogger(__name__)

TABLE = "training_images"
VECTOR = "embedding"


def index_params(rows: int, dim: int, cfg: IndexConfig) -> dict:
    """Partition count ~ sqrt(rows) and PQ sub-vectors of 8 dims unless set: Lance's usual advice."""
    parts = cfg.num_partitions or max(1, int(round(math.sqrt(rows))))
    params = {"metric": cfg.metric, "index_type": cfg.index_type, "num_partitions": parts, "vector_column_name": VECTOR}
    if cfg.index_type == "IVF_PQ":
        sub = cfg.num_sub_vectors or max(1, dim // 8)
        while dim % sub:
            sub -= 1
        params["num_sub_vectors"] = sub
    return params


def has_vector_index(db: Database) -> bool:
    return vector_index_name(db) is not None


def vector_index_name(db: Database) -> str | None:
    """The name of the index on the embedding column (LanceDB names it `embedding_idx`), or None."""
    if not db.has_table(TABLE):
        return None
    for ix in db.table(TABLE).list_indices():
        if VECTOR in (getattr(ix, "columns", None) or []):
            return ix.name
    return None


def index_coverage(db: Database) -> dict | None:
    """What the vector index covers: name, indexed and unindexed rows, its segments' uuids.

    None without an index. The uuids tell an update (the trained segment kept, a delta segment
    added or merged into it) from a rebuild (every uuid new).
    """
    name = vector_index_name(db)
    if name is None:
        return None
    stats = db.table(TABLE).index_stats(name)
    uuids = sorted(str(seg.uuid) for ix in db.dataset(TABLE).describe_indices() if ix.name == name
                   for seg in ix.segments)
    return {"name": name, "indexed": int(stats.num_indexed_rows), "unindexed": int(stats.num_unindexed_rows),
            "segments": uuids}


def update_index(db: Database, cfg: IndexConfig) -> dict:
    """Bring the vector index up to the table: build, update in place, or rebuild (what a scan runs).

    - no index: below `exact_below_rows` nothing is built (searches stay exact, action `exact`),
      else it is built (`built`);
    - an index covering every row: nothing to do (`current`);
    - rows the index does not cover at most `max_unindexed_share` of the table: they are added to
      the existing partitions (`updated`: Lance's optimize_indices, no retraining, so it costs a
      pass over the new rows only, not over the corpus);
    - more than that: rebuilt (`rebuilt`), with partitions fitted to today's row count.

    Returns `action`, `rows`, `unindexed_before`, `unindexed_after`, `share_before` (unindexed /
    rows), `segments_before` / `segments_after` (the index's segment uuids) and `message`; a
    build adds build_index's figures.
    """
    rows = db.count(TABLE)
    before = index_coverage(db)
    out: dict = {"rows": rows, "unindexed_before": None if before is None else before["unindexed"],
                 "segments_before": None if before is None else before["segments"]}
    if before is None:
        if rows == 0 or rows < cfg.exact_below_rows:
            return {**out, "action": "exact", "unindexed_after": None, "share_before": None,
                    "message": f"{rows} rows < index.exact_below_rows={cfg.exact_below_rows}: no index, searches are exact"}
        info = build_index(db, cfg)
        return {**info, **out, "action": "built", "share_before": None, **_after(db)}
    share = before["unindexed"] / max(rows, 1)
    out["share_before"] = round(share, 6)
    if before["unindexed"] == 0:
        return {**out, "action": "current", "unindexed_after": 0, "segments_after": before["segments"],
                "message": f"the index covers all {rows} rows"}
    t0 = time.perf_counter()
    if share <= cfg.max_unindexed_share:
        db.dataset(TABLE).optimize.optimize_indices(index_names=[before["name"]])
        action = "updated"
        what = f"added {before['unindexed']} rows to the index"
    else:
        build_index(db, cfg, force=True)
        action = "rebuilt"
        what = f"rebuilt the index on {rows} rows"
    secs = time.perf_counter() - t0
    return {**out, "action": action, **_after(db), "seconds": round(secs, 2),
            "message": (f"{what} in {secs:.1f}s (unindexed share {share:.1%}, "
                        f"index.max_unindexed_share={cfg.max_unindexed_share:.1%})")}


def _after(db: Database) -> dict:
    after = index_coverage(db)
    if after is None:
        return {"unindexed_after": None, "segments_after": None}
    return {"unindexed_after": after["unindexed"], "segments_after": after["segments"]}


def build_index(db: Database, cfg: IndexConfig, force: bool = False) -> dict:
    """Create (replace) the vector index; below `exact_below_rows` exact search is used instead."""
    rows = db.count(TABLE)
    if rows == 0:
        return {"rows": 0, "built": False, "message": "training_images is empty: nothing to index"}
    if rows < cfg.exact_below_rows and not force:
        return {
            "rows": rows,
            "built": False,
            "message": f"{rows} rows < index.exact_below_rows={cfg.exact_below_rows}: searches are exact (use --force to build anyway)",
        }
    dim = db.table_dim(TABLE)
    params = index_params(rows, dim, cfg)
    if params["num_partitions"] > rows:
        params["num_partitions"] = max(1, rows // 2)
    t0 = time.perf_counter()
    tbl = db.table(TABLE)
    tbl.create_index(replace=True, **params)
    # a scalar index on the key speeds up the lookups that fetch candidates' pixels and masks
    try:
        tbl.create_scalar_index("image_id", replace=True)
    except Exception as exc:  # noqa: BLE001 - optional acceleration only
        log.info("scalar index on image_id not built: %s", exc)
    secs = time.perf_counter() - t0
    return {
        "rows": rows,
        "built": True,
        "seconds": round(secs, 2),
        **{k: v for k, v in params.items() if k != "vector_column_name"},
        "message": f"built {params['index_type']} on {rows} rows ({params['num_partitions']} partitions) in {secs:.1f}s",
    }


def search(
    db: Database,
    queries: np.ndarray,
    k: int,
    cfg: IndexConfig,
    *,
    exact: bool = False,
    columns: tuple[str, ...] = ("image_id",),
    query_batch: int = 256,
    where: str | None = None,
) -> pa.Table:
    """Top-k training rows for each query vector: `query_index`, `columns`, `_distance`.

    `where` restricts the rows searched (a Lance prefilter, applied before the top-k is taken, so
    each query still gets up to k rows that match): an incremental label run searches only the
    rows ingested since a generation was labelled (jobs/label.py).

    `_distance` is the cosine distance (1 - cosine) with the default metric. Uses the index when
    one exists and `exact` is False; otherwise Lance's flat scan with the same distance, so the
    two are directly comparable (bench/retrieval.py measures the index's recall against it).
    Queries go to Lance in batches (one multi-vector search each).
    """
    q = np.asarray(queries, dtype=np.float32)
    if q.ndim != 2:
        raise ValueError(f"queries must be [n, dim], got shape {q.shape}")
    tbl = db.table(TABLE)
    use_index = not exact and has_vector_index(db)
    parts = []
    for start in range(0, len(q), query_batch):
        block = q[start : start + query_batch]
        s = tbl.search(block if len(block) > 1 else block[0], vector_column_name=VECTOR)
        s = s.distance_type(cfg.metric).limit(k).select(list(columns) + ["_distance"])
        if where:
            s = s.where(where, prefilter=True)
        if use_index:
            s = s.nprobes(cfg.nprobes)
            if cfg.refine_factor:
                s = s.refine_factor(cfg.refine_factor)
        else:
            s = s.bypass_vector_index()
        res = s.to_arrow()
        if "query_index" not in res.column_names:
            res = res.add_column(0, "query_index", pa.array(np.zeros(res.num_rows, np.int32)))
        qi = pa.compute.add(res.column("query_index").cast(pa.int64()), start)
        parts.append(res.set_column(res.column_names.index("query_index"), "query_index", qi))
    if not parts:
        return pa.table({"query_index": pa.array([], pa.int64()), **{c: pa.array([], pa.string()) for c in columns},
                         "_distance": pa.array([], pa.float32())})
    return pa.concat_tables(parts)
