from __future__ import annotations

import threading

import numpy as np
import pyarrow as pa
import pytest

from fbmem.storage.database import StorageError, connect
from fbmem.storage.schema import KEYS, TABLES, conform, schema_for
from fbmem.storage.sql import duckdb_connection, load_query, query_params, run_query


def _vectors(n: int, dim: int, seed: int = 0) -> pa.FixedSizeListArray:
    v = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return pa.FixedSizeListArray.from_arrays(pa.array(v.ravel()), dim)


def _images(ids: list[str], dim: int = 8, caption: str = "c") -> pa.Table:
    n = len(ids)
    return pa.table(
        {
            "image_id": ids,
            "image_sha256": ids,
            "embedding": _vectors(n, dim),
            "caption": [f"{caption}{i}" for i in range(n)],
            "run_id": ["r1"] * n,
        }
    )


def test_every_table_has_a_schema_with_key_and_run_id():
    for name in TABLES:
        schema = schema_for(name, dim=4)
        for key in KEYS[name]:
            assert key in schema.names
        # a row says which run wrote it; a scan's own rows (the scan, its stages) say which scan
        assert "run_id" in schema.names or (name in ("scans", "scan_stages") and "scan_id" in schema.names), name
    assert schema_for("training_images", 16).field("embedding").type == pa.list_(pa.float32(), 16)
    with pytest.raises(ValueError, match="embedding dimension"):
        schema_for("prompts")
    with pytest.raises(ValueError, match="unknown table"):
        schema_for("nope")


def test_conform_fills_nullable_and_rejects_missing_required():
    t = conform(pa.table({"run_id": ["r"], "job": ["j"], "status": ["ok"], "rows_in": pa.array([3], pa.int32())}), schema_for("runs"))
    assert t.schema == schema_for("runs")
    assert t.column("rows_in").type == pa.int64() and t.column("message").null_count == 1
    with pytest.raises(ValueError, match="'job' is required"):
        conform(pa.table({"run_id": ["r"], "status": ["ok"]}), schema_for("runs"))


def test_upsert_is_idempotent_and_updates_by_key(tmp_path):
    db = connect(str(tmp_path / "db"))
    assert db.upsert("training_images", _images(["a", "b", "c"])) == 3
    assert db.upsert("training_images", _images(["a", "b", "c"])) == 3
    assert db.count("training_images") == 3
    db.upsert("training_images", _images(["c", "d"], caption="new"))
    rows = {r["image_id"]: r["caption"] for r in db.read("training_images", ["image_id", "caption"]).to_pylist()}
    assert rows == {"a": "c0", "b": "c1", "c": "new0", "d": "new1"}
    # duplicate keys inside one batch: the last one wins, no merge failure
    db.upsert("training_images", _images(["e", "e"], caption="dup"))
    assert db.read("training_images", ["caption"], where="image_id = 'e'").column(0).to_pylist() == ["dup1"]


def test_vector_dimension_mismatch_is_refused(tmp_path):
    db = connect(str(tmp_path / "db"))
    db.upsert("training_images", _images(["a"], dim=8))
    with pytest.raises(StorageError, match="8-d embeddings but the batch has 16-d"):
        db.upsert("training_images", _images(["b"], dim=16))


def test_concurrent_upserts_all_land(tmp_path):
    """Writers racing on one table hit commit conflicts; the retry makes every row land once."""
    db = connect(str(tmp_path / "db"))
    db.upsert("errors", pa.table({"error_id": ["seed"], "job": ["t"], "stage": ["s"], "reason": ["r"], "run_id": ["r"]}))
    failures: list[BaseException] = []

    def writer(w: int) -> None:
        try:
            own = connect(str(tmp_path / "db"))
            for b in range(4):
                ids = [f"w{w}-b{b}-{i}" for i in range(5)] + ["shared"]
                own.upsert("errors", pa.table({"error_id": ids, "job": ["t"] * 6, "stage": ["s"] * 6,
                                               "reason": [f"w{w}"] * 6, "run_id": ["r"] * 6}))
        except BaseException as exc:  # noqa: BLE001
            failures.append(exc)

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures
    keys = db.read("errors", ["error_id"]).column(0).to_pylist()
    assert len(keys) == len(set(keys)) == 1 + 4 * 4 * 5 + 1


def test_duckdb_views_push_filters_and_projections_down(tmp_path):
    db = connect(str(tmp_path / "db"))
    db.upsert("training_images", _images([f"id{i:03d}" for i in range(50)]))
    con = duckdb_connection(db)
    plan = "\n".join(str(r[1]) for r in con.execute("EXPLAIN SELECT caption FROM training_images WHERE image_id = 'id007'").fetchall())
    assert "Filters" in plan and "image_id" in plan  # the filter reaches the Arrow scan
    assert "Projections" in plan
    out = run_query(db, "SELECT caption FROM training_images WHERE image_id = $i", {"i": "id007"})
    assert out.column(0).to_pylist() == ["c7"]
    # tables not written yet are empty views with their columns, not errors
    assert run_query(db, "SELECT label, count(*) FROM labels GROUP BY label").num_rows == 0


def test_query_params_defaults_and_errors():
    sql = "-- param k = 5\nSELECT * FROM t WHERE a = $k AND b = $name -- $ignored\n"
    assert query_params(sql, {"name": "x"}) == {"k": 5, "name": "x"}
    assert query_params(sql, {"name": "x", "k": 2}) == {"k": 2, "name": "x"}
    with pytest.raises(ValueError, match="needs --param name"):
        query_params(sql, {})
    with pytest.raises(ValueError, match="unknown --param zz"):
        query_params(sql, {"name": 1, "zz": 2})


def test_load_query_reads_sql_files(tmp_path):
    f = tmp_path / "q.sql"
    f.write_text("SELECT 1")
    assert load_query(str(f)) == "SELECT 1"
    assert load_query("SELECT 2") == "SELECT 2"
    assert "label" in load_query("label_distribution")  # a named query by name
    with pytest.raises(FileNotFoundError, match="named queries: .*one_to_many"):
        load_query("no_such_query")
    with pytest.raises(FileNotFoundError, match="missing.sql"):
        load_query(str(tmp_path / "missing.sql"))
