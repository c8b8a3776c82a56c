"""`update_index`: a grown corpus keeps its index (new rows added) until too much of it is new.

Real LanceDB tables of random unit vectors, no Ray. The index is built with 2 partitions over
12,000 rows so its partitions are large enough for Lance to keep them as they are when rows are
added (Lance joins partitions it deems undersized, which would mask what we check here).
"""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

import numpy as np
import pyarrow as pa
import pytest

from fbmem.jobs.config import IndexConfig
from fbmem.storage.database import connect
from fbmem.storage.vector_index import index_coverage, search, update_index

DIM = 16
CFG = IndexConfig(exact_below_rows=1000, num_partitions=2, nprobes=2, refine_factor=5, max_unindexed_share=0.1)


def _add(db, rng, n: int, start: int, at: datetime) -> np.ndarray:
    v = rng.normal(size=(n, DIM)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    db.upsert("training_images", pa.table({
        "image_id": [f"img{start + i:06d}" for i in range(n)],
        "image_sha256": [f"sha{start + i}" for i in range(n)],
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(v.ravel()), DIM),
        "run_id": ["test"] * n,
        "ingested_at": pa.array([at] * n, pa.timestamp("us", tz="UTC")),
    }))
    return v


def _top1(db, v: np.ndarray, **kw) -> list[str]:
    hits = search(db, v, 1, CFG, **kw)
    return [h for _, h in sorted(zip(hits.column("query_index").to_pylist(), hits.column("image_id").to_pylist()))]


@pytest.fixture()
def db(tmp_path):
    return connect(str(tmp_path / "db"))


def test_small_tables_stay_exact_and_an_empty_one_too(db):
    assert update_index(db, CFG)["action"] == "exact"  # no table at all
    _add(db, np.random.default_rng(1), 200, 0, datetime.now(timezone.utc))
    info = update_index(db, CFG)
    assert info["action"] == "exact" and info["rows"] == 200 and index_coverage(db) is None


def test_build_then_update_in_place_then_rebuild(db):
    rng = np.random.default_rng(0)
    t0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
    _add(db, rng, 12_000, 0, t0)
    built = update_index(db, CFG)
    assert built["action"] == "built" and built["rows"] == 12_000 and built["unindexed_after"] == 0
    trained = built["segments_after"]
    assert len(trained) == 1

    # 5% new rows: searched (flat, beside the index) before the update, covered after it
    t1 = t0 + timedelta(days=1)
    new = _add(db, rng, 600, 12_000, t1)
    assert index_coverage(db)["unindexed"] == 600
    want = [f"img{12_000 + i:06d}" for i in range(600)]
    assert _top1(db, new[:50]) == want[:50]
    info = update_index(db, CFG)
    assert info["action"] == "updated", info
    assert info["unindexed_before"] == 600 and info["unindexed_after"] == 0
    assert info["share_before"] == pytest.approx(600 / 12_600)
    # not rebuilt: the segment trained on the first 12,000 rows is still the index's
    assert set(trained) <= set(info["segments_after"]), info
    assert index_coverage(db)["indexed"] == 12_600
    assert _top1(db, new) == want  # every new row is its own nearest neighbour through the index
    assert update_index(db, CFG)["action"] == "current"

    # a prefilter on the ingest time searches the new rows only, through the index
    since = f"ingested_at > timestamp '{t0.strftime('%Y-%m-%d %H:%M:%S.%f')}'"
    hits = search(db, rng.normal(size=(20, DIM)).astype(np.float32), 5, CFG, where=since)
    assert hits.num_rows == 100 and set(hits.column("image_id").to_pylist()) <= set(want)

    # 50% more rows: a third of the table unindexed, past max_unindexed_share: rebuilt
    more = _add(db, rng, 6_300, 12_600, t1 + timedelta(days=1))
    info = update_index(db, CFG)
    assert info["action"] == "rebuilt", info
    assert info["unindexed_before"] == 6_300 and info["unindexed_after"] == 0
    assert not set(info["segments_after"]) & set(info["segments_before"])
    assert index_coverage(db)["indexed"] == 18_900
    assert _top1(db, more[:50]) == [f"img{12_600 + i:06d}" for i in range(50)]
