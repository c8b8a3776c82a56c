"""Prompt sets -> `prompts` rows with CLIP text embeddings (Ray Data actors).

Prompts already stored are skipped, not rewritten: their cluster ids and other job outputs
must survive a re-ingest of the same file.
"""
from __future__ import annotations

import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import ray
from tqdm import tqdm

from fbmem.jobs.config import Config
from fbmem.jobs.run_record import RunRecord, now_utc
from fbmem.pipelines.clip_embedder import ClipTextEmbedder
from fbmem.pipelines.ingest import _actor_kwargs
from fbmem.pipelines.prompt_sets import load_prompt_set
from fbmem.storage.database import Database

log = logging.getLogger(__name__)


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
        ClipTextEmbedder, fn_constructor_args=(cfg.to_json(),), **_actor_kwargs(cfg.resources.embed)
    )
    written = 0
    with tqdm(total=table.num_rows, desc="ingest prompts", unit="prompt", disable=None) as bar:
        for batch in ds.iter_batches(batch_size=cfg.ingest.write_batch_rows, batch_format="pyarrow"):
            n = batch.num_rows
            batch = batch.append_column("run_id", pa.array([run.run_id] * n)).append_column(
                "ingested_at", pa.array([now_utc()] * n, type=pa.timestamp("us", tz="UTC"))
            )
            written += db.upsert("prompts", batch)
            bar.update(n)
            run.rows_out = written
    return written
