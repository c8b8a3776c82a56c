"""`fbmem sql --format csv|json|table` renders every table: list and struct columns as JSON text in
a CSV cell (issue 15: `SELECT * FROM neurons` failed with ArrowInvalid on the `neurons` list)."""
from __future__ import annotations

import csv
import io
import json
from datetime import datetime, timezone

import pyarrow as pa
import pytest

from fbmem.jobs.sql_output import render
from fbmem.storage.database import connect
from fbmem.storage.schema import TABLES, schema_for
from fbmem.storage.sql import run_query

DIM = 4


def _value(t: pa.DataType, i: int):
    """A non-null value of type t, different per row i."""
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return f"v{i}, \"quoted\"\nline"
    if pa.types.is_boolean(t):
        return i % 2 == 0
    if pa.types.is_integer(t):
        return i + 1
    if pa.types.is_floating(t):
        return 0.25 * (i + 1)
    if pa.types.is_timestamp(t):
        return datetime(2024, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    if pa.types.is_binary(t) or pa.types.is_large_binary(t):
        return b"\x89PNG" * (i + 1)
    if pa.types.is_fixed_size_list(t):
        return [0.5] * t.list_size
    if pa.types.is_list(t):
        values = [3, 1, 2][: i + 2]
        return [str(v) for v in values] if pa.types.is_string(t.value_type) else values
    raise AssertionError(f"no test value for {t}")


def _table(name: str) -> pa.Table:
    """Two rows of `name`'s schema: every column set, then only the non-nullable ones."""
    schema = schema_for(name, DIM)
    full = {f.name: _value(f.type, 0) for f in schema}
    sparse = {f.name: (_value(f.type, 1) if not f.nullable else None) for f in schema}
    return pa.Table.from_pylist([full, sparse], schema=schema)


@pytest.mark.parametrize("name", TABLES)
def test_csv_writes_every_table(name):
    t = _table(name)
    text = render(t, "csv")
    rows = list(csv.DictReader(io.StringIO(text)))
    assert len(rows) == 2 and list(rows[0]) == t.column_names
    for f in t.schema:
        full, sparse = rows[0][f.name], rows[1][f.name]
        if pa.types.is_fixed_size_list(f.type):
            assert full == f"<vector {DIM}>"  # vectors are summarized, never dumped
        elif pa.types.is_large_binary(f.type):
            assert full == "<4 bytes>"
        elif pa.types.is_list(f.type):  # e.g. neurons: JSON text in the cell
            assert json.loads(full) in ([3, 1], ["3", "1"])
        elif pa.types.is_string(f.type):
            assert full == t.column(f.name)[0].as_py()  # quotes and newlines survive CSV quoting
        if f.nullable:
            assert sparse == ""
    assert json.loads(render(t, "json"))[0].keys() == set(t.column_names)
    assert render(t, "table").splitlines()[0].split()[0] == t.column_names[0]


def test_sql_csv_of_neurons_and_of_struct_and_map_columns(tmp_path):
    """The reported command's path: DuckDB over the stored table, then --format csv."""
    db = connect(str(tmp_path / "db"))
    db.upsert("neurons", _table("neurons"))
    res = run_query(db, "SELECT neuron_set_id, neurons, layer_idx FROM neurons ORDER BY layer_idx")
    rows = list(csv.DictReader(io.StringIO(render(res, "csv"))))
    assert [r["neurons"] for r in rows] == ["[3, 1]", ""]  # a null list is an empty cell
    res = run_query(db, "SELECT {'layer': 2, 'neurons': [5, 7], 'name': 'mid'} AS s, MAP {'a': 1, 'b': 2} AS m, "
                        "[[1, 2], [3]] AS nested, NULL::INTEGER[] AS empty, neurons AS a, neurons AS a FROM neurons "
                        "LIMIT 1")
    rows = list(csv.reader(io.StringIO(render(res, "csv"))))
    assert rows[0] == ["s", "m", "nested", "empty", "a", "a"]  # repeated names kept
    cell = dict(zip(rows[0][:4], rows[1][:4]))
    assert json.loads(cell["s"]) == {"layer": 2, "neurons": [5, 7], "name": "mid"}
    assert json.loads(cell["m"]) == [["a", 1], ["b", 2]]
    assert json.loads(cell["nested"]) == [[1, 2], [3]] and cell["empty"] == ""
    assert json.loads(rows[1][4]) == json.loads(rows[1][5])
    out = tmp_path / "n.csv"
    assert render(res, "csv", out) is None and out.read_text().startswith('"s","m","nested"')
