"""Connection to the fbmem LanceDB database and idempotent, conflict-tolerant writes.

A database is a LanceDB URI: a local folder or an object-store URI (`s3://bucket/prefix`, `gs://`,
`az://`) with `storage_options` (credentials, region, endpoint). Every write is an upsert keyed on
the table's stable key (storage.schema.KEYS), so a rerun or a resumed scan never duplicates rows.
Writers on several processes can race on a commit: Lance raises a conflict and we retry with
backoff, because the upsert is idempotent and replaying it is safe.

Upserts pass every row through this process: right for the small tables (prompts, labels, runs,
errors, the ingest ledger). Image ingest at corpus scale instead appends fragments written by the
Ray workers and commits their metadata in batches (storage/fragments.py, jobs/ingest.py).
"""
from __future__ import annotations

import logging
import os
import random
import time
from typing import Iterable

import lancedb
import pyarrow as pa
import pyarrow.compute as pc

from fbmem.storage.schema import KEYS, TABLES, VECTOR_TABLES, conform, schema_for

log = logging.getLogger(__name__)

_CONFLICT_WORDS = ("conflict", "retryable", "commit", "concurrent")


class StorageError(RuntimeError):
    """A database problem users can act on (wrong dimension, unknown table, ...)."""


def _is_conflict(exc: BaseException) -> bool:
    text = f"{type(exc).__name__}: {exc}".lower()
    return any(word in text for word in _CONFLICT_WORDS)


# Lance's field metadata for an unenforced primary key: the field's 1-based place in the key (what
# LanceTable.set_unenforced_primary_key writes; `lance-schema:unenforced-primary-key: true` is an
# older spelling Lance also reads). Key fields must be non-nullable (storage/schema.py's are).
PRIMARY_KEY_META = "lance-schema:unenforced-primary-key"


def with_primary_key(schema: pa.Schema, keys: Iterable[str]) -> pa.Schema:
    """`schema` with `keys` declared as Lance's unenforced primary key, in that order."""
    for position, key in enumerate(keys, 1):
        i = schema.get_field_index(key)
        field = schema.field(i)
        meta = {**(field.metadata or {}), f"{PRIMARY_KEY_META}:position".encode(): str(position).encode()}
        schema = schema.set(i, field.with_metadata(meta))
    return schema


def has_primary_key(schema: pa.Schema) -> bool:
    return any(k.startswith(PRIMARY_KEY_META.encode()) for f in schema for k in (f.metadata or {}))


def vector_dim(data: pa.Table, column: str = "embedding") -> int | None:
    """The fixed size of a vector column, or None when the batch carries no vectors."""
    if column not in data.column_names:
        return None
    typ = data.schema.field(column).type
    if pa.types.is_fixed_size_list(typ):
        return typ.list_size
    return None


class Database:
    """One fbmem database. Cheap to construct; LanceDB opens tables lazily."""

    def __init__(self, uri: str, storage_options: dict[str, str] | None = None) -> None:
        self.uri = str(uri)
        self.storage_options = dict(storage_options or {})
        self.db = lancedb.connect(self.uri, storage_options=self.storage_options or None)
        self._keyed: set[str] = set()  # tables whose key is known to be declared (see _declare_key)

    # ---- tables -------------------------------------------------------------------------
    def table_names(self) -> list[str]:
        names: list[str] = []
        token = None
        while True:  # list_tables pages; table_names() is deprecated
            page = self.db.list_tables(page_token=token)
            names.extend(page.tables)
            token = page.page_token
            if not token:
                return sorted(names)

    def has_table(self, name: str) -> bool:
        return name in self.table_names()

    def table(self, name: str, dim: int | None = None, create: bool = False):
        """Open `name`; with `create`, make it from its schema when absent (vector tables need dim)."""
        if name not in TABLES:
            raise StorageError(f"unknown table {name!r}; tables: {', '.join(TABLES)}")
        if self.has_table(name):
            try:
                tbl = self.db.open_table(name)
            except ValueError as exc:
                # A folder with data files but no version yet: fragments written by workers
                # (storage/fragments.py) before the table's first commit, e.g. a crashed first ingest.
                if not create or "not found" not in str(exc).lower():
                    raise
            else:
                return self._declare_key(name, tbl) if create else tbl
        if not create:
            raise StorageError(f"table {name!r} does not exist yet in {self.uri}")
        # Declaring the key lets Lance detect two writers inserting the same new key at once
        # (otherwise both commits succeed and the key is duplicated, lance-format/lance#4585); the
        # loser gets a retryable conflict, and our retry then finds the key and updates it. The
        # declaration is in the schema the table is created with: one commit, so no writer ever
        # sees the table without it, and concurrent creators' schemas match.
        schema = with_primary_key(schema_for(name, dim), KEYS[name])
        try:
            tbl = self.db.create_table(name, schema=schema, exist_ok=True)
        except ValueError as exc:  # created meanwhile with another schema (an older fbmem's)
            if "does not match" not in str(exc):
                raise
            tbl = self.db.open_table(name)
        return self._declare_key(name, tbl)

    def _add_missing_columns(self, name: str, tbl):
        """Before a write: add the nullable columns this fbmem's schema has and a table made by an
        older one lacks (all null; a metadata-only commit), so upserts of new rows conform."""
        try:
            dim = tbl.schema.field("embedding").type.list_size if name in VECTOR_TABLES else None
            want = schema_for(name, dim)
        except (KeyError, ValueError):
            return tbl
        missing = [f for f in want if f.name not in tbl.schema.names]
        if not missing:
            return tbl
        if any(not f.nullable for f in missing):
            raise StorageError(f"table {name!r} lacks required columns "
                               f"{', '.join(f.name for f in missing if not f.nullable)}: it was written by another fbmem")
        try:
            tbl.add_columns(pa.schema(missing))
        except Exception as exc:  # noqa: BLE001 - a concurrent writer added them first
            tbl = self.db.open_table(name)
            if any(f.name not in tbl.schema.names for f in missing):
                raise StorageError(f"table {name!r}: could not add columns "
                                   f"{', '.join(f.name for f in missing)}: {exc}") from exc
            return tbl
        log.info("%s: added columns %s (written by an older fbmem)", name, ", ".join(f.name for f in missing))
        return self.db.open_table(name)

    def _declare_key(self, name: str, tbl):
        """Before a write: declare the key of a table created without it (by an older fbmem),
        once per table and process. Declaring it is one commit; it cannot be changed later."""
        if name in self._keyed:
            return tbl
        tbl = self._add_missing_columns(name, tbl)
        if not has_primary_key(tbl.schema):
            try:
                tbl.set_unenforced_primary_key(list(KEYS[name]))
            except Exception as exc:  # noqa: BLE001 - a concurrent writer declared it first, or a nullable key
                tbl = self.db.open_table(name)
                if not has_primary_key(tbl.schema):
                    log.warning("%s: the key %s could not be declared to Lance (%s): concurrent writers "
                                "may duplicate new keys", name, ", ".join(KEYS[name]), exc)
        self._keyed.add(name)
        return tbl

    def table_dim(self, name: str) -> int | None:
        if name not in VECTOR_TABLES or not self.has_table(name):
            return None
        try:
            typ = self.table(name).schema.field("embedding").type
        except ValueError as exc:  # data files but no version yet (see `table`): no table yet
            if "not found" in str(exc).lower():
                return None
            raise
        return typ.list_size

    def count(self, name: str, where: str | None = None) -> int:
        if not self.has_table(name):
            return 0
        return int(self.table(name).count_rows(where) if where else self.table(name).count_rows())

    def dataset(self, name: str):
        """The Lance dataset behind a table (for scans with pushdown, DuckDB, Ray)."""
        return self.table(name).to_lance()

    def table_uri(self, name: str) -> str:
        """Where the Lance dataset of `name` lives (it may not exist yet): LanceDB's layout,
        `<db>/<name>.lance`. Ray workers open it with `storage_options` (storage/fragments.py)."""
        if name not in TABLES:
            raise StorageError(f"unknown table {name!r}; tables: {', '.join(TABLES)}")
        base = self.uri.rstrip("/")
        if "://" not in base:
            base = os.path.abspath(base)
        return f"{base}/{name}.lance"

    # ---- reads --------------------------------------------------------------------------
    def read(
        self, name: str, columns: list[str] | None = None, where: str | None = None
    ) -> pa.Table:
        """A projected, filtered scan. Empty table with the right columns when absent."""
        if not self.has_table(name):
            dim = 1 if name in VECTOR_TABLES else None
            schema = schema_for(name, dim)
            if columns:
                schema = pa.schema([schema.field(c) for c in columns])
            return schema.empty_table()
        ds = self.dataset(name)
        return ds.to_table(columns=columns, filter=where)

    def existing_keys(self, name: str, where: str | None = None) -> set[str]:
        """Keys already written, so a rerun skips them before doing any heavy work."""
        key = KEYS[name]
        if len(key) != 1:
            raise StorageError(f"table {name!r} has a composite key")
        col = self.read(name, columns=[key[0]], where=where).column(0)
        return set(col.to_pylist())

    # ---- writes -------------------------------------------------------------------------
    def upsert(self, name: str, data: pa.Table | Iterable[pa.RecordBatch], retries: int = 10) -> int:
        """Insert-or-replace rows by the table's key. Returns the number of rows sent.

        Duplicated keys inside one batch keep the last row (a merge would otherwise fail).
        """
        if not isinstance(data, pa.Table):
            batches = list(data)
            if not batches:
                return 0
            data = pa.Table.from_batches(batches)
        if data.num_rows == 0:
            return 0
        dim = vector_dim(data) if name in VECTOR_TABLES else None
        existing_dim = self.table_dim(name)
        if name in VECTOR_TABLES and existing_dim is not None and dim is not None and dim != existing_dim:
            raise StorageError(
                f"{name}: this database holds {existing_dim}-d embeddings but the batch has {dim}-d ones; "
                "embeddings of different models cannot share a table: use another --db"
            )
        if dim is None:
            dim = existing_dim or (1 if name in VECTOR_TABLES else None)
        data = conform(data, schema_for(name, dim))
        data = _dedupe_last(data, KEYS[name])
        tbl = self.table(name, dim=dim, create=True)
        keys = list(KEYS[name])
        delay = 0.05
        for attempt in range(retries + 1):
            try:
                (
                    tbl.merge_insert(keys if len(keys) > 1 else keys[0])
                    .when_matched_update_all()
                    .when_not_matched_insert_all()
                    .execute(data, on_bad_vectors="null")
                )
                return data.num_rows
            except Exception as exc:  # Lance raises plain OSError/RuntimeError subclasses
                if attempt == retries or not _is_conflict(exc):
                    raise
                log.debug("commit conflict on %s (attempt %d): %s", name, attempt + 1, exc)
                time.sleep(delay * (1 + random.random()))
                delay = min(delay * 2, 2.0)
                tbl = self.db.open_table(name)
        return 0  # unreachable

    def delete(self, name: str, where: str) -> None:
        if self.has_table(name):
            self.table(name).delete(where)


def _dedupe_last(data: pa.Table, keys: tuple[str, ...]) -> pa.Table:
    if data.num_rows < 2:
        return data
    if len(keys) == 1:
        key = data.column(keys[0])
    else:
        key = pc.binary_join_element_wise(*[pc.cast(data.column(k), pa.string()) for k in keys], "\x1f")
    seen: dict[object, int] = {}
    for i, k in enumerate(key.to_pylist()):
        seen[k] = i
    if len(seen) == data.num_rows:
        return data
    return data.take(sorted(seen.values()))


def connect(uri: str, storage_options: dict[str, str] | None = None) -> Database:
    """Open (or create) the database at a folder or object-store URI."""
    return Database(uri, storage_options)
