"""Filters DuckDB pushes into a Lance table give the rows DuckDB means (issue 14, item 4).

`SELECT count(*) FROM training_images WHERE embedding IS NULL` (or `mask_png IS NULL`) failed:
DuckDB hands its filter to the scan, and Lance cannot evaluate it on a vector or binary column.
Here every table of the schema gets rows with nulls in every nullable column, and a list of ordinary
WHERE clauses (IS NULL / IS NOT NULL on every column, =, <>, IN, LIKE, comparisons on numbers and
timestamps, boolean logic, functions of vectors, blobs and lists) runs on it through `fbmem sql`'s
connection and, as the reference, through DuckDB over an in-memory Arrow copy of the same table.
"""
from __future__ import annotations

import math
from datetime import datetime, timedelta, timezone

import duckdb
import pyarrow as pa
import pyarrow.dataset as pads
import pytest
from lance.dataset import LanceScanner

from fbmem.jobs.cli import app
from fbmem.storage.database import connect
from fbmem.storage.schema import KEYS, TABLES, VECTOR_TABLES, schema_for
from fbmem.storage.sql import LanceScan, duckdb_connection, run_query

DIM = 4
N = 12
T0 = datetime(2024, 1, 1, tzinfo=timezone.utc)


def _is_vector(t: pa.DataType) -> bool:
    return pa.types.is_fixed_size_list(t)


def _is_blob(t: pa.DataType) -> bool:
    return pa.types.is_binary(t) or pa.types.is_large_binary(t)


def _value(field: pa.Field, col: int, i: int):
    """Row i of a column: null on a pattern that differs per column, a few repeated values."""
    if field.nullable and (i + col) % 4 == 0:
        return None
    t, name = field.type, field.name
    if pa.types.is_string(t):
        return ["alpha", "beta", "it's", "gamma%"][i % 4]
    if pa.types.is_boolean(t):
        return i % 3 == 0
    if pa.types.is_integer(t):
        return i % 5
    if pa.types.is_floating(t):
        return math.nan if i == 7 else (i % 4) * 0.5
    if pa.types.is_timestamp(t):
        return T0 + timedelta(hours=i)
    if _is_blob(t):
        return bytes([i % 3 + 1]) * (i % 3 + 1)
    if _is_vector(t):
        return [0.25 * i + k for k in range(t.list_size)]
    if pa.types.is_list(t) and pa.types.is_string(t.value_type):  # e.g. scan_stages.run_ids
        return [str(k) for k in range(i % 4)]
    if pa.types.is_list(t):
        return list(range(i % 4))
    raise AssertionError(f"no test value for {name}: {t}")


def _rows(name: str) -> pa.Table:
    """N rows of table `name`; its key is `name-00`, `name-01`, ..."""
    schema = schema_for(name, DIM if name in VECTOR_TABLES else None)
    key = KEYS[name][0]
    cols = {}
    for c, f in enumerate(schema):
        if f.name == key:
            cols[f.name] = pa.array([f"{name}-{i:02d}" for i in range(N)], f.type)
        else:
            cols[f.name] = pa.array([_value(f, c, i) for i in range(N)], f.type)
    return pa.table(cols, schema=schema)


def _clauses(name: str, schema: pa.Schema) -> list[str]:
    """Ordinary WHERE clauses over every column of table `name`, by type, and some boolean logic."""
    out: list[str] = []
    first: dict[str, str] = {}
    for f in schema:
        c, t = f'"{f.name}"', f.type  # quoted: `full` is a keyword
        out += [f"{c} IS NULL", f"{c} IS NOT NULL", f"NOT ({c} IS NULL)"]
        if pa.types.is_string(t):
            kind = "string"
            out += [f"{c} = 'beta'", f"{c} <> 'beta'", f"{c} IN ('alpha', 'it''s')", f"{c} NOT IN ('alpha', 'beta')",
                    f"{c} LIKE 'gam%'", f"{c} LIKE '%-0_'", f"{c} > 'beta'", f"{c} IS DISTINCT FROM 'alpha'",
                    f"{c} = 'it''s'", f"lower({c}) = 'beta'"]
        elif pa.types.is_boolean(t):
            kind = "bool"
            out += [c, f"NOT {c}", f"{c} = false", f"{c} IS NOT TRUE"]
        elif pa.types.is_integer(t):
            kind = "int"
            out += [f"{c} = 2", f"{c} <> 2", f"{c} > 2", f"{c} <= 1", f"{c} BETWEEN 1 AND 3", f"{c} IN (0, 4)",
                    f"{c} NOT IN (0, 4)", f"{c} % 2 = 1"]
        elif pa.types.is_floating(t):
            kind = "float"
            out += [f"{c} > 0.5", f"{c} = 1.0", f"{c} < 1", f"{c} >= 0", f"isnan({c})", f"{c} IN (0.5, 1.5)",
                    f"{c} BETWEEN 0.5 AND 1.0"]
        elif pa.types.is_timestamp(t):
            kind = "ts"
            out += [f"{c} > TIMESTAMPTZ '2024-01-01 05:00:00+00'", f"{c} <= TIMESTAMPTZ '2024-01-01 03:00:00+00'",
                    f"{c} = TIMESTAMPTZ '2024-01-01 02:00:00+00'",
                    f"{c} BETWEEN TIMESTAMPTZ '2024-01-01 02:00:00+00' AND TIMESTAMPTZ '2024-01-01 08:00:00+00'",
                    f"{c} >= DATE '2024-01-01'", f"{c} < now()", f"date_part('hour', {c}) IN (1, 5)"]
        elif _is_blob(t):
            kind = "blob"
            out += [f"{c} = '\\x02\\x02'::BLOB", f"{c} <> '\\x01'::BLOB", f"octet_length({c}) > 1"]
        elif _is_vector(t):
            kind = "vector"
            out += [f"len({c}) = {t.list_size}", f"{c}[1] > 1", f"list_sum({c}) > 10",
                    f"{c} = [0.0, 1.0, 2.0, 3.0]::FLOAT[{t.list_size}]"]
        elif pa.types.is_list(t) and pa.types.is_string(t.value_type):
            kind = "list"
            out += [f"len({c}) > 1", f"list_contains({c}, '2')", f"{c} = ['0', '1']", f"len({c}) = 0"]
        elif pa.types.is_list(t):
            kind = "list"
            out += [f"len({c}) > 1", f"list_contains({c}, 2)", f"{c} = [0, 1]", f"len({c}) = 0"]
        else:
            raise AssertionError(f"no clauses for {c}: {t}")
        first.setdefault(kind, c)
    # boolean logic: scalar conditions with each other and with blob / vector / list conditions
    s, i, ts = first.get("string"), first.get("int"), first.get("ts")
    odd = [first[k] for k in ("blob", "vector", "list") if k in first]
    if s and i:
        out += [f"{s} = 'beta' OR {i} > 2", f"NOT ({i} = 2 OR {s} IS NULL)", f"({i} > 1 AND {i} < 4) OR {s} LIKE 'al%'",
                f"{s} IS NOT NULL AND {i} IS NULL", f"{s} IN ('alpha', 'beta') AND {i} IN (1, 2, 3)"]
    if ts and i:
        out += [f"{ts} > TIMESTAMPTZ '2024-01-01 03:00:00+00' AND {i} <> 0"]
    key = f'"{schema[0].name}"'
    for o in odd:
        out += [f"{o} IS NULL AND {key} IS NOT NULL", f"{o} IS NOT NULL AND {key} > '{name}-05'",
                f"{o} IS NULL OR {key} LIKE '%-0_'", f"NOT ({o} IS NULL) AND NOT ({o} IS NOT NULL)"]
        if i:
            out += [f"{o} IS NOT NULL AND {i} = 2", f"{o} IS NULL OR {i} IN (1, 3)"]
    if len(odd) > 1:
        out += [f"{odd[0]} IS NULL AND {odd[1]} IS NOT NULL", f"{odd[0]} IS NULL OR {odd[1]} IS NULL"]
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A database with every table filled, and the same rows as in-memory Arrow tables."""
    db = connect(str(tmp_path_factory.mktemp("filters") / "db"))
    copies = {}
    for name in TABLES:
        db.upsert(name, _rows(name))
        copies[name] = db.read(name)  # the stored rows (the reference reads these)
        assert copies[name].num_rows == N
    return db, copies


def test_the_test_tables_hold_nulls_in_every_nullable_column(world):
    _, copies = world
    for name, t in copies.items():
        for f, col in zip(t.schema, t.columns):
            assert col.null_count == (3 if f.nullable else 0), (name, f.name)


@pytest.mark.parametrize("name", TABLES)
def test_ordinary_where_clauses_give_the_rows_of_an_in_memory_copy(world, name):
    db, copies = world
    key = KEYS[name][0]
    con = duckdb_connection(db)
    ref = duckdb.connect()
    ref.register(name, copies[name])
    query = f"SELECT count(*), list({key} ORDER BY {key}) FROM {name} WHERE {{}}"
    wrong = []
    clauses = _clauses(name, copies[name].schema)
    for clause in clauses:
        want = ref.execute(query.format(clause)).fetchall()
        try:
            got = con.execute(query.format(clause)).fetchall()
        except duckdb.Error as exc:
            got = f"error: {exc}"
        if got != want:
            wrong.append(f"{clause}: want {want}, got {got}")
    con.close()
    assert not wrong, f"{name}: {len(wrong)} of {len(clauses)} clauses differ:\n" + "\n".join(wrong)
    assert len(clauses) >= 3 * len(copies[name].schema)


def test_is_null_on_vectors_and_blobs_counts_right(world, tmp_path):
    """The issue's examples, with their counts known: 3 of 12 rows lack each nullable column."""
    db, copies = world
    t = copies["training_images"]
    for col in ("embedding", "mask_png", "image_bytes"):
        nulls = t.column(col).null_count
        assert nulls == 3
        assert run_query(db, f"SELECT count(*) AS n FROM training_images WHERE {col} IS NULL").column("n")[0].as_py() == nulls
        assert run_query(db, f"SELECT count(*) AS n FROM training_images WHERE {col} IS NOT NULL").column("n")[0].as_py() == N - nulls
    both = sum(e is None and m is None for e, m in zip(t.column("embedding").to_pylist(), t.column("mask_png").to_pylist()))
    got = run_query(db, "SELECT count(*) AS n FROM training_images WHERE embedding IS NULL AND mask_png IS NULL")
    assert got.column("n")[0].as_py() == both
    # and from the command line, as the issue typed it
    from typer.testing import CliRunner

    out = CliRunner().invoke(app, ["sql", "SELECT count(*) AS n FROM training_images WHERE embedding IS NULL",
                                   "--db", db.uri, "--format", "csv"], catch_exceptions=False)
    assert out.exit_code == 0, out.output
    assert out.output.split() == ['"n"', "3"]


def test_scalar_filters_reach_lance_and_others_stay_out(world):
    """Routing: Lance gets the projection always, and the filter when it names only scalar columns
    (its statistics and indexes then apply); a filter naming a blob or vector column is evaluated
    by pyarrow on Lance's projected scan, reading the columns it names as well."""
    db, _ = world
    scan = LanceScan(db.dataset("training_images"))
    scalar = (pads.field("image_id") == "training_images-03") | pads.field("caption").is_null()
    s = scan.scanner(columns=["width"], filter=scalar)
    assert isinstance(s, LanceScanner)
    got = s.to_table()
    assert got.column_names == ["width"]
    rows = db.read("training_images", ["image_id", "caption", "mask_png"]).to_pylist()
    assert got.num_rows == sum(r["image_id"] == "training_images-03" or r["caption"] is None for r in rows)

    mixed = pads.field("mask_png").is_null() & (pads.field("image_id") != "training_images-01")
    s = scan.scanner(columns=["width"], filter=mixed)
    assert not isinstance(s, LanceScanner)
    got = s.to_table()
    assert got.column_names == ["width"]
    assert got.num_rows == sum(r["mask_png"] is None and r["image_id"] != "training_images-01" for r in rows)

    assert scan.scanner(columns=["image_id"]).to_table().num_rows == N  # no filter: Lance


def test_explain_shows_scalar_filters_in_the_scan(world):
    db, _ = world
    con = duckdb_connection(db)
    plan = "\n".join(str(r[1]) for r in con.execute(
        "EXPLAIN SELECT width FROM training_images WHERE image_id = 'x' AND mask_png IS NULL").fetchall())
    con.close()
    assert "Filters" in plan and "image_id" in plan
