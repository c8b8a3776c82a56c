"""Bulk writes at corpus scale: Lance fragments written by Ray workers, metadata committed in batches.

DESIGN.md, "Running at corpus scale": the driver never carries rows. A worker writes its rows as
data files (`write_fragments`, lance-ray's fragment writer) and hands back only their fragment
metadata (JSON, a few hundred bytes); the driver's `FragmentCommitter` collects it and commits one
`Append` per N fragments or T seconds (`read_version` = the version it read; Lance rebases an
Append over any concurrent commit and retries). Fragments that are never committed (a crash) are
invisible files, removed by `cleanup` once they are older than Lance's unverified-file age.

Appending does not replace rows the way an upsert does, so two copies of one key can be committed:
the same image twice in a corpus (in different blocks written before either was committed), or a
row written again by a rerun racing a commit. `remove_duplicates` restores one row per key: for the
keys it is given it keeps the newest row (by the table's timestamp column, then row address) and
deletes the others by row address. The rule is a fixed total order, so any number of such calls,
in any order and concurrently, end with the same single row per key. Lance deletes by
`_rowaddr` (a compaction in between moves rows: the delete then matches nothing, and the call
checks again and repeats).

Also here: the key check's lookup (`stored_rows`), compaction (`compact`, distributed over Ray with
lance-ray above a size), the scalar index on the key (`maintain_key_index`), `cleanup` of old
versions, and `table_stats`. Everything takes `storage_options` so it works on object stores.
Small tables (errors, runs, the ledger) keep `Database.upsert`.
"""
from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import lance
import pyarrow as pa
import pyarrow.compute as pc
from lance.fragment import FragmentMetadata

from fbmem.storage.keys import sql_list

log = logging.getLogger(__name__)

# The column that orders copies of one key (the newest is kept), per bulk-written table.
ORDER_COLUMN = {"training_images": "ingested_at", "generations": "created_at"}
_IN_CHUNK = 1000  # keys per `IN (...)` filter
_CONFLICT_WORDS = ("conflict", "retryable", "concurrent", "preempted", "too many concurrent")


class FragmentError(RuntimeError):
    """A bulk write that could not be completed (after retries)."""


def is_conflict(exc: BaseException) -> bool:
    text = f"{type(exc).__name__}: {exc}".lower()
    return any(word in text for word in _CONFLICT_WORDS)


def _missing(exc: BaseException) -> bool:
    text = str(exc).lower()
    return "not found" in text or "does not exist" in text or "no such file" in text


def open_dataset(uri: str, storage_options: dict[str, str] | None = None) -> lance.LanceDataset | None:
    """The latest version of the dataset at `uri`, or None when there is none yet."""
    try:
        return lance.dataset(uri, storage_options=storage_options or None)
    except (ValueError, FileNotFoundError, OSError) as exc:
        if _missing(exc):
            return None
        raise


# ------------------------------------------------------------------------------------------ workers


def write_fragments(
    table: pa.Table,
    uri: str,
    *,
    schema: pa.Schema,
    storage_options: dict[str, str] | None = None,
    max_rows_per_file: int = 1 << 20,
    data_storage_version: str | None = None,
) -> list[str]:
    """Write `table` (already conformed to `schema`) as data files of the dataset at `uri`, from a
    worker, and return the fragments' metadata as JSON strings for the driver to commit. Nothing is
    visible in the table until then. The dataset may not exist yet (the first commit creates it)."""
    if table.num_rows == 0:
        return []
    from lance_ray.fragment import write_fragment

    written = write_fragment(
        [table], uri, schema=schema, storage_options=storage_options or None,
        max_rows_per_file=max_rows_per_file, data_storage_version=data_storage_version,
    )
    return [json.dumps(frag.to_json()) for frag, _ in written]


def _rows_for_keys(ds: lance.LanceDataset, key: str, keys: Sequence[str], columns: Sequence[str]) -> pa.Table:
    cols = list(dict.fromkeys([key, *columns]))
    parts = [
        ds.to_table(columns=cols, filter=f"{key} IN ({sql_list(keys[i : i + _IN_CHUNK])})", with_row_address=True)
        for i in range(0, len(keys), _IN_CHUNK)
    ]
    return pa.concat_tables(parts) if parts else pa.table({})


def stored_rows(
    uri: str, key: str, keys: Iterable[str], columns: Sequence[str] = (), storage_options: dict[str, str] | None = None
) -> pa.Table | None:
    """The stored rows (with `columns` and `_rowaddr`) whose `key` is one of `keys`: a filtered
    scan of the committed table that the BTREE index on the key answers once it exists. None when
    the table does not exist yet. Run by the key check on the workers, a batch at a time."""
    ds = open_dataset(uri, storage_options)
    wanted = sorted({k for k in keys if k is not None})
    if ds is None or not wanted:
        return None
    return _rows_for_keys(ds, key, wanted, columns)


def duplicate_keys(rows: pa.Table, key: str) -> list[str]:
    """Keys that occur more than once in `rows`."""
    if rows.num_rows < 2:
        return []
    counts = pc.value_counts(rows.column(key))
    values, n = counts.field("values"), counts.field("counts")
    return values.filter(pc.greater(n, 1)).to_pylist()


def _losers(rows: pa.Table, key: str, order: str) -> list[tuple[str, int]]:
    """(key, row address) of every row but the newest of its key (newest: `order`, then address)."""
    dups = set(duplicate_keys(rows, key))
    if not dups:
        return []
    rows = rows.filter(pc.is_in(rows.column(key), value_set=pa.array(sorted(dups), rows.schema.field(key).type)))
    rows = rows.sort_by([(key, "ascending"), (order, "descending"), ("_rowaddr", "descending")])
    out: list[tuple[str, int]] = []
    previous = None
    for k, addr in zip(rows.column(key).to_pylist(), rows.column("_rowaddr").to_pylist()):
        if k == previous:
            out.append((k, addr))
        previous = k
    return out


def remove_duplicates(
    uri: str,
    key: str,
    order: str,
    keys: Iterable[str],
    storage_options: dict[str, str] | None = None,
    attempts: int = 8,
) -> int:
    """Leave one row per key among `keys` (the newest, see the module's docstring); returns how
    many rows were deleted. Checks again after each delete, so a concurrent commit or compaction
    costs a repeat, never a duplicate left behind."""
    wanted = sorted({k for k in keys if k is not None})
    removed, delay = 0, 0.05
    for _ in range(attempts):
        ds = open_dataset(uri, storage_options)
        if ds is None or not wanted:
            return removed
        doomed = _losers(_rows_for_keys(ds, key, wanted, [order]), key, order)
        if not doomed:
            return removed
        dup_keys = sorted({k for k, _ in doomed})
        addrs = ", ".join(str(a) for _, a in doomed)
        try:
            res = ds.delete(f"{key} IN ({sql_list(dup_keys)}) AND _rowaddr IN ({addrs})")
            removed += int((res or {}).get("num_deleted_rows", len(doomed)))
        except Exception as exc:  # noqa: BLE001 - Lance raises plain OSError/RuntimeError subclasses
            if not is_conflict(exc):
                raise
            log.debug("delete of duplicates conflicted; checking again: %s", exc)
            time.sleep(delay * (1 + random.random()))
            delay = min(delay * 2, 2.0)
    raise FragmentError(f"{uri}: duplicates of {len(wanted)} keys still present after {attempts} attempts")


def fragment_keys(
    uri: str, data_files: Iterable[str], key: str, storage_options: dict[str, str] | None = None
) -> list[str]:
    """The keys stored in the fragments that hold `data_files` (as committed: ids are assigned at
    commit, file names are not). Used after a commit to check its keys for duplicates."""
    ds = open_dataset(uri, storage_options)
    paths = set(data_files)
    if ds is None or not paths:
        return []
    keys: list[str] = []
    for frag in ds.get_fragments():
        if any(f.path in paths for f in frag.metadata.files):
            keys += frag.to_table(columns=[key]).column(key).to_pylist()
    return keys


def dedupe_commit(
    uri: str, data_files: Sequence[str], key: str, order: str, storage_options: dict[str, str] | None = None
) -> int:
    """After a commit: one row per key among the keys it added (a Ray task runs this)."""
    return remove_duplicates(uri, key, order, fragment_keys(uri, data_files, key, storage_options), storage_options)


# ------------------------------------------------------------------------------------------- driver


@dataclass
class Commit:
    version: int
    fragments: int
    rows: int
    data_files: list[str]


@dataclass
class FragmentCommitter:
    """Driver side: collects fragment metadata and commits it as one Append per `every_fragments`
    fragments or `every_s` seconds (checked when metadata arrives, and at `commit()`)."""

    uri: str
    storage_options: dict[str, str] | None = None
    every_fragments: int = 16
    every_s: float = 60.0
    retries: int = 10
    pending: list[FragmentMetadata] = field(default_factory=list)
    commits: int = 0
    _last: float = field(default_factory=time.monotonic)

    def add(self, fragments_json: Iterable[str]) -> None:
        self.pending += [FragmentMetadata.from_json(f) for f in fragments_json]

    def due(self) -> bool:
        if not self.pending:
            return False
        return len(self.pending) >= self.every_fragments or time.monotonic() - self._last >= self.every_s

    def commit(self) -> Commit | None:
        """Commit what is pending (an Append on the latest version); None when nothing is."""
        self._last = time.monotonic()
        if not self.pending:
            return None
        frags, delay = self.pending, 0.05
        for attempt in range(self.retries + 1):
            ds = open_dataset(self.uri, self.storage_options)
            if ds is None:
                raise FragmentError(f"no dataset at {self.uri}: create the table before committing fragments")
            try:
                new = lance.LanceDataset.commit(
                    self.uri, lance.LanceOperation.Append(frags), read_version=ds.version,
                    storage_options=self.storage_options or None,
                )
                break
            except Exception as exc:  # noqa: BLE001 - Lance raises plain OSError/RuntimeError subclasses
                if attempt == self.retries or not is_conflict(exc):
                    raise
                log.debug("append conflicted (attempt %d): %s", attempt + 1, exc)
                time.sleep(delay * (1 + random.random()))
                delay = min(delay * 2, 2.0)
        self.pending = []
        self.commits += 1
        return Commit(
            version=new.version, fragments=len(frags), rows=sum(f.physical_rows for f in frags),
            data_files=[d.path for f in frags for d in f.files],
        )


# -------------------------------------------------------------------------------------- maintenance


def compact(
    uri: str,
    storage_options: dict[str, str] | None = None,
    *,
    target_rows: int = 1 << 20,
    min_fragments: int = 2,
    distributed_min_rows: int = 4_000_000,
    workers: int = 4,
    ray_remote_args: dict[str, Any] | None = None,
) -> dict[str, int]:
    """Merge small fragments (and fold deletions in). In this process below `distributed_min_rows`,
    else with lance-ray: the plan here, one Ray task per rewrite group, one commit."""
    ds = open_dataset(uri, storage_options)
    if ds is None:
        return {"fragments_removed": 0, "fragments_added": 0}
    frags = ds.get_fragments()
    if len(frags) < min_fragments and not any(f.metadata.deletion_file for f in frags):
        return {"fragments_removed": 0, "fragments_added": 0}
    if ds.count_rows() >= distributed_min_rows > 0:
        import lance_ray

        metrics = lance_ray.compact_files(
            uri, compaction_options={"target_rows_per_fragment": target_rows}, num_workers=workers,
            storage_options=storage_options or None, ray_remote_args=ray_remote_args,
        )
    else:
        metrics = ds.optimize.compact_files(target_rows_per_fragment=target_rows)
    if metrics is None:
        return {"fragments_removed": 0, "fragments_added": 0}
    return {"fragments_removed": metrics.fragments_removed, "fragments_added": metrics.fragments_added}


def _indexed_columns(ds: lance.LanceDataset) -> set[str]:
    try:
        return {name for ix in ds.describe_indices() for name in ix.field_names}
    except AttributeError:  # older pylance
        return {c for ix in ds.list_indices() for c in ix["fields"]}


def _index_names_on(ds: lance.LanceDataset, column: str) -> list[str]:
    try:
        return sorted({ix.name for ix in ds.describe_indices() if column in ix.field_names})
    except AttributeError:  # older pylance
        return sorted({ix["name"] for ix in ds.list_indices() if column in ix["fields"]})


def maintain_key_index(
    uri: str, key: str, min_rows: int, storage_options: dict[str, str] | None = None
) -> str:
    """The BTREE index on the key that the key checks use: folded forward over new fragments when
    it exists, built once the table has `min_rows` rows (below that a scan of the key column is
    cheaper than index lookups: NOTES of issue 12, 100k rows). Returns what was done."""
    ds = open_dataset(uri, storage_options)
    if ds is None:
        return "none"
    if key in _indexed_columns(ds):
        # the key's index only: the vector index is the scan's index stage's to update or rebuild
        # (storage/vector_index.update_index decides by how much of the table it does not cover)
        ds.optimize.optimize_indices(index_names=_index_names_on(ds, key))
        return "optimized"
    if ds.count_rows() >= min_rows:
        ds.create_scalar_index(key, "BTREE")
        return "created"
    return "none"


def cleanup(uri: str, storage_options: dict[str, str] | None = None, *, retention_s: float = 86_400.0) -> int:
    """Remove versions older than `retention_s` (the latest always stays); returns how many."""
    ds = open_dataset(uri, storage_options)
    if ds is None:
        return 0
    stats = ds.cleanup_old_versions(older_than=timedelta(seconds=retention_s))
    return int(stats.old_versions)


def table_stats(uri: str, storage_options: dict[str, str] | None = None) -> dict[str, int]:
    """Rows, versions kept, fragments and data files of the latest version."""
    ds = open_dataset(uri, storage_options)
    if ds is None:
        return {"rows": 0, "versions": 0, "fragments": 0, "data_files": 0}
    frags = ds.get_fragments()
    return {
        "rows": ds.count_rows(),
        "versions": len(ds.versions()),
        "fragments": len(frags),
        "data_files": sum(len(f.metadata.files) for f in frags),
    }
