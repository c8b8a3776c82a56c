"""`fbmem ingest`: the ingest jobs over the pipelines of pipelines/ingest.py.

Images, at corpus scale (DESIGN.md, "Running at corpus scale: who does what"):
  1. Plan. List the source's shards (`sources.list_shards`: names and sizes, nothing read) and drop
     those the ledger (jobs/runtime/ledger.py) marks done for this table, CLIP model and mask
     mode. A rerun of a finished ingest reads nothing of the source.
  2. Stream each group of `engine.shards_per_execution` shards through Ray Data: read, validate,
     key check against the committed table, masks, CLIP, and a writer that writes Lance fragments
     on the workers (pipelines/ingest.py). Rows never come to the driver.
  3. Commit. The driver receives fragment metadata and per-shard counts; it commits one Append per
     `engine.commit_every_fragments` fragments or `engine.commit_every_s` seconds, after which a Ray
     actor (`DuplicateChecker`: key lookups off the driver) brings each key the commit added back
     to one row (`storage.fragments.dedupe_commit`: the same image twice in a corpus, in blocks
     written before either was committed). Error rows (few) are upserted at each commit. A shard
     is marked done once all its rows are committed and those commits checked for duplicates.
  4. Maintenance. Every `engine.maintain_every_commits` commits and at the end: compaction, and the
     BTREE index on the key once the table has `engine.key_index_min_rows` rows; at the end also
     the removal of versions older than `engine.version_retention_s`.

The driver holds: the shard list of the source, fragment metadata and error rows until the next
commit, and counters for the shards in flight. Nothing that grows with the rows.

After a crash (kill -9 at any point) a rerun gives the rows of an uninterrupted run: no lost rows,
no duplicate key. No lost rows: a shard is in the ledger only when every row it produced is
committed (fragments appended, error rows upserted), so every shard that may have lost rows is read
again. No duplicate key: the rerun's key check skips the rows already committed (they are not
written twice), and a copy committed before the crash whose duplicate check never ran belongs to an
unfinished shard, so the same key check meets it, sees two rows and deletes the older. Data files
written but never committed are invisible and removed by the version cleanup (Lance deletes
unreferenced files once they are older than its unverified-file age, 7 days by default).

Prompts: a prompt set -> CLIP text embeddings -> `prompts`, with `Database.upsert` (a prompt set is
small: thousands of rows, one pass on the driver is fine). Prompts already stored are skipped, not
rewritten: their cluster ids and other job outputs must survive a re-ingest of the same file.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import ray
from tqdm import tqdm

from fbmem.jobs.config import Config, EngineConfig
from fbmem.jobs.runtime.ledger import ShardCounts, ShardLedger
from fbmem.jobs.runtime.run_record import RunRecord, now_utc
from fbmem.jobs.runtime.stream import drain
from fbmem.pipelines.actors import actor_kwargs
from fbmem.pipelines.ingest import (
    KEY_OF,
    TABLE_OF,
    Target,
    WritePlan,
    build_engine_stream,
    read_ipc,
)
from fbmem.pipelines.prompt_sets import load_prompt_set
from fbmem.pipelines.sources import Shard, list_shards
from fbmem.storage import fragments
from fbmem.storage.database import Database, StorageError
from fbmem.storage.fragments import ORDER_COLUMN, FragmentCommitter, open_dataset
from fbmem.storage.schema import KEYS

log = logging.getLogger(__name__)

SOURCES_TABLE = "training_sources"  # every (image, source row) pair of a training ingest


@ray.remote(num_cpus=0)
class RowCounter:
    """A counter actor (kept for bench/ingest.py, which builds the plain stream)."""

    def __init__(self) -> None:
        self.n = 0

    def add(self, k: int) -> None:
        self.n += k

    def get(self) -> int:
        return self.n


@dataclass
class IngestCounts:
    rows_in: int = 0
    written: int = 0
    skipped: int = 0  # rows already stored: found by the key check, or in shards the ledger skips
    errors: int = 0
    skipped_shards: int = 0


def check_model_matches(db: Database, table: str, cfg: Config) -> None:
    """One database holds one CLIP model's vectors: refuse to mix before doing any work."""
    if not db.has_table(table) or db.count(table) == 0:
        return
    first = db.dataset(table).to_table(columns=["embedding_model"], filter="embedding_model IS NOT NULL", limit=1)
    models = set(first.column(0).to_pylist())
    want = cfg.models.clip.model_id
    if models and want not in models:
        raise StorageError(
            f"{table} in {db.uri} holds embeddings of {sorted(models)}, not {want}: "
            "use the same CLIP model (config models.clip) or another --db"
        )


# ------------------------------------------------------------------------------ tasks on the workers


class DuplicateChecker:
    """A Ray actor (one per ingest, no CPU): after each commit, one row per key among the keys
    the commit added (storage/fragments.dedupe_commit). One process for the whole job, so a check
    costs a few key lookups, not a worker start; the calls run in commit order."""

    def __init__(self, uri: str, key: str, order: str, storage_options: dict[str, str] | None) -> None:
        self.uri, self.key, self.order, self.so = uri, key, order, storage_options

    def check(self, data_files: list[str]) -> int:
        return fragments.dedupe_commit(self.uri, data_files, self.key, self.order, self.so)

    def check_table(self, uri: str, key: str, order: str, data_files: list[str]) -> int:
        """The same for another table of the ingest (`training_sources`)."""
        return fragments.dedupe_commit(uri, data_files, key, order, self.so)


def maintain_table(uri: str, key: str | None, eng: EngineConfig, so: dict[str, str] | None,
                   *, min_fragments: int, retention_s: float | None) -> dict[str, Any]:
    """Compaction, the key index, and (with `retention_s`) old versions removed: one table."""
    out: dict[str, Any] = fragments.compact(
        uri, so, target_rows=eng.compact_target_rows, min_fragments=min_fragments,
        distributed_min_rows=eng.distributed_compaction_rows, workers=eng.compaction_workers,
        ray_remote_args={"num_cpus": eng.write_num_cpus},
    )
    if key is not None:
        out["key_index"] = fragments.maintain_key_index(uri, key, eng.key_index_min_rows, so)
    if retention_s is not None:
        out["versions_removed"] = fragments.cleanup(uri, so, retention_s=retention_s)
    return out


def _maintain_quietly(*args: Any, **kwargs: Any) -> dict[str, Any]:
    """A conflict with a concurrent commit (a delete of this job, another job's writes) only
    postpones compaction to the next maintenance; it never fails the job."""
    try:
        return maintain_table(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - maintenance runs again later
        if fragments.is_conflict(exc):
            return {"postponed": str(exc)}
        raise


# ------------------------------------------------------------------------------------------ driver


@dataclass
class _Totals:
    rows: int = 0
    written: int = 0
    skipped: int = 0
    errors: int = 0
    duplicates: int = 0
    commits: int = 0
    fragments: int = 0
    shards_done: int = 0
    source_rows: int = 0  # `training_sources` rows added (after the duplicate checks)


@dataclass
class _Engine:
    """The driver's side of one image ingest: commits, duplicate checks, errors, the ledger."""

    db: Database
    cfg: Config
    plan: WritePlan
    ledger: ShardLedger
    run: RunRecord
    shards: dict[str, Shard]
    base: IngestCounts
    bar: Any = None
    dim: int | None = None
    totals: _Totals = field(default_factory=_Totals)
    counts: dict[str, ShardCounts] = field(default_factory=dict)
    uncommitted: set[str] = field(default_factory=set)  # shards with fragments not committed yet
    errors: list[pa.Table] = field(default_factory=list)
    maintenance: list[Any] = field(default_factory=list)
    last_flush: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        eng = self.cfg.engine
        so = self.plan.storage_options
        self.committer = FragmentCommitter(self.plan.uri, so, eng.commit_every_fragments, eng.commit_every_s)
        # `training_sources` fragments: committed with the images' (never held past one commit)
        self.sources = (FragmentCommitter(self.plan.sources_uri, so, eng.commit_every_fragments, eng.commit_every_s)
                        if self.plan.sources_uri is not None else None)
        self.dim = self.db.table_dim(self.plan.table)
        # A commit's duplicate check is a few key lookups and maybe a delete; it asks for no CPU so it
        # never queues behind the stream's tasks (shards are marked done only after it).
        self._checker = ray.remote(DuplicateChecker).options(num_cpus=0).remote(
            self.plan.uri, self.plan.key, self.plan.order, so)
        self._maintain_task = ray.remote(_maintain_quietly).options(num_cpus=eng.write_num_cpus)

    # ---- results of the write tasks
    def take(self, result: dict[str, Any]) -> None:
        frags = result["fragments"] or []
        if frags:
            dim = result["dim"]
            if self.dim is not None and dim != self.dim:
                raise StorageError(
                    f"{self.plan.table}: this database holds {self.dim}-d embeddings but the batch has {dim}-d "
                    "ones; embeddings of different models cannot share a table: use another --db"
                )
            self.dim = dim
            self.committer.add(frags)
            self.totals.fragments += len(frags)
        if result.get("source_fragments") and self.sources is not None:
            self.sources.add(result["source_fragments"])
        if result["errors"]:
            self.errors.append(read_ipc(result["errors"]))
        for sc in result["shards"]:
            c = self.counts.setdefault(sc["shard"], ShardCounts())
            c.rows += sc["rows"]
            c.written += sc["written"]
            c.skipped += sc["skipped"]
            c.errors += sc["errors"]
            c.duplicates += sc["duplicates"]
            if sc["total"] is not None:
                c.total = sc["total"]
            if sc["written"] or sc.get("sources"):
                self.uncommitted.add(sc["shard"])
            self.totals.rows += sc["rows"]
            self.totals.skipped += sc["skipped"]
            self.totals.duplicates += sc["duplicates"]
            if self.bar is not None:
                self.bar.update(sc["rows"])
        self._report()

    def due(self) -> bool:
        if self.committer.due() or (self.sources is not None and self.sources.due()):
            return True
        late = time.monotonic() - self.last_flush >= self.cfg.engine.commit_every_s
        return late and bool(self.errors or self.committer.pending or self._sources_pending() or self._markable())

    def _sources_pending(self) -> bool:
        return self.sources is not None and bool(self.sources.pending)

    # ---- commits
    def flush(self) -> None:
        """Commit pending fragments and check the commit for duplicate keys, upsert pending error
        rows, then mark the shards whose rows have all come back: every row of theirs is now
        committed (and checked) or upserted."""
        self.last_flush = time.monotonic()
        if self.committer.pending:
            if open_dataset(self.plan.uri, self.plan.storage_options) is None:
                self.db.table(self.plan.table, dim=self.dim, create=True)
            commit = self.committer.commit()
            # The check runs on the checker actor (key lookups there, not here); the driver waits
            # for it because the shards of this commit may be marked done right after.
            self.totals.duplicates += ray.get(self._checker.check.remote(commit.data_files))
            self.totals.written += commit.rows
            self.totals.commits = self.committer.commits
            if self.committer.commits % self.cfg.engine.maintain_every_commits == 0:
                self._maintain_now()
        if self._sources_pending():
            # Source rows of a shard read again after a crash are appended again: the check brings
            # each (image, source row) back to one row, as for the images.
            if open_dataset(self.plan.sources_uri, self.plan.storage_options) is None:
                self.db.table(SOURCES_TABLE, create=True)
            commit = self.sources.commit()
            self.totals.source_rows += commit.rows
            self.totals.source_rows -= ray.get(self._checker.check_table.remote(
                self.plan.sources_uri, KEYS[SOURCES_TABLE][0], "ingested_at", commit.data_files))
        self.uncommitted.clear()
        if self.errors:
            errors = pa.concat_tables(self.errors)
            self.db.upsert("errors", errors)
            self.totals.errors += errors.num_rows
            self.errors = []
        self._mark()
        self._report()

    def _tables(self) -> list[tuple[str, str]]:
        """The bulk-written tables of this ingest and their keys: maintained alike."""
        out = [(self.plan.uri, self.plan.key)]
        if self.plan.sources_uri is not None and open_dataset(self.plan.sources_uri, self.plan.storage_options):
            out.append((self.plan.sources_uri, KEYS[SOURCES_TABLE][0]))
        return out

    def _maintain_now(self) -> None:
        if self.maintenance:
            ready, _ = ray.wait(self.maintenance, num_returns=len(self.maintenance), timeout=0)
            if len(ready) < len(self.maintenance):
                return
            ray.get(self.maintenance)
        eng = self.cfg.engine
        self.maintenance = [self._maintain_task.remote(uri, key, eng, self.plan.storage_options,
                                                       min_fragments=eng.compact_min_fragments, retention_s=None)
                            for uri, key in self._tables()]

    def _markable(self) -> list[str]:
        return [s for s, c in self.counts.items() if c.complete and s not in self.uncommitted]

    def _mark(self) -> None:
        ready = self._markable()
        if not ready:
            return
        self.ledger.mark_done([(self.shards[s], self.counts[s]) for s in ready], self.plan.run_id)
        for s in ready:
            del self.counts[s]
        self.totals.shards_done += len(ready)

    def end_group(self) -> None:
        self.flush()
        if self.counts:
            lost = {s: f"{c.rows}/{c.total}" for s, c in self.counts.items()}
            raise RuntimeError(f"ingest: rows of {len(lost)} shards did not all come back from the stream: {lost}")

    def finish(self) -> dict[str, Any]:
        ray.kill(self._checker)
        if self.maintenance:
            ray.get(self.maintenance)
        if not self.db.has_table(self.plan.table):
            return {}
        eng = self.cfg.engine
        refs = [self._maintain_task.remote(uri, key, eng, self.plan.storage_options,
                                           min_fragments=2, retention_s=eng.version_retention_s)
                for uri, key in self._tables()]
        out, *others = ray.get(refs)
        if others:
            out[SOURCES_TABLE] = others[0]
        for small in ("errors", "ingest_shards"):  # small tables: here, not in a task
            if self.db.has_table(small):
                _maintain_quietly(self.db.table_uri(small), None, eng, self.db.storage_options or None,
                                  min_fragments=2, retention_s=eng.version_retention_s)
        return out

    def _report(self) -> None:
        t, run = self.totals, self.run
        run.rows_in = self.base.rows_in + t.rows
        run.rows_out = t.written
        run.errors = t.errors
        run.metrics.update(skipped_existing=self.base.skipped + t.skipped, duplicates=t.duplicates,
                           commits=t.commits, fragments=t.fragments)
        if self.plan.sources_uri is not None:
            run.metrics["source_rows"] = t.source_rows


def _groups(items: list[Shard], size: int) -> Iterable[list[Shard]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def ingest_images(
    db: Database,
    cfg: Config,
    src: str,
    *,
    target: Target,
    kind: str = "auto",
    masks: str | None = None,
    run: RunRecord,
) -> IngestCounts:
    """Ingest `src` into `training_images` or `generations` (see the module docstring)."""
    masks = masks or cfg.ingest.masks
    table = TABLE_OF[target]
    eng = cfg.engine
    check_model_matches(db, table, cfg)
    shards = list_shards(src, kind, generations=target == "generations",
                         files_per_shard=eng.folder_files_per_shard, rows_per_shard=eng.manifest_rows_per_shard)
    ledger = ShardLedger(db, table=table, model=cfg.models.clip.model_id, masks=masks, scan_id=getattr(run, "scan_id", None))
    finished = ledger.finished([s.shard_id for s in shards])
    ledger.note_listed(shards, finished.ids, run.run_id)
    todo = [s for s in shards if s.shard_id not in finished.ids]
    base = IngestCounts(rows_in=finished.rows_in, skipped=finished.stored, skipped_shards=len(finished.ids))
    run.rows_in = base.rows_in
    run.metrics.update(shards=len(shards), skipped_shards=base.skipped_shards, skipped_existing=base.skipped,
                       shards_todo=len(todo))
    if not todo:
        log.info("all %d shards of %s are done for %s: nothing to read", len(shards), src, table)
        return base

    from fbmem.jobs.runtime.ray_session import ensure_ray

    ensure_ray(cfg)
    uri = db.table_uri(table)  # created by the first commit when absent, with the workers' dimension
    existing = open_dataset(uri, db.storage_options)
    sources_uri = db.table_uri(SOURCES_TABLE) if target == "training" else None
    sources = open_dataset(sources_uri, db.storage_options) if sources_uri is not None else None
    plan = WritePlan(
        target=target, table=table, uri=uri, key=KEY_OF[target], order=ORDER_COLUMN[table],
        model_id=cfg.models.clip.model_id, masks=masks, job=run.job, run_id=run.run_id,
        store_image_bytes=cfg.ingest.store_image_bytes, storage_options=db.storage_options or None,
        data_storage_version=existing.data_storage_version if existing is not None else None,
        sources_uri=sources_uri,
        sources_storage_version=sources.data_storage_version if sources is not None else None,
    )
    engine = _Engine(db, cfg, plan, ledger, run, {s.shard_id: s for s in todo}, base)
    with tqdm(desc=f"ingest {target}", unit="img", disable=None) as bar:
        engine.bar = bar
        for group in _groups(todo, eng.shards_per_execution):
            stream = build_engine_stream(group, cfg, plan)
            for batch in stream.iter_batches(batch_size=None, batch_format="pyarrow"):
                for result in batch.to_pylist():
                    engine.take(result)
                    if engine.due():
                        engine.flush()
            engine.end_group()
    run.metrics["maintenance"] = engine.finish()
    t = engine.totals
    run.metrics.update(shards_done=t.shards_done)
    return IngestCounts(rows_in=base.rows_in + t.rows, written=t.written, skipped=base.skipped + t.skipped,
                        errors=t.errors, skipped_shards=base.skipped_shards)


def ingest_prompts(db: Database, cfg: Config, path: str | Path, *, run: RunRecord) -> int:
    """Prompts keep the small-table path: `existing_keys` and `Database.upsert` on the driver."""
    from fbmem.pipelines.clip_embedder import ClipTextEmbedder  # torch: only where a model is used

    read = load_prompt_set(path)
    table = read.table
    run.rows_in = read.rows_read
    run.metrics.update(empty_skipped=read.empty_skipped, duplicates_dropped=read.duplicates_dropped)
    existing = db.existing_keys("prompts") if db.has_table("prompts") else set()
    if existing:
        keep = pc.invert(pc.is_in(table.column("prompt_id"), value_set=pa.array(sorted(existing), pa.string())))
        table = table.filter(keep)
    run.metrics["skipped_existing"] = read.table.num_rows - table.num_rows
    if table.num_rows == 0:
        log.info("no new prompts in %s", path)
        return 0
    ds = ray.data.from_arrow(table).map_batches(
        ClipTextEmbedder, fn_constructor_args=(cfg.to_json(),), **actor_kwargs(cfg.resources.embed)
    )

    def prompt_rows(batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        return batch.append_column("run_id", pa.array([run.run_id] * n)).append_column(
            "ingested_at", pa.array([now_utc()] * n, type=pa.timestamp("us", tz="UTC"))
        )

    batches = ds.iter_batches(batch_size=cfg.ingest.write_batch_rows, batch_format="pyarrow")
    return drain(batches, db=db, table="prompts", run=run, desc="ingest prompts", unit="prompt",
                 rows=prompt_rows, total=table.num_rows).written
