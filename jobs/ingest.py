"""`fbmem ingest`: the ingest jobs over the pipelines of pipelines/ingest.py.

Images: source rows -> validate -> drop keys already stored -> given masks or SAM (eager) ->
CLIP, and the good rows and the error rows of the stream are written to the tables.
Prompts: a prompt set -> CLIP text embeddings -> `prompts`. Prompts already stored are skipped,
not rewritten: their cluster ids and other job outputs must survive a re-ingest of the same file.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import ray

from fbmem.jobs.config import Config
from fbmem.jobs.runtime.run_record import RunRecord, now_utc
from fbmem.jobs.runtime.stream import ErrorSource, drain
from fbmem.pipelines.actors import actor_kwargs
from fbmem.pipelines.clip_embedder import ClipTextEmbedder
from fbmem.pipelines.ingest import (
    ERROR_STAGES,
    TABLE_OF,
    Target,
    build_image_stream,
    image_rows,
)
from fbmem.pipelines.prompt_sets import load_prompt_set
from fbmem.storage.database import Database, StorageError
from fbmem.storage.keys import sql_literal

log = logging.getLogger(__name__)


@ray.remote(num_cpus=0)
class RowCounter:
    """Counts rows dropped inside the stream (already stored), which the driver never sees."""

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
    skipped: int = 0
    errors: int = 0


def existing_image_keys(db: Database, target: Target, cfg: Config, masks: str) -> set[str]:
    """Keys a rerun may skip: same embedding model, and a mask when masks are eager."""
    table = TABLE_OF[target]
    if not db.has_table(table):
        return set()
    key = "image_id" if target == "training" else "generation_id"
    where = f"embedding_model = {sql_literal(cfg.models.clip.model_id)}"
    if masks == "eager":
        where += " AND mask_png IS NOT NULL"
    return set(db.read(table, columns=[key], where=where).column(0).to_pylist())


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
    """Run the image pipeline from `src` into `training_images` or `generations`."""
    from fbmem.pipelines.sources import open_source

    masks = masks or cfg.ingest.masks
    table = TABLE_OF[target]
    check_model_matches(db, table, cfg)
    counter = RowCounter.remote()
    existing = existing_image_keys(db, target, cfg, masks)
    source = open_source(src, kind=kind, generations=target == "generations")
    stream = build_image_stream(source, cfg, existing, counter, masks)
    batches = stream.iter_batches(batch_size=cfg.ingest.write_batch_rows, batch_format="pyarrow")
    done = drain(batches, db=db, table=table, run=run, desc=f"ingest {target}", unit="img",
                 rows=lambda good: image_rows(good, target, cfg, run.run_id),
                 errors=ErrorSource(stage="validate", stages=ERROR_STAGES), count_input=True)
    counts = IngestCounts(rows_in=done.rows_in, written=done.written, errors=done.errors)
    counts.skipped = ray.get(counter.get.remote())
    counts.rows_in += counts.skipped
    run.rows_in = counts.rows_in
    run.metrics["skipped_existing"] = counts.skipped
    return counts


def ingest_prompts(db: Database, cfg: Config, path: str | Path, *, run: RunRecord) -> int:
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
