"""Nearest-neighbour search over training embeddings: an ANN index, or exact search below a size.

Candidates for FB-Mem come from here (SPEC section 3). The index is LanceDB's (IVF_PQ by default,
cosine); its settings are `IndexConfig`. Exact search stays available because small pools don't
need an index and because it is the yardstick the index's recall is measured against.
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
    if not db.has_table(TABLE):
        return False
    return any(VECTOR in (getattr(ix, "columns", None) or []) for ix in db.table(TABLE).list_indices())


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
) -> pa.Table:
    """Top-k training rows for each query vector: `query_index`, `columns`, `_distance`.

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
