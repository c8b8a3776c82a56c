"""Keys and SQL literals: values with quotes reach DuckDB and Lance filters intact."""
from __future__ import annotations

import duckdb
import lance
import pyarrow as pa
import pytest

from fbmem.storage.keys import content_hash, sql_list, sql_literal, stable_hash

AWKWARD = ["plain", "it's", "''", "a'; DROP TABLE t; --", "back\\slash", "naïve \u00e9t\u00e9", "%_", "\"dq\""]


def test_literals_round_trip_through_duckdb():
    con = duckdb.connect()
    for v in AWKWARD + [0, -7, 2.5, True, None]:
        assert con.execute(f"SELECT {sql_literal(v)}").fetchone()[0] == v


def test_in_lists_match_exactly_in_a_lance_filter(tmp_path):
    ds = lance.write_dataset(pa.table({"k": AWKWARD + ["other"]}), str(tmp_path / "t.lance"))
    got = ds.to_table(filter=f"k IN ({sql_list(AWKWARD)})").column("k").to_pylist()
    assert sorted(got) == sorted(AWKWARD)
    one = ds.to_table(filter=f"k = {sql_literal(AWKWARD[3])}").column("k").to_pylist()
    assert one == [AWKWARD[3]]


def test_non_finite_floats_have_no_literal():
    for v in (float("nan"), float("inf")):
        with pytest.raises(ValueError):
            sql_literal(v)


def test_stable_hash_is_canonical_and_distinguishes_parts():
    assert stable_hash({"a": 1, "b": 2}) == stable_hash({"b": 2, "a": 1})
    assert stable_hash("x", "y") != stable_hash("y", "x")
    assert stable_hash("a\x1fb") != stable_hash("a", "b")  # the separator inside a part is quoted
    assert content_hash(b"abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
