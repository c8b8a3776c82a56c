"""DuckDB over the Lance tables.

Each table is registered as a view of its Lance dataset (the Arrow route: DuckDB scans it as an
Arrow dataset and pushes projections and simple filters down), so a query reads only the columns
and rows it needs, even on object storage. `INSTALL lance` would need the network; this does not.
"""
from __future__ import annotations

import re
from pathlib import Path

import duckdb

from fbmem.storage.database import Database
from fbmem.storage.schema import TABLES

# Derived views every query may use. `labels` keeps every labelling run (older settings stay in the
# table); most questions are about the latest label of each generation under each rule.
DERIVED_VIEWS = {
    "current_labels": """
        SELECT * FROM labels
        QUALIFY row_number() OVER (PARTITION BY generation_id, rule ORDER BY labelled_at DESC, label_id) = 1""",
}


def duckdb_connection(db: Database) -> duckdb.DuckDBPyConnection:
    """A fresh DuckDB connection with one view per table (existing or not) and the DERIVED_VIEWS."""
    con = duckdb.connect()
    existing = set(db.table_names())
    for name in TABLES:
        if name in existing:
            con.register(name, db.dataset(name))
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
        if rel is None:  # a statement that returns nothing (e.g. SET)
            return None
        return _to_arrow(rel)
    finally:
        con.close()


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
