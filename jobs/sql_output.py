"""Rendering a query result for the terminal or a file (table, CSV, JSON, Parquet)."""
from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq


def _is_vector(t: pa.DataType) -> bool:
    return pa.types.is_fixed_size_list(t) or (pa.types.is_list(t) and t.value_type == pa.float32())


def _is_nested(t: pa.DataType) -> bool:
    """Types a CSV cell cannot hold as they are: lists, structs, maps, unions."""
    return (pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)
            or pa.types.is_list_view(t) or pa.types.is_large_list_view(t) or pa.types.is_struct(t)
            or pa.types.is_map(t) or pa.types.is_union(t))


def _json_cell(v) -> str | None:
    return None if v is None else json.dumps(v, default=str, ensure_ascii=False)


def _printable(table: pa.Table) -> pa.Table:
    """Binary columns (images, masks) are shown by size, vectors by dimension: never dumped."""
    cols, names = [], []
    for name, col in zip(table.column_names, table.columns):
        t = col.type
        if (pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_binary_view(t)
                or pa.types.is_fixed_size_binary(t)):
            col = pa.array([None if v is None else f"<{len(v)} bytes>" for v in col.to_pylist()], pa.string())
        elif _is_vector(t):
            col = pa.array([None if v is None else f"<vector {len(v)}>" for v in col.to_pylist()], pa.string())
        cols.append(col)
        names.append(name)
    return pa.Table.from_arrays(cols, names=names)  # keeps repeated column names (SELECT a, a)


def _csv_ready(table: pa.Table) -> pa.Table:
    """`_printable`, then every other list / struct / map column as JSON text per cell (the CSV
    writer has no nested types: `neurons` lists made `--format csv` fail with ArrowInvalid).
    Map cells become lists of [key, value] pairs, as pyarrow gives them."""
    t = _printable(table)
    cols = []
    for col in t.columns:
        if _is_nested(col.type):
            col = pa.array([_json_cell(v) for v in col.to_pylist()], pa.string())
        elif pa.types.is_string_view(col.type):  # the CSV writer does not take string views
            col = col.cast(pa.string())
        cols.append(col)
    return pa.Table.from_arrays(cols, names=t.column_names)


def format_table(table: pa.Table, max_rows: int = 200) -> str:
    t = _printable(table)
    rows = t.slice(0, max_rows).to_pylist()
    headers = t.column_names

    def cell(v) -> str:
        if isinstance(v, float):
            return f"{v:.4f}"
        return "" if v is None else str(v)

    grid = [[cell(r[h]) for h in headers] for r in rows]
    widths = [max([len(h)] + [len(g[i]) for g in grid]) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths))
    sep = "  ".join("-" * w for w in widths)
    body = ["  ".join(c.ljust(w) for c, w in zip(g, widths)) for g in grid]
    tail = [f"({t.num_rows} rows, showing {max_rows})"] if t.num_rows > max_rows else [f"({t.num_rows} rows)"]
    return "\n".join([line, sep, *body, *tail])


def render(table: pa.Table, fmt: str, out: Path | None = None) -> str | None:
    """Returns text to print, or None when written to `out`."""
    if fmt == "parquet":
        if out is None:
            raise ValueError("--format parquet needs --out FILE")
        pq.write_table(table, out)
        return None
    if fmt == "table":
        text = format_table(table)
    elif fmt == "csv":
        buf = io.BytesIO()
        pacsv.write_csv(_csv_ready(table), buf)
        text = buf.getvalue().decode()
    elif fmt == "json":
        text = json.dumps(_printable(table).to_pylist(), default=str, indent=1)
    else:
        raise ValueError(f"unknown format {fmt!r}")
    if out is not None:
        Path(out).write_text(text)
        return None
    return text
