"""Masks on demand: segment training images (or generations) only when they become candidates.

SAM is orders of magnitude dearer than CLIP per image (DESIGN.md, Scale), so ingest leaves
training masks empty by default and the labelling job calls `ensure_masks` with the candidate ids.
Each image is segmented at most once, ever: a training image's later mask goes to `training_masks`
(a narrow table keyed by image, so no `training_images` row, pixels and vector included, is
rewritten; read masks through storage/masks.py `training_masks_for`); a generation's mask goes to
its own row (generations are few and normally masked eagerly).
"""
from __future__ import annotations

import logging

import pyarrow as pa
import ray

from fbmem.jobs.config import Config
from fbmem.jobs.runtime.run_record import RunRecord
from fbmem.jobs.runtime.stream import ErrorSource, drain
from fbmem.pipelines.actors import actor_kwargs, batch_blocks
from fbmem.storage.database import Database
from fbmem.storage.keys import sql_list
from fbmem.storage.masks import MASK_TABLE, training_ids_without_mask
from fbmem.storage.schema import now_utc

log = logging.getLogger(__name__)

KEY_OF = {"training_images": "image_id", "generations": "generation_id"}


def missing_mask_ids(db: Database, table: str, ids: list[str], chunk: int = 2000) -> list[str]:
    """The ids of `table` among `ids` with no mask yet (for training images: neither in their own
    row nor in `training_masks`)."""
    if table == "training_images":
        return training_ids_without_mask(db, ids, chunk=chunk)
    key = KEY_OF[table]
    out: list[str] = []
    for start in range(0, len(ids), chunk):
        part = ids[start : start + chunk]
        where = f"{key} IN ({sql_list(part)}) AND mask_png IS NULL"
        out += db.read(table, [key], where=where).column(0).to_pylist()
    return out


# what the segmenter reads of a training row: pixels, stored size, uri (for errors); never the vector
_SEGMENT_COLUMNS = ["image_bytes", "width", "height", "source_uri"]


def ensure_masks(db: Database, cfg: Config, table: str, ids: list[str], run: RunRecord) -> int:
    """Segment the rows of `ids` that have no mask yet; returns how many got one.

    Training images' masks are written to `training_masks` (one narrow row per image), generations'
    into their own rows."""
    from fbmem.pipelines.sam_segmenter import SamSegmenter

    todo = missing_mask_ids(db, table, sorted(set(ids)))
    if not todo:
        return 0
    key = KEY_OF[table]
    log.info("segmenting %d %s rows that became candidates (lazy masks)", len(todo), table)
    training = table == "training_images"
    chunk = 2000
    rows = pa.concat_tables([
        db.read(table, [key, *_SEGMENT_COLUMNS] if training else None,
                where=f"{key} IN ({sql_list(todo[s:s + chunk])})")
        for s in range(0, len(todo), chunk)
    ])
    ds = ray.data.from_arrow(batch_blocks(rows, cfg.resources.segment.batch_size)).map_batches(
        SamSegmenter, fn_constructor_args=(cfg.to_json(),), **actor_kwargs(cfg.resources.segment)
    )
    batches = ds.iter_batches(batch_size=cfg.ingest.write_batch_rows, batch_format="pyarrow")
    errors = ErrorSource(stage="mask", source_id=key, key=key)
    if not training:
        return drain(batches, db=db, table=table, run=run, desc=f"masks ({table})", unit="img", errors=errors,
                     total=len(todo)).written

    def mask_rows(good: pa.Table) -> pa.Table:
        n = good.num_rows
        return pa.table({
            "image_id": good.column("image_id"), "mask_png": good.column("mask_png"),
            "fg_fraction": good.column("fg_fraction"), "mask_model": good.column("mask_model"),
            "run_id": pa.array([run.run_id] * n, pa.string()),
            "created_at": pa.array([now_utc()] * n, pa.timestamp("us", tz="UTC")),
        })

    return drain(batches, db=db, table=MASK_TABLE, run=run, desc=f"masks ({table})", unit="img", errors=errors,
                 rows=mask_rows, total=len(todo)).written
