"""Masks on demand: segment training images (or generations) only when they become candidates.

SAM is orders of magnitude dearer than CLIP per image (DESIGN.md, Scale), so ingest leaves
training masks empty by default and the labelling job calls `ensure_masks` with the candidate ids;
the masks are stored in the rows, so each image is segmented at most once, ever.
"""
from __future__ import annotations

import logging

import ray

from fbmem.jobs.config import Config
from fbmem.jobs.runtime.run_record import RunRecord
from fbmem.jobs.runtime.stream import ErrorSource, drain
from fbmem.pipelines.actors import actor_kwargs, batch_blocks
from fbmem.storage.database import Database
from fbmem.storage.keys import sql_list

log = logging.getLogger(__name__)

KEY_OF = {"training_images": "image_id", "generations": "generation_id"}


def missing_mask_ids(db: Database, table: str, ids: list[str], chunk: int = 2000) -> list[str]:
    key = KEY_OF[table]
    out: list[str] = []
    for start in range(0, len(ids), chunk):
        part = ids[start : start + chunk]
        where = f"{key} IN ({sql_list(part)}) AND mask_png IS NULL"
        out += db.read(table, [key], where=where).column(0).to_pylist()
    return out


def ensure_masks(db: Database, cfg: Config, table: str, ids: list[str], run: RunRecord) -> int:
    """Segment the rows of `ids` that have no mask yet; returns how many got one."""
    from fbmem.pipelines.sam_segmenter import SamSegmenter

    todo = missing_mask_ids(db, table, sorted(set(ids)))
    if not todo:
        return 0
    key = KEY_OF[table]
    log.info("segmenting %d %s rows that became candidates (lazy masks)", len(todo), table)
    rows = db.read(table, where=f"{key} IN ({sql_list(todo)})")
    ds = ray.data.from_arrow(batch_blocks(rows, cfg.resources.segment.batch_size)).map_batches(
        SamSegmenter, fn_constructor_args=(cfg.to_json(),), **actor_kwargs(cfg.resources.segment)
    )
    batches = ds.iter_batches(batch_size=cfg.ingest.write_batch_rows, batch_format="pyarrow")
    errors = ErrorSource(stage="mask", source_id=key, key=key)
    return drain(batches, db=db, table=table, run=run, desc=f"masks ({table})", unit="img", errors=errors,
                 total=len(todo)).written
