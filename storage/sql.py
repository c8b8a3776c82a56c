"""DuckDB over the Lance tables, read-only.

Each table is registered as a view of its Lance dataset (the Arrow route: DuckDB scans it as an
Arrow dataset and pushes projections and simple filters down), so a query reads only the columns
and rows it needs, even on object storage. `INSTALL lance` would need the network; this does not.

SQL reaches the tables and nothing else: the connection has no file system or network access
(`COPY ... TO`, `ATTACH`, `read_text`, `INSTALL` ... are refused) and its settings are locked, so a
query cannot turn that back on. `DROP`, `DELETE` or `CREATE` touch only the in-memory catalog of a
connection that lives for one query. Results leave through the caller (`fbmem sql --out`), which
writes them from Arrow in Python.
"""
from __future__ import annotations

import re
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.dataset as pads

from fbmem.storage.database import Database
from fbmem.storage.schema import TABLES

# Every connection's settings. Registered Arrow objects stay readable with external access off.
READ_ONLY_SETTINGS: dict[str, object] = {
    "enable_external_access": False,  # no files, no network: COPY TO, ATTACH, read_*(), glob, INSTALL, EXPORT
    "python_enable_replacements": False,  # a name is a registered table, never a Python variable
    "autoinstall_known_extensions": False,
    "autoload_known_extensions": False,
    "lock_configuration": True,  # last: no SET / RESET / PRAGMA can change any of the above
}

READ_ONLY_HINT = ("fbmem sql is read-only: a query cannot read or write files, attach databases, "
                  "install extensions or change settings; export a result with --format csv|json|parquet --out FILE")


class QueryError(ValueError):
    """A query DuckDB could not run or refused (the CLI prints it as one line)."""

# Derived views every query may use. `labels` keeps every labelling run (older settings stay in the
# table); most questions are about the latest label of each generation under each rule.
DERIVED_VIEWS = {
    "current_labels": """
        SELECT * FROM labels
        QUALIFY row_number() OVER (PARTITION BY generation_id, rule ORDER BY labelled_at DESC, label_id) = 1""",
}


def duckdb_connection(db: Database) -> duckdb.DuckDBPyConnection:
    """A fresh, read-only DuckDB connection (READ_ONLY_SETTINGS) with one view per table (existing
    or not) and the DERIVED_VIEWS."""
    con = duckdb.connect(config=dict(READ_ONLY_SETTINGS))
    existing = set(db.table_names())
    for name in TABLES:
        if name in existing:
            con.register(name, LanceScan(db.dataset(name)))
        else:
            # an empty view with the table's columns: queries over a fresh database return no
            # rows instead of failing on a missing table
            con.register(name, db.read(name))
    for name, body in DERIVED_VIEWS.items():
        con.execute(f"CREATE VIEW {name} AS {body}")
    return con


def named_sql_dir() -> Path:
    """The folder of the named queries (the repository's `sql/`, installed as `fbmem.sql`)."""
    import importlib.util

    spec = importlib.util.find_spec("fbmem.sql")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the named queries (package fbmem.sql) are not installed")
    return Path(list(spec.submodule_search_locations)[0])


def load_query(text_or_path: str) -> str:
    """A SQL string, a `.sql` file, or the name of a named query (e.g. `label_distribution`)."""
    stripped = text_or_path.strip()
    if stripped.lower().endswith(".sql"):
        p = Path(stripped)
        if not p.is_file():
            raise FileNotFoundError(f"SQL file not found: {p}")
        return p.read_text()
    if re.fullmatch(r"[A-Za-z_]\w*", stripped):
        p = named_sql_dir() / f"{stripped}.sql"
        if p.is_file():
            return p.read_text()
        names = sorted(q.stem for q in named_sql_dir().glob("*.sql"))
        raise FileNotFoundError(f"no named query {stripped!r}; named queries: {', '.join(names)}")
    return text_or_path


def run_named_query(db: Database, name: str, params: dict[str, object] | None = None, *,
                    folder: Path | None = None):
    """The named query `name` (`sql/NAME.sql`, or `folder/NAME.sql`) with its `-- param` defaults,
    overridden by `params`: what `fbmem sql NAME --param k=v` runs, as a pyarrow Table."""
    text = load_query(str(Path(folder) / f"{name}.sql") if folder is not None else name)
    return run_query(db, text, query_params(text, params or {}))


def run_query(db: Database, sql: str, params: dict[str, object] | None = None):
    """Run `sql` with named parameters ($name) and return a pyarrow Table."""
    con = duckdb_connection(db)
    try:
        rel = con.sql(sql, params=params or None)
        if rel is None:  # a statement that returns nothing (e.g. CREATE VIEW)
            return None
        return _to_arrow(rel)
    except duckdb.Error as exc:
        raise _query_error(exc) from exc
    finally:
        con.close()


def _query_error(exc: duckdb.Error) -> QueryError:
    """DuckDB's message on one line; a refusal by the read-only settings says why and what to do."""
    text = " ".join(str(exc).split())
    if isinstance(exc, duckdb.PermissionException) or "configuration has been locked" in text:
        return QueryError(f"{READ_ONLY_HINT} ({text})")
    return QueryError(text)


def _lance_filterable(t: pa.DataType) -> bool:
    """Column types whose filters DuckDB may hand to Lance: scalars. Lance refuses filters on
    binary columns (images, masks: "not yet supported by Substrait conversion") and cannot see
    vector columns (fixed-size lists) in a filter at all; lists and structs are left out too."""
    return (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_integer(t)
            or pa.types.is_floating(t) or pa.types.is_boolean(t) or pa.types.is_timestamp(t)
            or pa.types.is_date(t))


def _binds(expression: pads.Expression, schema: pa.Schema) -> bool:
    """Whether `expression` can be evaluated on rows of `schema` (every column it names is there)."""
    try:
        pads.dataset(schema.empty_table()).scanner(filter=expression)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
        return False
    return True


class LanceScan(pads.Dataset):
    """A Lance dataset as DuckDB's Arrow scan sees it: projections always reach Lance, filters
    only when Lance can evaluate them.

    DuckDB calls `scanner(columns=..., filter=...)` with the columns a query reads and the filter it
    pushed down (a pyarrow expression; DuckDB does not check the rows again). A filter naming only
    scalar columns goes to Lance, which uses its statistics and indexes. A filter naming a binary or
    vector column (`mask_png IS NULL`, `embedding IS NOT NULL`, alone or ANDed with others) is
    evaluated whole by pyarrow on Lance's projected scan, which then reads the columns the filter
    names too: pyarrow is what DuckDB evaluates it with on an in-memory Arrow table, so the same rows.
    (pyarrow expressions cannot be taken apart, so the scalar part of such a filter is not split off
    for Lance.)

    Like `lance.LanceDataset`, a pyarrow Dataset in type only (DuckDB recognises it by type); only
    `schema` and `scanner` are meant to be called.
    """

    def __init__(self, dataset) -> None:  # no pyarrow dataset underneath, as in LanceDataset
        self._lance = dataset
        self._filterable = pa.schema([f for f in dataset.schema if _lance_filterable(f.type)])

    @property
    def schema(self) -> pa.Schema:
        return self._lance.schema

    def scanner(self, columns: list[str] | None = None, filter: pads.Expression | None = None, **kwargs):
        if filter is None or _binds(filter, self._filterable):
            return self._lance.scanner(columns=columns, filter=filter, **kwargs)
        schema = self.schema
        named = [f.name for i, f in enumerate(schema) if not _binds(filter, schema.remove(i))]
        read = None if columns is None else list(dict.fromkeys([*columns, *named]))
        reader = self._lance.scanner(columns=read, **kwargs).to_reader()
        return pads.Scanner.from_batches(reader, columns=columns, filter=filter)


def _to_arrow(result):
    """DuckDB 2.0 names it to_arrow_table, 1.x arrow(); accept both."""
    fetch = getattr(result, "to_arrow_table", None) or getattr(result, "arrow")
    return fetch()


_PARAM_USE = re.compile(r"\$([A-Za-z_]\w*)")
_PARAM_DEFAULT = re.compile(r"^\s*--\s*param\s+([A-Za-z_]\w*)\s*=\s*(.+?)\s*$", re.MULTILINE)


def query_params(sql: str, given: dict[str, object]) -> dict[str, object]:
    """The `$name` parameters a query uses: given values, else `-- param name = default` lines.

    DuckDB rejects unused parameters and unbound ones; naming both cases here gives users a
    message about their flag, not a binder error.
    """
    import yaml

    used = set(_PARAM_USE.findall(_strip_comments(sql)))
    defaults = {k: yaml.safe_load(v) for k, v in _PARAM_DEFAULT.findall(sql)}
    unknown = set(given) - used
    if unknown:
        raise ValueError(f"unknown --param {', '.join(sorted(unknown))}; this query takes: {', '.join(sorted(used)) or 'none'}")
    out = {}
    for name in sorted(used):
        if name in given:
            out[name] = given[name]
        elif name in defaults:
            out[name] = defaults[name]
        else:
            raise ValueError(f"the query needs --param {name}=...")
    return out


def _strip_comments(sql: str) -> str:
    return re.sub(r"--[^\n]*", "", sql)
