"""Candidate training images for each generation (SPEC section 3).

Three sources, merged per (generation, training image):
- `ann`: the top-k training images by CLIP cosine from the vector index (exact flat search when
  the table has no index yet) — what scales to billions;
- `linked`: the training images the prompt set names for the prompt (its URL / id column),
  matched on the training row's source uri, source id or content hash;
- `exact`: every training image (the reference's brute force), for small pools and as the
  yardstick the ANN candidates are checked against.
Pure merging lives in `merge_candidates` and `within_top_k`; the rest reads the tables.

Incremental scans (jobs/label.py) ask for the candidates among part of the corpus only: every
reader takes a `where` filter on `training_images` (the rows ingested since a generation was
labelled), applied before the top-k is taken, and `within_top_k` keeps only the new rows that
would have entered a generation's top-k next to the candidates it was compared with before.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import pyarrow as pa

from fbmem.jobs.config import Config
from fbmem.storage.database import Database
from fbmem.storage.keys import sql_list
from fbmem.storage.sql import duckdb_connection
from fbmem.storage.vector_index import search

log = logging.getLogger(__name__)

CANDIDATE_SCHEMA = pa.schema(
    [
        ("generation_id", pa.string()),
        ("image_id", pa.string()),
        ("prompt_id", pa.string()),
        ("candidate_source", pa.string()),
        ("rank", pa.int32()),
        ("distance", pa.float32()),
    ]
)
# when a pair comes from several sources, the first listed names it (its rank and distance kept)
SOURCE_ORDER = ("ann", "exact", "linked")


def merge_candidates(parts: list[pa.Table]) -> pa.Table:
    """Union candidate tables, one row per (generation, image), the best-ranked source winning."""
    parts = [p.select(CANDIDATE_SCHEMA.names).cast(CANDIDATE_SCHEMA) for p in parts if p.num_rows]
    if not parts:
        return CANDIDATE_SCHEMA.empty_table()
    t = pa.concat_tables(parts)
    order = {s: i for i, s in enumerate(SOURCE_ORDER)}
    src_rank = pa.array([order.get(s, len(order)) for s in t.column("candidate_source").to_pylist()], pa.int32())
    t = t.append_column("_src", src_rank)
    t = t.sort_by([("generation_id", "ascending"), ("image_id", "ascending"), ("_src", "ascending")])
    gid, iid = t.column("generation_id").to_pylist(), t.column("image_id").to_pylist()
    keep = [i == 0 or (gid[i], iid[i]) != (gid[i - 1], iid[i - 1]) for i in range(t.num_rows)]
    t = t.filter(pa.array(keep)).drop_columns(["_src"])
    return t.sort_by([("generation_id", "ascending"), ("rank", "ascending"), ("image_id", "ascending")])


def within_top_k(ann: pa.Table, stored: Mapping[str, Sequence[float]], k: int) -> pa.Table:
    """The rows of `ann` (candidates among new training rows) that would enter their generation's
    top-k beside the distances in `stored` (each generation's k smallest stored distances, sorted).

    A new row enters when the generation has fewer than k stored distances or its distance is at
    most the k-th: so an incremental scan adds what a full rescan's top-k would hold, and keeps
    what was compared before. `rank` becomes the row's place among stored and kept distances.
    """
    if ann.num_rows == 0:
        return ann
    gids = ann.column("generation_id").to_pylist()
    dist = ann.column("distance").to_numpy(zero_copy_only=False)
    keep = np.zeros(len(gids), dtype=bool)
    ranks = np.zeros(len(gids), dtype=np.int32)
    by_gen: dict[str, list[int]] = {}
    for i, g in enumerate(gids):
        by_gen.setdefault(g, []).append(i)
    for g, rows in by_gen.items():
        old = np.asarray(stored.get(g, ()), dtype=np.float64)[:k]
        bound = old[k - 1] if len(old) >= k else np.inf
        kept = sorted((i for i in rows if dist[i] <= bound), key=lambda i: dist[i])
        for place, i in enumerate(kept):
            keep[i] = True
            ranks[i] = 1 + place + int(np.searchsorted(old, dist[i], side="left"))
    out = ann.set_column(ann.column_names.index("rank"), "rank", pa.array(ranks, pa.int32()))
    return out.filter(pa.array(keep))


def _arrow(rel) -> pa.Table:
    """A DuckDB result as Arrow (2.0 names it to_arrow_table, 1.x arrow)."""
    fetch = getattr(rel, "to_arrow_table", None) or rel.arrow
    return fetch()


def select_in(db: Database, table: str, column: str, values: Iterable[str], columns: Sequence[str],
              where: str | None = None) -> pa.Table:
    """Rows of `table` whose `column` is one of `values` (`columns` only; `where` on top).

    One streaming DuckDB scan joined with the values, so a driver asking for the rows of its
    generations never loads the table, nor a key set of it, and never builds an `IN (...)` of a
    million literals.
    """
    wanted = pa.table({"_v": pa.array(sorted(set(values)), pa.string())})
    if wanted.num_rows == 0 or not db.has_table(table):
        return db.read(table, list(columns)).slice(0, 0)
    con = duckdb_connection(db)
    try:
        con.register("_wanted", wanted)
        cols = ", ".join(f't."{c}"' for c in columns)
        extra = f" AND ({where})" if where else ""
        rel = con.sql(f'SELECT {cols} FROM "{table}" AS t WHERE t."{column}" IN (SELECT _v FROM _wanted){extra}')
        return _arrow(rel)
    finally:
        con.close()


def stored_distances(db: Database, generation_ids: Iterable[str], k: int) -> dict[str, list[float]]:
    """Each generation's k smallest candidate distances in `pair_scores`, ascending.

    Distances are a property of the (generation, image) pair (CLIP cosine), not of the scoring
    settings, so a pair scored under several settings counts once, and rows of every mode count:
    the k-th smallest over images compared before can only be at or above today's top-k bound,
    never below it (`within_top_k` never drops a row a full rescan would keep).
    """
    wanted = pa.table({"_v": pa.array(sorted(set(generation_ids)), pa.string())})
    if wanted.num_rows == 0 or not db.has_table("pair_scores"):
        return {}
    con = duckdb_connection(db)
    try:
        con.register("_wanted", wanted)
        rel = con.sql(f"""
            WITH p AS (
                SELECT generation_id, image_id, min(distance) AS d FROM pair_scores
                WHERE distance IS NOT NULL AND generation_id IN (SELECT _v FROM _wanted)
                GROUP BY generation_id, image_id)
            SELECT generation_id, list(d ORDER BY d)[1:{int(k)}] AS ds FROM p GROUP BY generation_id""")
        t = _arrow(rel)
    finally:
        con.close()
    return dict(zip(t.column("generation_id").to_pylist(), t.column("ds").to_pylist()))


def ann_candidates(db: Database, cfg: Config, gens: pa.Table, k: int, where: str | None = None) -> pa.Table:
    """Top-k by cosine per generation (`gens`: generation_id, prompt_id, embedding), among the
    training rows matching `where` (all rows when None)."""
    if gens.num_rows == 0:
        return CANDIDATE_SCHEMA.empty_table()
    vecs = np.asarray(gens.column("embedding").to_pylist(), dtype=np.float32)
    hits = search(db, vecs, k, cfg.index, where=where)
    qi = hits.column("query_index").to_numpy()
    # rank within each query, in the order Lance returned them (ascending distance)
    ranks = np.zeros(len(qi), dtype=np.int32)
    for i in range(1, len(qi)):
        ranks[i] = ranks[i - 1] + 1 if qi[i] == qi[i - 1] else 0
    return pa.table(
        {
            "generation_id": gens.column("generation_id").take(pa.array(qi)),
            "image_id": hits.column("image_id"),
            "prompt_id": gens.column("prompt_id").take(pa.array(qi)),
            "candidate_source": pa.array(["ann"] * len(qi)),
            "rank": pa.array(ranks + 1, pa.int32()),
            "distance": hits.column("_distance").cast(pa.float32()),
        }
    )


def exact_candidates(db: Database, gens: pa.Table, where: str | None = None) -> pa.Table:
    """Every training image (matching `where`) for every generation, ranked by cosine (the
    brute-force yardstick)."""
    train = db.read("training_images", ["image_id", "embedding"], where=where)
    if gens.num_rows == 0 or train.num_rows == 0:
        return CANDIDATE_SCHEMA.empty_table()
    g = np.asarray(gens.column("embedding").to_pylist(), dtype=np.float32)
    t = np.asarray(train.column("embedding").to_pylist(), dtype=np.float32)
    dist = 1.0 - g @ t.T  # unit vectors: cosine distance
    order = np.argsort(dist, axis=1, kind="stable")
    n_g, n_t = dist.shape
    rows_g = np.repeat(np.arange(n_g), n_t)
    cols = order.ravel()
    return pa.table(
        {
            "generation_id": gens.column("generation_id").take(pa.array(rows_g)),
            "image_id": train.column("image_id").take(pa.array(cols)),
            "prompt_id": gens.column("prompt_id").take(pa.array(rows_g)),
            "candidate_source": pa.array(["exact"] * len(cols)),
            "rank": pa.array(np.tile(np.arange(1, n_t + 1), n_g), pa.int32()),
            "distance": pa.array(dist[rows_g, cols], pa.float32()),
        }
    )


def linked_candidates(db: Database, gens: pa.Table, where: str | None = None) -> pa.Table:
    """Training images (matching `where`) named by the prompt set for each generation's prompt."""
    if gens.num_rows == 0 or not db.has_table("prompts"):
        return CANDIDATE_SCHEMA.empty_table()
    prompt_ids = sorted({p for p in gens.column("prompt_id").to_pylist() if p})
    if not prompt_ids:
        return CANDIDATE_SCHEMA.empty_table()
    links = db.read(
        "prompts", ["prompt_id", "linked_uri", "linked_id"], where=f"prompt_id IN ({sql_list(prompt_ids)})"
    ).to_pylist()
    uris = {r["linked_uri"] for r in links if r["linked_uri"]}
    ids = {r["linked_id"] for r in links if r["linked_id"]}
    if not uris and not ids:
        return CANDIDATE_SCHEMA.empty_table()
    clauses = []
    if uris:
        clauses.append(f"source_uri IN ({sql_list(uris)})")
    if ids:
        clauses.append(f"source_id IN ({sql_list(ids)}) OR image_id IN ({sql_list(ids)})")
    match = " OR ".join(clauses)
    if where:
        match = f"({match}) AND ({where})"
    train = db.read("training_images", ["image_id", "source_uri", "source_id"], where=match).to_pylist()
    by_key: dict[str, set[str]] = {}
    for r in train:
        for key in (r["source_uri"], r["source_id"], r["image_id"]):
            if key:
                by_key.setdefault(key, set()).add(r["image_id"])
    images_of_prompt: dict[str, set[str]] = {}
    for r in links:
        found = set()
        for key in (r["linked_uri"], r["linked_id"]):
            found |= by_key.get(key, set()) if key else set()
        images_of_prompt[r["prompt_id"]] = found
    rows = []
    for g, p in zip(gens.column("generation_id").to_pylist(), gens.column("prompt_id").to_pylist()):
        for img in sorted(images_of_prompt.get(p, ())):
            rows.append({"generation_id": g, "image_id": img, "prompt_id": p, "candidate_source": "linked",
                         "rank": None, "distance": None})
    return pa.Table.from_pylist(rows, schema=CANDIDATE_SCHEMA) if rows else CANDIDATE_SCHEMA.empty_table()


def find_candidates(db: Database, cfg: Config, gens: pa.Table, *, mode: str | None = None,
                    k: int | None = None, where: str | None = None,
                    stored: Mapping[str, Sequence[float]] | None = None) -> pa.Table:
    """All candidates of `gens` under the configured mode (ann | exact), plus linked images.

    With `where`, only training rows matching it are candidates (an incremental scan's new rows);
    with `stored` (see `stored_distances`), ann candidates are kept only when they would enter
    the top-k beside what was compared before (`within_top_k`). Exact candidates (every matching
    image) and linked ones are always kept.
    """
    mode = mode or cfg.candidates.mode
    k = k or cfg.candidates.k
    if mode == "exact":
        parts = [exact_candidates(db, gens, where)]
    else:
        ann = ann_candidates(db, cfg, gens, k, where)
        parts = [ann if stored is None else within_top_k(ann, stored, k)]
    if cfg.candidates.include_linked:
        parts.append(linked_candidates(db, gens, where))
    out = merge_candidates(parts)
    log.info("candidates: %d pairs for %d generations (mode=%s, k=%d%s)", out.num_rows, gens.num_rows, mode, k,
             f", among rows {where}" if where else "")
    return out
