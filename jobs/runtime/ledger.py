"""The ingest ledger: which source shards are finished, kept in the `ingest_shards` table.

DESIGN.md, "Running at corpus scale": done work is skipped by shard, then by key. A shard is
marked done (one row per shard, target table, CLIP model and mask mode) only when every row it
produced is committed: its fragments appended, its error rows upserted, and the duplicate check of
those commits finished. A rerun lists the source's shards (names and sizes only), reads the
ledger's finished shard ids for these settings with a filter (never the image keys: a few hundred
thousand shard ids at LAION scale) and skips those shards unread. A shard cut off by a crash is
not in the ledger and is read again; its rows already committed are skipped by the key check.
Eager masks satisfy a lazy rerun (they hold everything lazy needs), not the reverse.

Within a scan (`fbmem scan`), the same ledger also keeps the scan's own view of its shards in
`scan_shards`: every listed shard is `pending` or `done-before` (finished by an earlier run) when
the ingest starts, and turns `done` when the ledger marks it; a resumed scan keeps its `done` rows.
"""
from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from fbmem.pipelines.sources import Shard
from fbmem.storage.database import Database
from fbmem.storage.keys import sql_list, sql_literal, stable_hash
from fbmem.storage.schema import INGEST_SHARDS, SCAN_SHARDS, now_utc

LEDGER = "ingest_shards"
SCAN_SHARDS_TABLE = "scan_shards"


@dataclass
class Finished:
    """The shards of a source that the ledger says are done, and what they held."""

    ids: set[str] = field(default_factory=set)
    rows_in: int = 0
    stored: int = 0  # rows written or found stored when the shard was done
    errors: int = 0


@dataclass
class ShardCounts:
    """What one shard's rows became (the driver sums the write tasks' counts)."""

    rows: int = 0
    written: int = 0
    skipped: int = 0
    errors: int = 0
    duplicates: int = 0
    total: int | None = None  # the shard's row count, from its marker row

    @property
    def complete(self) -> bool:
        return self.total is not None and self.rows >= self.total


class ShardLedger:
    """Finished shards of one (target table, CLIP model, mask mode)."""

    def __init__(self, db: Database, *, table: str, model: str, masks: str, scan_id: str | None = None) -> None:
        self.db, self.table, self.model, self.masks, self.scan_id = db, table, model, masks, scan_id

    def _scan_row(self, shard: Shard, status: str, run_id: str, counts: ShardCounts | None = None) -> dict:
        return {"scan_shard_id": stable_hash(self.scan_id, shard.shard_id, self.table), "scan_id": self.scan_id,
                "shard_id": shard.shard_id, "source": shard.source, "target_table": self.table, "status": status,
                "rows_in": counts.rows if counts else None, "rows_written": counts.written if counts else None,
                "errors": counts.errors if counts else None, "run_id": run_id, "updated_at": now_utc()}

    def note_listed(self, shards: Sequence[Shard], finished: set[str], run_id: str) -> None:
        """A scan's shard rows at the start of an ingest: `done-before` or `pending` (one upsert),
        leaving the rows this scan already marked `done` (a resumed scan) as they are."""
        if self.scan_id is None or not shards:
            return
        done_here: set[str] = set()
        if self.db.has_table(SCAN_SHARDS_TABLE):
            done_here = set(self.db.read(SCAN_SHARDS_TABLE, ["shard_id"], (
                f"scan_id = {sql_literal(self.scan_id)} AND target_table = {sql_literal(self.table)} "
                "AND status = 'done'")).column(0).to_pylist())
        rows = [self._scan_row(s, "done-before" if s.shard_id in finished else "pending", run_id)
                for s in shards if s.shard_id not in done_here]
        if rows:
            self.db.upsert(SCAN_SHARDS_TABLE, pa.Table.from_pylist(rows, schema=SCAN_SHARDS))

    def ledger_id(self, shard_id: str) -> str:
        return stable_hash(shard_id, self.table, self.model, self.masks)

    def _where(self) -> str:
        modes = ("eager",) if self.masks == "eager" else ("lazy", "eager")
        return (f"target_table = {sql_literal(self.table)} AND embedding_model = {sql_literal(self.model)} "
                f"AND masks IN ({sql_list(modes)}) AND status = 'done'")

    def finished(self, shard_ids: Sequence[str]) -> Finished:
        """Which of `shard_ids` are done: one filtered scan of the ledger (columns of a few ints)."""
        out = Finished()
        if not shard_ids or not self.db.has_table(LEDGER):
            return out
        t = self.db.read(LEDGER, ["shard_id", "rows_in", "rows_written", "rows_skipped", "errors"], self._where())
        t = t.filter(pc.is_in(t.column("shard_id"), value_set=pa.array(list(shard_ids), pa.string())))
        if t.num_rows == 0:
            return out
        # one row per shard (a shard done both lazy and eager is counted once)
        first = t.group_by("shard_id", use_threads=False).aggregate(
            [("rows_in", "first"), ("rows_written", "first"), ("rows_skipped", "first"), ("errors", "first")])
        out.ids = set(first.column("shard_id").to_pylist())

        def total(name: str) -> int:
            return int(pc.sum(pc.fill_null(first.column(name), 0)).as_py() or 0)

        out.rows_in = total("rows_in_first")
        out.stored = total("rows_written_first") + total("rows_skipped_first")
        out.errors = total("errors_first")
        return out

    def mark_done(self, shards: Iterable[tuple[Shard, ShardCounts]], run_id: str) -> int:
        """Record finished shards (one upsert for all of them); returns how many."""
        shards = list(shards)
        rows = [
            {"ledger_id": self.ledger_id(s.shard_id), "shard_id": s.shard_id, "source": s.source,
             "shard_kind": s.kind, "shard_spec": json.dumps(s.label, sort_keys=True),
             "target_table": self.table, "embedding_model": self.model, "masks": self.masks, "status": "done",
             "rows_in": c.rows, "rows_written": c.written, "rows_skipped": c.skipped, "errors": c.errors,
             "duplicates": c.duplicates, "run_id": run_id, "finished_at": now_utc()}
            for s, c in shards
        ]
        if rows:
            self.db.upsert(LEDGER, pa.Table.from_pylist(rows, schema=INGEST_SHARDS))
            if self.scan_id is not None:
                self.db.upsert(SCAN_SHARDS_TABLE, pa.Table.from_pylist(
                    [self._scan_row(s, "done", run_id, c) for s, c in shards], schema=SCAN_SHARDS))
        return len(rows)
